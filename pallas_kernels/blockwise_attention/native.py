"""Spark attention over a sequence's own keys as native CPU kernels, forward and backward (FFI
``sparse_jax_spark_train_attention`` and ``sparse_jax_spark_train_attention_grad``).

Per query position, the query heads of a kv head score the keys in reach (the R-wide
predictor products, the soft-cap, the positions' mask), each head keeps the keys at or above
its statistical threshold (the moments as :mod:`pallas_kernels.scored_attention.native`
takes them), and only the kept keys' other half and values are read: the gate, softmax and
value work is O(T x kept) instead of O(T x S). The backward recomputes the scores and the
kept keys the same way and touches the kept keys only; no gradient flows through the
threshold. Nothing of size T x S is stored, so memory is O(T) besides the inputs.

The keys a query reaches are found by binary search when a row's key positions rise along
it with empty slots (-1) only at its end, as a sequence's own keys do; otherwise every key is
masked one by one. Query rows are split over XLA's CPU threads, each row computed by one
thread; the key gradients are summed in a fixed number of parts (fixed sets of query rows),
added in a fixed order, so no sum's order depends on how the threads share the work. Key
parts and values are float32 or bfloat16 (one dtype); everything else is computed in
float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _native


def supports(keys, v) -> bool:
    """Whether the kernels take these key parts and values (one dtype, float32 or bfloat16)."""
    dtypes = {x.dtype for x in (*keys, v)}
    return len(dtypes) == 1 and dtypes.pop() in (jnp.float32, jnp.bfloat16)


def _rows(x: jax.Array) -> jax.Array:
    """[B, K, G, T, W] -> [B, K, T, G, W] float32: a position's query heads side by side."""
    return jnp.swapaxes(x, 2, 3).astype(jnp.float32)


def _int_args(q_pos, k_pos, window, enabled):
    b = q_pos.shape[0]
    return (
        q_pos.astype(jnp.int32),
        k_pos.astype(jnp.int32),
        jnp.broadcast_to(jnp.asarray(window, jnp.int32), (b,)),
        jnp.broadcast_to(jnp.asarray(enabled, jnp.int32), (b,)),
    )


def _forward(q, keys, v, q_pos, k_pos, window, enabled, top_k, softcap):
    _native.prepare(k_pred=keys[0], k_rest=keys[1], v=v)
    b, kv, g, t, _ = q[0].shape
    f32 = jnp.float32
    out = (
        jax.ShapeDtypeStruct((b, kv, t, g, v.shape[-1]), f32),
        jax.ShapeDtypeStruct((b, kv, t, g), f32),
    )
    call = jax.ffi.ffi_call("sparse_jax_spark_train_attention", out, vmap_method="broadcast_all")
    out, kept = call(
        _rows(q[0]),
        _rows(q[1]),
        *keys,
        v,
        *_int_args(q_pos, k_pos, window, enabled),
        top_k=np.int64(top_k),
        softcap=np.float32(0.0 if softcap is None else softcap),
    )
    return jnp.swapaxes(out, 2, 3), jnp.swapaxes(kept, 2, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def attention(q, keys, v, q_pos, k_pos, window, enabled, top_k: int, softcap: float | None):
    """Spark attention of ``q = (q_pred, q_rest)`` [B, K, G, T, W] over ``keys = (k_pred,
    k_rest)`` [B, K, S, W] and ``v`` [B, K, S, H] (arguments as
    :func:`pallas_kernels.blockwise_attention.blockwise_attention` takes them, unpadded).

    Returns:
      out [B, K, G, T, H] float32 and the kept keys per query head [B, K, G, T] float32.
    """
    return _forward(q, keys, v, q_pos, k_pos, window, enabled, top_k, softcap)


def _attention_fwd(q, keys, v, q_pos, k_pos, window, enabled, top_k, softcap):
    out, kept = _forward(q, keys, v, q_pos, k_pos, window, enabled, top_k, softcap)
    return (out, kept), (q, keys, v, q_pos, k_pos, window, enabled, out)


def _attention_bwd(top_k, softcap, residuals, cotangents):
    q, keys, v, q_pos, k_pos, window, enabled, out = residuals
    d_out = cotangents[0].astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # d_out . out per query head
    b, kv, g, t, _ = q[0].shape
    s = v.shape[2]
    f32 = jnp.float32
    shapes = (
        jax.ShapeDtypeStruct((b, kv, t, g, q[0].shape[-1]), f32),
        jax.ShapeDtypeStruct((b, kv, t, g, q[1].shape[-1]), f32),
        jax.ShapeDtypeStruct((b, kv, s, keys[0].shape[-1]), f32),
        jax.ShapeDtypeStruct((b, kv, s, keys[1].shape[-1]), f32),
        jax.ShapeDtypeStruct((b, kv, s, v.shape[-1]), f32),
    )
    call = jax.ffi.ffi_call(
        "sparse_jax_spark_train_attention_grad", shapes, vmap_method="broadcast_all"
    )
    dq_pred, dq_rest, dk_pred, dk_rest, dv = call(
        _rows(q[0]),
        _rows(q[1]),
        *keys,
        v,
        *_int_args(q_pos, k_pos, window, enabled),
        jnp.swapaxes(d_out, 2, 3),
        jnp.swapaxes(delta, 2, 3),
        top_k=np.int64(top_k),
        softcap=np.float32(0.0 if softcap is None else softcap),
    )
    dq = tuple(
        jnp.swapaxes(d, 2, 3).astype(x.dtype) for d, x in zip((dq_pred, dq_rest), q, strict=True)
    )
    d_keys = tuple(d.astype(x.dtype) for d, x in zip((dk_pred, dk_rest), keys, strict=True))
    return dq, d_keys, dv.astype(v.dtype), None, None, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
