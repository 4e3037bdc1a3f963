"""Pallas Triton kernels for a weighted sum over gathered rows, shared by FFN and attention.

For each query row m: ``out[m] = sum_a w[m, a] * act(keys[rows[m, a]] . query[m]) *
values[rows[m, a]]``. Two launches so both phases have enough programs at batch 1: the
first gathers ``block_a`` key rows per program and writes the float32 weights
``w * act(score)``; the second owns ``columns`` output columns per program and gathers the
value rows block by block. Rows are gathered with pointer-array loads; columns beyond the
row width are masked, since Triton tensors must have power-of-two sizes.

Letters local to this kernel: M query rows (B for the FFN, B*N for attention), C score width
(D-R or H-R), E output width (D or H).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import activations


def _tile(row_ids: jax.Array, start, columns: int, width: int):
    """Index arrays and in-bounds mask of a [len(row_ids), columns] tile at column start."""
    cols = start + jnp.arange(columns)
    shape = (row_ids.shape[0], columns)
    index = (
        jnp.broadcast_to(row_ids[:, None], shape),
        jnp.broadcast_to(cols[None, :], shape),
    )
    return index, cols, jnp.broadcast_to(cols[None, :] < width, shape)


def _weights_kernel(rows_ref, w_ref, q_ref, k_ref, o_ref, *, block_a, columns, activation):
    """Refs (global memory): rows [M, A], w [M, A], query [M, C], keys [rows_k, C], out f32."""
    m = pl.program_id(0)
    sel = pl.ds(pl.program_id(1) * block_a, block_a)
    row_ids = rows_ref[m, sel]
    width = q_ref.shape[-1]

    def chunk(c, acc):
        index, cols, in_row = _tile(row_ids, c * columns, columns, width)
        keys = pltriton.load(k_ref.at[index], mask=in_row, other=0.0).astype(jnp.float32)
        query = pltriton.load(q_ref.at[m, cols], mask=cols < width, other=0.0)
        return acc + jnp.sum(keys * query.astype(jnp.float32)[None, :], axis=1)

    scores = lax.fori_loop(0, pl.cdiv(width, columns), chunk, jnp.zeros((block_a,), jnp.float32))
    o_ref[m, sel] = w_ref[m, sel].astype(jnp.float32) * activations.apply(activation, scores)


def _output_kernel(rows_ref, wt_ref, v_ref, o_ref, *, block_a, columns):
    """Refs (global memory): rows [M, A], weights f32 [M, A], values [rows_v, E], out [M, E]."""
    m = pl.program_id(0)
    start = pl.program_id(1) * columns
    width = v_ref.shape[-1]
    num_blocks = rows_ref.shape[-1] // block_a

    def block(i, acc):
        sel = pl.ds(i * block_a, block_a)
        index, _, in_row = _tile(rows_ref[m, sel], start, columns, width)
        values = pltriton.load(v_ref.at[index], mask=in_row, other=0.0).astype(jnp.float32)
        return acc + jnp.sum(wt_ref[m, sel][:, None] * values, axis=0)

    acc = lax.fori_loop(0, num_blocks, block, jnp.zeros((columns,), jnp.float32))
    cols = start + jnp.arange(columns)
    pltriton.store(o_ref.at[m, cols], acc.astype(o_ref.dtype), mask=cols < width)


def gather_rows(
    w: jax.Array,
    rows: jax.Array,
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    *,
    activation: str,
    block_a: int,
    columns: int,
    out_dtype: jnp.dtype,
    interpret: bool = False,
    name: str = "gather_rows_gpu",
) -> jax.Array:
    """Weighted sum over gathered rows.

    Args:
      w: [M, A] float weights (0 on padding slots).
      rows: int32 [M, A] row ids into ``keys`` and ``values``; each must be in range.
      query: [M, C] query rows.
      keys: [rows_k, C] key rows, one selectable row each.
      values: [rows_v, E] value rows.
      activation: one of ``activations.ACTIVATIONS``, applied to the scores.
      block_a: selected rows per program and per inner step, a power of two.
      columns: columns per chunk, a power of two.
      out_dtype: dtype of the result.
      interpret: run in Pallas interpret mode.
      name: kernel name prefix in profiles.

    Returns:
      [M, E] in ``out_dtype``, accumulated in float32.
    """
    num_m, a = w.shape
    e = values.shape[-1]
    a_pad = pl.cdiv(a, block_a) * block_a
    # Padding slots get weight 0 and row 0, which every non-empty source has.
    w = jnp.pad(w, ((0, 0), (0, a_pad - a)))
    rows = jnp.pad(rows.astype(jnp.int32), ((0, 0), (0, a_pad - a)))
    params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    weights = pl.pallas_call(
        functools.partial(_weights_kernel, block_a=block_a, columns=columns, activation=activation),
        grid=(num_m, a_pad // block_a),
        out_shape=jax.ShapeDtypeStruct((num_m, a_pad), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name=f"{name}_weights",
    )(rows, w, query, keys)
    return pl.pallas_call(
        functools.partial(_output_kernel, block_a=block_a, columns=columns),
        grid=(num_m, pl.cdiv(e, columns)),
        out_shape=jax.ShapeDtypeStruct((num_m, e), out_dtype),
        compiler_params=params,
        interpret=interpret,
        name=f"{name}_output",
    )(rows, weights, values)
