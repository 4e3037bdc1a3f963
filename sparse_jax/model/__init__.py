"""The model: one Gemma-2 decoder, dense or Spark, as a pure function of its parameters.

``config`` (the frozen, validated :class:`ModelConfig`), ``layers`` (RMSNorm, embedding,
RoPE, soft-cap, softmax), ``attention`` and ``ffn`` (dense and Spark blocks) and
``transformer`` (the stacked blocks, ``init_params`` and ``forward``).
"""

from sparse_jax.model.config import ModelConfig, override
from sparse_jax.model.transformer import (
    Transformer,
    abstract_params,
    count_params,
    forward,
    init_params,
)

__all__ = [
    "ModelConfig",
    "Transformer",
    "abstract_params",
    "count_params",
    "forward",
    "init_params",
    "override",
]
