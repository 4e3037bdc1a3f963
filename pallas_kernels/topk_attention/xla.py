"""Decode attention over selected keys in XLA: the implementation the model runs on CPU.

Per kv head, one row gather of the selected keys' non-predictor halves and values from the
cache, then float32 contractions; the result stays float32.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common.rows import gather_rows


def topk_attention(
    q_rest: jax.Array, p: jax.Array, idx: jax.Array, k_rest: jax.Array, v: jax.Array
) -> jax.Array:
    """``out[b, n] = sum_a p * softplus(q_rest . k_rest[b, kv, idx]) * v[b, kv, idx]``.

    Query head n reads kv head ``n // (N // K)``.

    Args:
      q_rest: [B, N, H-R] non-predictor half of each query, scaled and rotated.
      p: [B, N, A] softmax weights of the selected keys; 0 on padding slots.
      idx: int32 [B, N, A] selected cache slots in [0, S).
      k_rest: [B, K, S, H-R] cached non-predictor key halves.
      v: [B, K, S, H] cached values.

    Returns:
      [B, N, H] float32.
    """
    b, n, a = p.shape
    kv = k_rest.shape[1]
    g = n // kv
    per_kv = idx.reshape(b, kv, g * a)
    rows = jax.vmap(jax.vmap(gather_rows))
    k_sel = rows(k_rest, per_kv).reshape(b, kv, g, a, -1).astype(jnp.float32)
    v_sel = rows(v, per_kv).reshape(b, kv, g, a, -1).astype(jnp.float32)
    q = q_rest.reshape(b, kv, g, -1).astype(jnp.float32)
    gate = jnp.einsum("bkgr,bkgar->bkga", q, k_sel)
    weights = p.reshape(b, kv, g, a) * jax.nn.softplus(gate)
    out = jnp.einsum("bkga,bkgah->bkgh", weights, v_sel)
    return out.reshape(b, n, -1)
