"""Decode attention over selected keys as a native CPU kernel (FFI ``sparse_jax_topk_attention``).

One task per (row, query head) over XLA's CPU threads: for each selected slot, a dot product
with the cached non-predictor key half, its softplus gate, and the weighted value row added
to the output; float32 or bfloat16 caches, float32 accumulation. Padding slots (``p == 0``)
read nothing; slots are clamped into ``[0, S)``, never read outside the cache.
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _native


def topk_attention(
    q_rest: jax.Array, p: jax.Array, idx: jax.Array, k_rest: jax.Array, v: jax.Array
) -> jax.Array:
    """``out[b, n] = sum_a p * softplus(q_rest . k_rest[b, kv, idx]) * v[b, kv, idx]``.

    Shapes as :func:`pallas_kernels.topk_attention.xla.topk_attention`; k_rest and v share one
    dtype, float32 or bfloat16. Returns [B, N, H] float32.
    """
    _native.prepare(k_rest=k_rest, v=v)
    out = jax.ShapeDtypeStruct((*q_rest.shape[:-1], v.shape[-1]), jnp.float32)
    # Under vmap every operand gets the mapped axis, so the cache's rows stay the query rows.
    call = jax.ffi.ffi_call("sparse_jax_topk_attention", out, vmap_method="broadcast_all")
    return call(q_rest.astype(jnp.float32), p.astype(jnp.float32), idx.astype(jnp.int32), k_rest, v)
