"""One decode step's attention as native CPU kernels (FFI ``sparse_jax_spark_decode_attention``
and ``sparse_jax_dense_decode_attention``).

Per row and kv head, the cached keys are scored in chunks of 512 slots over XLA's CPU threads
(empty, future and out-of-window slots are not read), then per query head: dense, the softmax
and the weighted sum of the values (chunk partial sums added in chunk order); Spark, the
moments of the valid predictor scores (in float64), the threshold, and a pass over the kept
keys only, reading their ``k_rest`` and ``v`` rows. The kept keys are not limited in number:
there is no capacity to overflow. Caches are float32 or bfloat16, everything else float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _native


def _cap(softcap: float | None) -> np.float32:
    return np.float32(0.0 if softcap is None else softcap)


def _call(target: str, q: jax.Array, v: jax.Array, arrays: tuple, q_pos, window, **attrs):
    """The FFI call: out [B, N, H] and the per-head key count [B, N], both float32. The
    query positions and the window (a scalar) become [B] int32 rows, so that under vmap
    (``broadcast_all``) they carry the mapped axis like every other operand."""
    b, n = q.shape[:2]
    rows = (
        q_pos.astype(jnp.int32).reshape(b),
        jnp.broadcast_to(jnp.asarray(window, jnp.int32), (b,)),
    )
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((b, n, v.shape[-1]), f32), jax.ShapeDtypeStruct((b, n), f32))
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
    return call(*arrays, *rows, **attrs)


def spark_decode_attention(
    q_pred, q_rest, k_pred, k_rest, v, pos, new_k_pred, new_k_rest, new_v, q_pos, window,
    *, top_k: int, softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """See :func:`pallas_kernels.decode_attention.reference.spark_decode_attention`."""
    _native.prepare(k_pred=k_pred, k_rest=k_rest, v=v)
    f32 = jnp.float32
    arrays = (
        q_pred.astype(f32), q_rest.astype(f32), k_pred, k_rest, v, pos.astype(jnp.int32),
        new_k_pred.astype(f32), new_k_rest.astype(f32), new_v.astype(f32),
    )  # fmt: skip
    return _call(
        "sparse_jax_spark_decode_attention", q_pred, v, arrays, q_pos, window,
        top_k=np.int64(top_k), softcap=_cap(softcap),
    )  # fmt: skip


def dense_decode_attention(
    q, k, v, pos, new_k, new_v, q_pos, window, *, softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """See :func:`pallas_kernels.decode_attention.reference.dense_decode_attention`."""
    _native.prepare(k=k, v=v)
    f32 = jnp.float32
    arrays = (
        q.astype(f32), k, v, pos.astype(jnp.int32), new_k.astype(f32), new_v.astype(f32),
    )  # fmt: skip
    return _call(
        "sparse_jax_dense_decode_attention", q, v, arrays, q_pos, window, softcap=_cap(softcap)
    )
