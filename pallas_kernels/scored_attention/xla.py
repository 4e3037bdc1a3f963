"""Spark attention from raw predictor scores in XLA: the portable form of the native kernel.

Same contract as :mod:`pallas_kernels.scored_attention.reference`; the threshold is the
library's statistical top-k (:func:`pallas_kernels.stat_topk.xla.statistical_threshold`) and
the gate and value products are batched per kv head, in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.xla import kept_softmax
from pallas_kernels.scored_attention.reference import valid_keys
from pallas_kernels.stat_topk.xla import statistical_threshold


def spark_scored_attention(
    scores, q_rest, k_rest, v, q_pos, k_pos, window, *, top_k: int, softcap: float | None = None
):
    """See :func:`pallas_kernels.scored_attention.reference.spark_scored_attention`."""
    s = scores.astype(jnp.float32)
    s = s if softcap is None else softcap * jnp.tanh(s / softcap)
    valid = valid_keys(q_pos, k_pos, window)
    theta, keep_all = statistical_threshold(s, top_k, valid=valid)
    keep = valid & (keep_all | (s >= theta))
    f32 = jnp.float32  # bfloat16 keys and values are promoted, as the native kernel reads them
    gate = jnp.einsum("bkgtc,bksc->bkgts", q_rest.astype(f32), k_rest.astype(f32))
    weights = kept_softmax(s, keep) * jax.nn.softplus(gate)
    out = jnp.einsum("bkgts,bksh->bkgth", weights, v.astype(f32))
    return out, jnp.sum(keep, axis=-1, dtype=jnp.float32)
