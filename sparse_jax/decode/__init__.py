"""Decoding: a KV cache, chunked prefill and the one-token step, sparse or masked.

``cache`` (per-layer ring buffers), ``layout`` (the decode-time weight layout and its
products), ``attention`` and ``ffn`` (the masked and sparse gather paths), ``gather``
(capacities and compaction), ``policy`` (per-backend formulation and cost constants),
``step`` (``prefill``, ``decode_step``, :class:`DecodeOptions`), ``sampling`` and
``generate`` (batched generation and streaming).
"""

from sparse_jax.decode.cache import KVCache, init_cache
from sparse_jax.decode.generate import GenerationResult, StepOutput, generate, stream
from sparse_jax.decode.layout import to_decode_params
from sparse_jax.decode.sampling import GREEDY, Sampler
from sparse_jax.decode.step import DEFAULT_OPTIONS, DecodeOptions, decode_step, prefill

__all__ = [
    "DEFAULT_OPTIONS",
    "GREEDY",
    "DecodeOptions",
    "GenerationResult",
    "KVCache",
    "Sampler",
    "StepOutput",
    "decode_step",
    "generate",
    "init_cache",
    "prefill",
    "stream",
    "to_decode_params",
]
