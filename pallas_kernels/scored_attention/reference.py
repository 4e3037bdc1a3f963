"""Readable jnp Spark attention from raw predictor scores: the oracle for the native kernel.

Query t of row b (position ``q_pos[b, t]``, -1 for a padding query) and query head (kv head k,
group member g) has raw predictor scores ``scores[b, k, g, t]`` over kv head k's S keys
(positions ``k_pos[b]``, -1 for an empty slot). A key is valid when its slot is filled, it is
not after the query and it is less than ``window`` positions behind it. The valid scores,
soft-capped (``s = cap * tanh(raw / cap)``), give their count n, mean, population standard
deviation and maximum, and ``theta = min(mean + z * std, max)`` with ``z = Phi^-1(clip(1 -
top_k / n, 1e-6, 1 - 1e-6))``; a valid key is kept when ``s >= theta`` (every valid key when
``n <= top_k``), and ``out = sum_kept softmax(s)[kept] * softplus(q_rest . k_rest) * v``. A
query with no valid key gives zeros. Everything is computed in float32 from the full rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.reference import kept_softmax, statistical_keep

_HIGHEST = jax.lax.Precision.HIGHEST


def valid_keys(q_pos: jax.Array, k_pos: jax.Array, window) -> jax.Array:
    """bool [B, 1, 1, T, S]: causal, in-window, filled slots, real queries."""
    qp = q_pos.astype(jnp.int32)[:, None, None, :, None]
    kp = k_pos.astype(jnp.int32)[:, None, None, None, :]
    return (kp >= 0) & (qp >= 0) & (kp <= qp) & (qp - kp < window)


def spark_scored_attention(
    scores, q_rest, k_rest, v, q_pos, k_pos, window, *, top_k: int, softcap: float | None = None
):
    """See the module docstring. Returns out [B, K, G, T, H] float32 and the kept keys per
    query head [B, K, G, T] float32."""
    s = scores.astype(jnp.float32)
    s = s if softcap is None else softcap * jnp.tanh(s / softcap)
    valid = valid_keys(q_pos, k_pos, window)
    keep = statistical_keep(s, valid, top_k)
    gate = jnp.einsum(
        "bkgtc,bksc->bkgts",
        q_rest.astype(jnp.float32),
        k_rest.astype(jnp.float32),
        precision=_HIGHEST,
    )
    weights = kept_softmax(s, keep) * jax.nn.softplus(gate)
    out = jnp.einsum("bkgts,bksh->bkgth", weights, v.astype(jnp.float32), precision=_HIGHEST)
    return out, jnp.sum(keep, axis=-1).astype(jnp.float32)
