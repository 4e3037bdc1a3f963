"""Readable jnp Spark attention from given predictor scores: the oracle for the native kernel.

Each row ``m`` of a kv head's scores [S] is one query head's soft-capped predictor scores over
that kv head's S keys, ``-inf`` marking an invalid key (empty slot, future, out of window).
Over the valid scores their count n, mean, population standard deviation and maximum give
``theta = min(mean + z * std, max)`` with ``z = Phi^-1(clip(1 - top_k / n, 1e-6, 1 - 1e-6))``;
a valid key is kept when its score is at least theta (every valid key when ``n <= top_k``),
and ``out = sum_kept softmax(s)[kept] * softplus(q_rest . k_rest) * v``. A row with no valid
key gives zeros. Everything is computed in float32 from the full rows (nothing is gathered).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def spark_scored_attention(scores, q_rest, k_rest, v, *, top_k: int):
    """See the module docstring. Returns out [B, K, M, H] float32 and the kept keys per row
    [B, K, M] float32."""
    s = scores.astype(jnp.float32)
    valid = s > -jnp.inf
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    safe_n = jnp.maximum(n, 1.0)
    mean = jnp.sum(jnp.where(valid, s, 0.0), axis=-1, keepdims=True) / safe_n
    var = jnp.sum(jnp.where(valid, (s - mean) ** 2, 0.0), axis=-1, keepdims=True) / safe_n
    top = jnp.max(s, axis=-1, keepdims=True)
    z = jax.scipy.special.ndtri(jnp.clip(1.0 - top_k / safe_n, 1e-6, 1.0 - 1e-6))
    theta = jnp.minimum(mean + z * jnp.sqrt(var), top)
    keep = valid & ((n <= top_k) | (s >= theta))
    masked = jnp.where(keep, s, -jnp.inf)
    e = jnp.exp(masked - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    gate = jnp.einsum(
        "bkmc,bksc->bkms",
        q_rest.astype(jnp.float32),
        k_rest.astype(jnp.float32),
        precision=_HIGHEST,
    )
    weights = e / jnp.where(total > 0, total, 1.0) * jax.nn.softplus(gate)
    out = jnp.einsum("bkms,bksh->bkmh", weights, v.astype(jnp.float32), precision=_HIGHEST)
    return out, jnp.sum(keep, axis=-1).astype(jnp.float32)
