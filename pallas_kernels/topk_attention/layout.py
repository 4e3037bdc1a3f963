"""Flattening a GQA KV cache so that one selected key is one row of a 2-D array.

The row-gather kernels see queries as [B*N, ...] rows and the caches as [B*K*S, ...] rows;
the row id of key ``idx`` for query head n of batch b is ``(b*K + n // (N//K)) * S + idx``.
Both reshapes are free (contiguous).
"""

import jax
import jax.numpy as jnp


def flatten(
    q_rest: jax.Array, p: jax.Array, idx: jax.Array, k_rest: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Maps the attention operands to the row-gather kernel's operands.

    Args:
      q_rest: [B, N, H-R]; p: [B, N, A]; idx: int [B, N, A]; k_rest: [B, K, S, H-R];
        v: [B, K, S, H].

    Returns:
      ``(w, rows, query, keys, values)``: [B*N, A] weights, int32 [B*N, A] row ids,
      [B*N, H-R] queries, [B*K*S, H-R] keys and [B*K*S, H] values.
    """
    batch, num_heads, selected = p.shape
    num_kv, seq = k_rest.shape[1:3]
    kv = jnp.arange(num_heads, dtype=jnp.int32) // (num_heads // num_kv)
    base = (jnp.arange(batch, dtype=jnp.int32)[:, None] * num_kv + kv[None, :]) * seq
    rows = base[:, :, None] + idx.astype(jnp.int32)
    return (
        p.reshape(batch * num_heads, selected),
        rows.reshape(batch * num_heads, selected),
        q_rest.reshape(batch * num_heads, -1),
        k_rest.reshape(batch * num_kv * seq, -1),
        v.reshape(batch * num_kv * seq, -1),
    )
