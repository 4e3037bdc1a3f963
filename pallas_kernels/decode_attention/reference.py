"""Readable jnp decode attention of one query per row: the oracle for the native kernels.

Each row's query at position ``q_pos`` attends to the S cached slots (positions ``pos``, -1
for an empty slot) and to its own key, taken as slot S at position ``q_pos``. A key is valid
when its slot is filled, it is not after the query, and it is less than ``window`` positions
behind it. Query head n reads kv head ``n // (N // K)``.

* dense: ``out = softmax(softcap(q . k))[valid] . v``;
* Spark: predictor scores ``s = softcap(q_pred . k_pred)``; over the valid keys their count
  n, mean, population standard deviation and maximum give ``theta = min(mean + z * std,
  max)`` with ``z = Phi^-1(clip(1 - top_k / n, 1e-6, 1 - 1e-6))``; a valid key is kept when
  ``s >= theta`` (every valid key when ``n <= top_k``); ``out = sum_kept softmax(s)[kept] *
  softplus(q_rest . k_rest) * v``.

Everything is computed in float32 from the full score rows (nothing is gathered).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _joined(cache: jax.Array, new: jax.Array, head_kv: jax.Array) -> jax.Array:
    """cache [B, K, S, W] and new [B, K, W] -> per query head [B, N, S + 1, W] float32."""
    keys = jnp.concatenate([cache.astype(jnp.float32), new.astype(jnp.float32)[:, :, None]], 2)
    return keys[:, head_kv]


def _valid(pos: jax.Array, q_pos: jax.Array, window) -> jax.Array:
    """bool [B, S + 1]: the cached slots and the query's own key."""
    qp = q_pos[:, None].astype(jnp.int32)
    kp = jnp.concatenate([pos.astype(jnp.int32), qp], axis=1)
    return (kp >= 0) & (kp <= qp) & (qp - kp < window)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _head_kv(num_heads: int, kv_heads: int) -> jax.Array:
    return jnp.arange(num_heads) // (num_heads // kv_heads)


def statistical_keep(s: jax.Array, valid: jax.Array, top_k: int) -> jax.Array:
    """The kept keys of score rows s (last axis) over their valid entries, as the module
    docstring says (every valid key when ``n <= top_k``)."""
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    safe_n = jnp.maximum(n, 1.0)
    mean = jnp.sum(jnp.where(valid, s, 0.0), axis=-1, keepdims=True) / safe_n
    var = jnp.sum(jnp.where(valid, (s - mean) ** 2, 0.0), axis=-1, keepdims=True) / safe_n
    top = jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True)
    z = jax.scipy.special.ndtri(jnp.clip(1.0 - top_k / safe_n, 1e-6, 1.0 - 1e-6))
    theta = jnp.minimum(mean + z * jnp.sqrt(var), top)
    return valid & ((n <= top_k) | (s >= theta))


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
    """Spark decode attention; see the module docstring. Returns out [B, N, H] float32 and
    the kept keys per head [B, N] float32."""
    head_kv = _head_kv(q_pred.shape[1], k_pred.shape[1])
    valid = _valid(pos, q_pos, window)[:, None]  # [B, 1, S + 1]
    kp = _joined(k_pred, new_k_pred, head_kv)
    s = jnp.einsum("bnsr,bnr->bns", kp, q_pred.astype(jnp.float32), precision=_HIGHEST)
    s = _softcap(s, softcap)
    keep = statistical_keep(s, valid, top_k)
    gate = jnp.einsum(
        "bnsc,bnc->bns",
        _joined(k_rest, new_k_rest, head_kv),
        q_rest.astype(jnp.float32),
        precision=_HIGHEST,
    )
    weights = kept_softmax(s, keep) * jax.nn.softplus(gate)
    values = _joined(v, new_v, head_kv)
    out = jnp.einsum("bns,bnsh->bnh", weights, values, precision=_HIGHEST)
    return out, jnp.sum(keep, axis=-1).astype(jnp.float32)


def dense_decode_attention(
    q, k, v, pos, new_k, new_v, q_pos, window, *, softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Dense decode attention; see the module docstring. Returns out [B, N, H] float32 and
    the valid keys per head [B, N] float32."""
    head_kv = _head_kv(q.shape[1], k.shape[1])
    valid = _valid(pos, q_pos, window)[:, None]
    s = jnp.einsum(
        "bnsh,bnh->bns", _joined(k, new_k, head_kv), q.astype(jnp.float32), precision=_HIGHEST
    )
    weights = kept_softmax(_softcap(s, softcap), valid)
    out = jnp.einsum("bns,bnsh->bnh", weights, _joined(v, new_v, head_kv), precision=_HIGHEST)
    count = jnp.broadcast_to(jnp.sum(valid, axis=-1), weights.shape[:2])
    return out, count.astype(jnp.float32)
