"""The model: one Gemma-2 decoder, dense or Spark, as a pure function of its parameters.

``config`` (the frozen, validated :class:`ModelConfig`), ``weights`` (every weight's shape,
logical axes and initialiser), ``products`` (the weight products, per backend policy),
``layers`` (RMSNorm, embedding, RoPE, soft-cap, softmax), ``attention`` and ``ffn`` (dense and
Spark blocks, masked and with a KV cache, sparse gather paths), ``selection`` (capacities and
compaction of the sparse path) and ``transformer`` (the blocks scanned for training and
unrolled over a cache for prefill and decoding, ``init_params`` and ``forward``).
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
