"""Statistical top-k as a Pallas Triton kernel: a block of rows per program.

Triton tensors must have power-of-two sizes, so each program walks its rows in column chunks
of ``BlockSizes.columns`` with masked loads: one pass for the largest valid entry and the valid
count, one for the sums of the row shifted by that entry (mean and second moment without
cancellation), one to write the output, so each row is read three times. theta is capped at
the largest valid entry, as in the reference.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.stat_topk import threshold
from pallas_kernels.stat_topk.block_sizes import BlockSizes


def _topk_kernel(*refs, k: int, z: float | None, form: str, d: int, rows: int, columns: int):
    """Kernel body. Refs (whole arrays in global memory): x [M, d], (valid int8), out."""
    masked = len(refs) == 3
    x_ref, o_ref = refs[0], refs[-1]
    row_ids = pl.program_id(0) * rows + jnp.arange(rows)

    def chunk(c):
        cols = c * columns + jnp.arange(columns)
        in_row = jnp.broadcast_to(cols[None, :] < d, (rows, columns))
        index = (
            jnp.broadcast_to(row_ids[:, None], (rows, columns)),
            jnp.broadcast_to(cols[None, :], (rows, columns)),
        )
        x = pltriton.load(x_ref.at[index], mask=in_row, other=0.0)
        valid = in_row
        if masked:
            valid = in_row & (pltriton.load(refs[1].at[index], mask=in_row, other=0) != 0)
        return index, in_row, x, valid

    num_chunks = pl.cdiv(d, columns)

    # Pass 1: the largest valid entry and the count; pass 2: sums of the row shifted by that
    # entry (no cancellation when the mean dwarfs the spread; a constant row comes out exact).
    def extremes(c, carry):
        top, count = carry
        _, _, x, valid = chunk(c)
        chunk_top = jnp.max(
            jnp.where(valid, x.astype(jnp.float32), -jnp.inf), axis=1, keepdims=True
        )
        count += jnp.sum(valid.astype(jnp.float32), axis=1, keepdims=True)
        return jnp.maximum(top, chunk_top), count

    zeros = jnp.zeros((rows, 1), jnp.float32)
    top, n = lax.fori_loop(0, num_chunks, extremes, (jnp.full((rows, 1), -jnp.inf), zeros))
    shift = jnp.where(n > 0, top, 0.0)

    def sums(c, carry):
        total, squares = carry
        _, _, x, valid = chunk(c)
        dev = jnp.where(valid, x.astype(jnp.float32) - shift, 0.0)
        total += jnp.sum(dev, axis=1, keepdims=True)
        squares += jnp.sum(dev * dev, axis=1, keepdims=True)
        return total, squares

    total, squares = lax.fori_loop(0, num_chunks, sums, (zeros, zeros))
    n_safe = jnp.maximum(n, 1.0)
    mean_dev = total / n_safe
    std = jnp.sqrt(jnp.maximum(squares / n_safe - mean_dev * mean_dev, 0.0))
    keep_all = n <= k
    theta = shift + mean_dev + (threshold.masked_z(n, k) if masked else z) * std
    theta = jnp.minimum(theta, top)

    def write(c, carry):
        index, in_row, x, valid = chunk(c)
        if masked:
            out = threshold.select(x, theta, form, valid=valid, keep_all=keep_all)
        else:
            out = threshold.select(x, theta, form)
        pltriton.store(o_ref.at[index], out, mask=in_row)
        return carry

    lax.fori_loop(0, num_chunks, write, 0)


def statistical_topk(
    x: jax.Array,
    k: int,
    *,
    valid: jax.Array | None,
    form: str,
    z: float | None,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:
    """Runs the kernel over [M, d] rows.

    Args:
      x: [M, d] input.
      k: target kept count, >= 1.
      valid: optional bool [M, d].
      form: ``"soft"`` or ``"mask"``.
      z: the unmasked quantile ``Phi^-1(1 - k/d)``; ignored when ``valid`` is given.
      block_sizes: ``rows`` rows per program, ``columns`` per inner-loop chunk.
      interpret: run in Pallas interpret mode.

    Returns:
      [M, d] in ``x.dtype``.
    """
    m, d = x.shape
    rows = block_sizes.rows
    m_pad = pl.cdiv(m, rows) * rows
    operands = [x]
    if valid is not None:
        operands.append(valid.astype(jnp.int8))
    # Padded rows are all-invalid (or zero) rows: finite moments, sliced off below.
    operands = [jnp.pad(a, ((0, m_pad - m), (0, 0))) for a in operands]
    kernel = functools.partial(
        _topk_kernel, k=k, z=z, form=form, d=d, rows=rows, columns=block_sizes.columns
    )
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // rows,),
        out_shape=jax.ShapeDtypeStruct((m_pad, d), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="stat_topk_gpu",
    )(*operands)
    return out[:m]
