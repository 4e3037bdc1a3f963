"""Bytes a decode step must read: the memory-bandwidth bound of batch decoding.

At small batch a decode step is bound by memory reads, so the bytes it must read, divided by
the machine's read bandwidth, bound its time from below. This module counts them from the
config: weights once per step (embedding for the output logits, attention projections, FFN),
and per row the cached keys and values it attends to. A Spark FFN reads its predictor K1
densely and, of K2 and V, only the rows of the active neurons: ``B * k`` rows per step when
each token gathers its own, or the expected union of the batch's active sets
``F * (1 - (1 - k/F)^B)``, whichever is fewer. Spark attention reads the predictor half of
every valid key and, per query head, the other half and the value of ``min(k, n)`` keys. Layers
with sparsity switched off count as dense. Counts are expected values of the method (k kept),
not of one step's selection.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from sparse_jax.model import weights
from sparse_jax.model.config import ModelConfig


def _itemsize(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def ffn_values(cfg: ModelConfig, batch_size: int, layer: int = 0) -> float:
    """Weight values one FFN layer reads per decode step of ``batch_size`` tokens."""
    f = cfg.ffn_dim
    dense = float(weights.group_size(cfg, "ffn"))
    if cfg.ffn_kind != "spark":
        return dense
    k = cfg.ffn_keep_count
    if not cfg.ffn_sparse_layers[layer] or k >= f:
        return dense
    spark = weights.SPARK_FFN
    predictor = math.prod(spark["k1"].shape(cfg))
    rows = spark["k2"].shape(cfg)[1] + spark["v"].shape(cfg)[1]  # one neuron's K2 and V rows
    union = f * (1.0 - (1.0 - k / f) ** batch_size)
    return predictor + min(batch_size * k, union) * rows


def attention_kv_values(cfg: ModelConfig, context: int, layer: int) -> float:
    """Cached key and value entries one row's query reads in one layer at this context."""
    h, kv, n_heads = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    keys = min(context, cfg.layer_windows[layer])
    if cfg.attn_kind != "spark" or not cfg.attn_sparse_layers[layer]:
        return float(keys * kv * 2 * h)
    r = cfg.attn_predictor_dim
    return float(keys * kv * r + n_heads * min(cfg.attn_top_k, keys) * (2 * h - r))


def step_bytes(
    cfg: ModelConfig, batch_size: int, context: int, cache_dtype: str | None = None
) -> dict[str, float]:
    """Bytes one decode step reads, by component.

    Args:
      cfg: model config (``param_dtype`` sets the weight bytes).
      batch_size: B, tokens decoded together (each row with its own cache).
      context: cached tokens each row attends over (the prompt length).
      cache_dtype: dtype of the cache; defaults to ``cfg.dtype``.

    Returns:
      ``{"embedding", "attn_weights", "ffn", "kv_cache", "weights", "total"}`` in bytes.
    """
    w = _itemsize(cfg.param_dtype)
    c = _itemsize(cfg.dtype if cache_dtype is None else cache_dtype)
    d = cfg.model_dim
    per_layer_attn = weights.group_size(cfg, "attn") + sum(
        weights.group_size(cfg, norm) for norm in weights.NORMS
    )
    layers = range(cfg.num_layers)
    out = {
        "embedding": float(cfg.vocab_size * d + batch_size * d + d) * w,
        "attn_weights": float(cfg.num_layers * per_layer_attn) * w,
        "ffn": sum(ffn_values(cfg, batch_size, i) for i in layers) * w,
        "kv_cache": batch_size * sum(attention_kv_values(cfg, context, i) for i in layers) * c,
    }
    out["weights"] = out["embedding"] + out["attn_weights"] + out["ffn"]
    out["total"] = out["weights"] + out["kv_cache"]
    return out


def attention_op_bytes(cfg: ModelConfig, context: int, cache_dtype: str | None = None) -> float:
    """Bytes one global attention layer's cache read takes for one query row at ``context``."""
    c = _itemsize(cfg.dtype if cache_dtype is None else cache_dtype)
    layer = cfg.layer_types.index("global")
    return attention_kv_values(cfg, context, layer) * c


def ffn_block_bytes(cfg: ModelConfig, batch_size: int = 1) -> float:
    """Bytes one FFN layer reads per decode step."""
    return ffn_values(cfg, batch_size) * _itemsize(cfg.param_dtype)
