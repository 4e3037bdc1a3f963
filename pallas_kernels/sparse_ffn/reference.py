"""Readable jnp decode-time Spark FFN over gathered neurons: the oracle for the kernels.

``y[b] = sum_a h[b, a] * (k2[idx[b, a]] . x_rest[b]) * v[idx[b, a]]``: the value branch
and the down projection touch only the selected rows of K2 [F, D-R] and V [F, D].
Einsum letter c stands for the D - R input dims after the predictor.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def sparse_ffn(
    h: jax.Array, idx: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array
) -> jax.Array:
    """Sparse FFN output from the selected neurons.

    Args:
      h: [B, A] activated predictor values at the selected neurons (0 on padding slots).
      idx: int [B, A] neuron indices into F.
      x_rest: [B, D-R] input dims after the predictor width R.
      k2: [F, D-R] value-branch weights, one neuron per row.
      v: [F, D] down projection, one neuron per row.

    Returns:
      [B, D] in ``result_type(x_rest, v)``, computed in float32.
    """
    f32 = jnp.float32
    scores = jnp.einsum("bac,bc->ba", k2[idx].astype(f32), x_rest.astype(f32), precision=_HIGHEST)
    weights = h.astype(f32) * scores
    y = jnp.einsum("ba,bad->bd", weights, v[idx].astype(f32), precision=_HIGHEST)
    return y.astype(jnp.result_type(x_rest, v))
