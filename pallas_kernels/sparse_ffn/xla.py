"""The decode-time sparse FFN in XLA: the implementation the model runs on CPU.

Row gathers of the selected neurons of K2 and V (one neuron per contiguous row), then two
float32 contractions; the result stays float32 for the residual stream.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common.rows import gather_rows


def sparse_ffn(
    h: jax.Array, idx: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array
) -> jax.Array:
    """``y[b] = sum_a h[b, a] * (k2[idx[b, a]] . x_rest[b]) * v[idx[b, a]]``, per token.

    Args:
      h: [B, A] activations at the selected neurons; 0 on padding slots.
      idx: int32 [B, A] neuron indices in [0, F).
      x_rest: [B, D-R] input dims after the predictor width.
      k2: [F, D-R] value-branch weights, one neuron per row.
      v: [F, D] down projection, one neuron per row.

    Returns:
      [B, D] float32.
    """
    k2_rows = gather_rows(k2, idx).astype(jnp.float32)
    value = jnp.einsum("bad,bd->ba", k2_rows, x_rest.astype(jnp.float32))
    v_rows = gather_rows(v, idx).astype(jnp.float32)
    return jnp.einsum("ba,bad->bd", h * value, v_rows)
