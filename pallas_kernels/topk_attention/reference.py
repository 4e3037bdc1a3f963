"""Readable jnp decode attention over selected keys: the oracle for the kernels.

Query head n reads kv head ``n // (N // K)`` (GQA). ``out[b, n] = sum_a p[b, n, a] *
softplus(q_rest[b, n] . k_rest[b, kv, idx[b, n, a]]) * v[b, kv, idx[b, n, a]]``, where
``p`` are the softmax weights over the selected keys from the predictor scores.
Einsum letter c stands for the H - R non-predictor head dims.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def topk_attention(
    q_rest: jax.Array, p: jax.Array, idx: jax.Array, k_rest: jax.Array, v: jax.Array
) -> jax.Array:
    """Attention output from the selected keys.

    Args:
      q_rest: [B, N, H-R] non-predictor half of each query (scaled and rotated).
      p: [B, N, A] softmax weights over the selected keys (0 on padding slots).
      idx: int [B, N, A] selected key positions in [0, S).
      k_rest: [B, K, S, H-R] cache of the non-predictor halves of the keys.
      v: [B, K, S, H] value cache.

    Returns:
      [B, N, H] in ``result_type(q_rest, v)``, computed in float32.
    """
    f32 = jnp.float32
    batch, num_heads = q_rest.shape[:2]
    group = num_heads // k_rest.shape[1]
    b = jnp.arange(batch)[:, None, None]
    kv = (jnp.arange(num_heads) // group)[None, :, None]
    keys = k_rest[b, kv, idx].astype(f32)  # [B, N, A, H-R]
    values = v[b, kv, idx].astype(f32)  # [B, N, A, H]
    scores = jnp.einsum("bnac,bnc->bna", keys, q_rest.astype(f32), precision=_HIGHEST)
    weights = p.astype(f32) * jax.nn.softplus(scores)
    out = jnp.einsum("bna,bnah->bnh", weights, values, precision=_HIGHEST)
    return out.astype(jnp.result_type(q_rest, v))
