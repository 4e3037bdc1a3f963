"""One decode step's attention in XLA, per kv head: the portable form of the native kernels.

Same contract as :mod:`pallas_kernels.decode_attention.reference`; the query heads of a kv
head are one batched product against its keys, and the Spark threshold is the library's
statistical top-k (:func:`pallas_kernels.stat_topk.xla.statistical_threshold`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.stat_topk.xla import statistical_threshold


def _keys(cache: jax.Array, new: jax.Array) -> jax.Array:
    """cache [B, K, S, W] and new [B, K, W] -> [B, K, S + 1, W] (the token's own entries keep
    their float32 precision)."""
    return jnp.concatenate([cache.astype(jnp.float32), new.astype(jnp.float32)[:, :, None]], 2)


def _valid(pos: jax.Array, q_pos: jax.Array, window) -> jax.Array:
    qp = q_pos.astype(jnp.int32)[:, None]
    kp = jnp.concatenate([pos.astype(jnp.int32), qp], axis=1)
    return ((kp >= 0) & (kp <= qp) & (qp - kp < window))[:, None, None]  # [B, 1, 1, S + 1]


def _scores(q: jax.Array, keys: jax.Array, softcap: float | None) -> jax.Array:
    b, n, w = q.shape
    kv = keys.shape[1]
    qg = q.reshape(b, kv, n // kv, w).astype(jnp.float32)  # bfloat16 keys are promoted
    s = jnp.einsum("bkgw,bksw->bkgs", qg, keys, preferred_element_type=jnp.float32)
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _combine(weights: jax.Array, values: jax.Array) -> jax.Array:
    out = jnp.einsum("bkgs,bksh->bkgh", weights, values, preferred_element_type=jnp.float32)
    b, kv, g, h = out.shape
    return out.reshape(b, kv * g, h)


def kept_softmax(scores: jax.Array, keep: jax.Array) -> jax.Array:
    """Softmax over the kept entries of each row (zeros elsewhere; a row with none is 0)."""
    masked = jnp.where(keep, scores, -jnp.inf)
    top = jnp.max(masked, axis=-1, keepdims=True)
    e = jnp.exp(masked - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def spark_decode_attention(
    q_pred, q_rest, k_pred, k_rest, v, pos, new_k_pred, new_k_rest, new_v, q_pos, window,
    *, top_k: int, softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """See :func:`pallas_kernels.decode_attention.reference.spark_decode_attention`."""
    b, n = q_pred.shape[:2]
    valid = _valid(pos, q_pos, window)
    s = _scores(q_pred, _keys(k_pred, new_k_pred), softcap)
    theta, keep_all = statistical_threshold(s, top_k, valid=valid)
    keep = valid & (keep_all | (s >= theta))
    gate = _scores(q_rest, _keys(k_rest, new_k_rest), None)
    out = _combine(kept_softmax(s, keep) * jax.nn.softplus(gate), _keys(v, new_v))
    return out, jnp.sum(keep, axis=-1, dtype=jnp.float32).reshape(b, n)


def dense_decode_attention(
    q, k, v, pos, new_k, new_v, q_pos, window, *, softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """See :func:`pallas_kernels.decode_attention.reference.dense_decode_attention`."""
    b, n = q.shape[:2]
    valid = _valid(pos, q_pos, window)
    s = _scores(q, _keys(k, new_k), softcap)
    out = _combine(kept_softmax(s, valid), _keys(v, new_v))
    count = jnp.sum(valid, axis=-1, dtype=jnp.float32).reshape(b, 1)
    return out, jnp.broadcast_to(count, (b, n))
