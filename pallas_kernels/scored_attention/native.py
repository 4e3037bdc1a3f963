"""Spark attention from raw predictor scores as a native CPU kernel (FFI
``sparse_jax_spark_scored_attention``).

Per query head and query (a row of scores over its kv head's keys): the soft-cap and the
positions' mask in vector lanes, the moments of the valid scores (float32 lanes in blocks,
summed in float64), the threshold, then the kept keys only, reading their ``k_rest`` and ``v``
rows. A group of rows of one kv head visits the key table in blocks that stay in the core's
cache, so a kept key's rows come from memory about once per group. Rows are split over XLA's
CPU threads and each is computed in a fixed order, so results do not depend on the thread
count. ``k_rest`` and ``v`` are float32 or bfloat16, everything else float32. No capacity:
any number of kept keys is gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _native


def spark_scored_attention(
    scores, q_rest, k_rest, v, q_pos, k_pos, window, *, top_k: int, softcap: float | None = None
):
    """See :func:`pallas_kernels.scored_attention.reference.spark_scored_attention`."""
    _native.prepare(k_rest=k_rest, v=v)
    f32, i32 = jnp.float32, jnp.int32
    b = scores.shape[0]
    out = (
        jax.ShapeDtypeStruct((*scores.shape[:-1], v.shape[-1]), f32),
        jax.ShapeDtypeStruct(scores.shape[:-1], f32),
    )
    call = jax.ffi.ffi_call("sparse_jax_spark_scored_attention", out, vmap_method="broadcast_all")
    return call(
        scores.astype(f32),
        q_rest.astype(f32),
        k_rest,
        v,
        q_pos.astype(i32),
        k_pos.astype(i32),
        jnp.broadcast_to(jnp.asarray(window, i32), (b,)),  # per row, so vmap maps it too
        top_k=np.int64(top_k),
        softcap=np.float32(0.0 if softcap is None else softcap),
    )
