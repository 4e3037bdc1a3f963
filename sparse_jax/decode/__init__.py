"""Decoding: a KV cache, chunked prefill and the one-token step, sparse or masked.

``cache`` (per-layer ring buffers), ``step`` (``prefill``, ``decode_step``,
:class:`DecodeOptions`, the per-layer choices of the sparse path and :func:`decode_params`),
``sampling`` and ``generate`` (batched generation and streaming). The computation itself is
the model's (:meth:`sparse_jax.model.transformer.Transformer.extend`).
"""

from sparse_jax.decode.cache import KVCache, init_cache
from sparse_jax.decode.generate import GenerationResult, StepOutput, generate, stream
from sparse_jax.decode.sampling import GREEDY, Sampler
from sparse_jax.decode.step import (
    DEFAULT_OPTIONS,
    DecodeOptions,
    decode_params,
    decode_step,
    prefill,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "GREEDY",
    "DecodeOptions",
    "GenerationResult",
    "KVCache",
    "Sampler",
    "StepOutput",
    "decode_params",
    "decode_step",
    "generate",
    "init_cache",
    "prefill",
    "stream",
]
