"""Spark attention from given predictor scores as a native CPU kernel (FFI
``sparse_jax_spark_scored_attention``).

Per row (one query head's scores over its kv head's keys): the moments of the valid scores in
float64, the threshold, then one pass over the kept keys only, reading their ``k_rest`` and
``v`` rows. Rows are split over XLA's CPU threads in fixed chunks, each computed by one
thread, so results do not depend on the thread count. ``k_rest`` and ``v`` are float32 or
bfloat16, everything else float32. No capacity: any number of kept keys is gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _native


def spark_scored_attention(scores, q_rest, k_rest, v, *, top_k: int):
    """See :func:`pallas_kernels.scored_attention.reference.spark_scored_attention`."""
    _native.prepare(k_rest=k_rest, v=v)
    f32 = jnp.float32
    out = (
        jax.ShapeDtypeStruct((*scores.shape[:-1], v.shape[-1]), f32),
        jax.ShapeDtypeStruct(scores.shape[:-1], f32),
    )
    call = jax.ffi.ffi_call("sparse_jax_spark_scored_attention", out, vmap_method="broadcast_all")
    return call(scores.astype(f32), q_rest.astype(f32), k_rest, v, top_k=np.int64(top_k))
