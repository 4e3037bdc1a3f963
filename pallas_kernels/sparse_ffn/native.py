"""The decode-time sparse FFN as a native CPU kernel (FFI custom call ``sparse_jax_sparse_ffn``).

Per token, one pass over the selected rows of K2 (a dot product each) and one over the same
rows of V (their weighted sum), split over XLA's CPU threads; float32 or bfloat16 weights,
float32 accumulation. Padding slots (``h == 0``) read no row. Indices are clamped into
``[0, F)``, so an out-of-range index reads an edge row, never outside the table.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _native


def sparse_ffn(
    h: jax.Array, idx: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array
) -> jax.Array:
    """``y[b] = sum_a h[b, a] * (k2[idx[b, a]] . x_rest[b]) * v[idx[b, a]]`` -> [B, D] float32.

    k2 and v share one dtype, float32 or bfloat16.
    """
    _native.prepare(k2=k2, v=v)
    out = jax.ShapeDtypeStruct((*h.shape[:-1], v.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call("sparse_jax_sparse_ffn", out, vmap_method="expand_dims")
    return call(h.astype(jnp.float32), idx.astype(jnp.int32), x_rest.astype(jnp.float32), k2, v)


def sparse_ffn_block(act: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array) -> jax.Array:
    """``y[m] = sum_{i: act[m, i] != 0} act[m, i] * (k2[i] . x_rest[m]) * v[i]`` -> [M, D] f32.

    The prefill form (FFI custom call ``sparse_jax_sparse_ffn_block``): a block's tokens are
    grouped by neuron, so each active neuron's K2 and V rows are read once for all of its
    tokens, and only the active (token, neuron) pairs are computed. act is the masked form's
    [M, F] activations (zeros where a neuron is off); k2 and v share one dtype, float32 or
    bfloat16. The sum over neurons runs in neuron order: the same bits whatever the thread
    count.
    """
    _native.prepare(k2=k2, v=v)
    out = jax.ShapeDtypeStruct((*act.shape[:-1], v.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call("sparse_jax_sparse_ffn_block", out, vmap_method="sequential")
    return call(act.astype(jnp.float32), x_rest.astype(jnp.float32), k2, v)


def spark_ffn_block(
    pre: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array, *, keep_count: int
) -> tuple[jax.Array, jax.Array]:
    """The Spark FFN of a block of tokens from its pre-activations pre [M, F] (``K1 . x[:R]``):
    per token the statistical top-k's soft threshold ``theta = min(mean + z * std, max)`` with
    ``z = Phi^-1(1 - keep_count / F)``, then :func:`sparse_ffn_block` of the activations
    ``gelu(pre - theta)`` of the neurons above theta, in one FFI custom call
    (``sparse_jax_spark_ffn_block``: the [M, F] activations are never written out).

    Returns y [M, D] float32 and the active neurons per token [M] float32.
    """
    if not 0 < keep_count < pre.shape[-1]:
        raise ValueError(f"keep_count={keep_count} must be in (0, F={pre.shape[-1]})")
    _native.prepare(k2=k2, v=v)
    out = (
        jax.ShapeDtypeStruct((*pre.shape[:-1], v.shape[-1]), jnp.float32),
        jax.ShapeDtypeStruct(pre.shape[:-1], jnp.float32),
    )
    call = jax.ffi.ffi_call("sparse_jax_spark_ffn_block", out, vmap_method="sequential")
    return call(
        pre.astype(jnp.float32), x_rest.astype(jnp.float32), k2, v, keep_count=np.int64(keep_count)
    )
