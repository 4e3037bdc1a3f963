"""Statistical top-k as a Pallas TPU (Mosaic) kernel: whole rows in VMEM, one HBM read.

Each grid step loads a [rows, d] block, takes float32 row moments (the mean of the row shifted
by its largest valid entry, then the centred second moment, so no cancellation), forms the
threshold, capped at that largest entry as in the reference, and writes the soft or mask
output.
The reduced axis is never split, so d must fit VMEM next to the output block
(``rows * d * (in + out bytes)``, double-buffered).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common.dispatch import tpu_interpret
from pallas_kernels.stat_topk import threshold
from pallas_kernels.stat_topk.block_sizes import BlockSizes


def _topk_kernel(*refs, k: int, z: float | None, form: str, masked: bool):
    """Kernel body. Refs: x [rows, d], (valid int32 [rows, d]), out [rows, d]."""
    if masked:
        x_ref, valid_ref, o_ref = refs
        valid = valid_ref[...] != 0
    else:
        x_ref, o_ref = refs
        valid = None
    x = x_ref[...]
    xf = x.astype(jnp.float32)
    if valid is None:
        top = jnp.max(xf, axis=-1, keepdims=True)
        mean = top + jnp.mean(xf - top, axis=-1, keepdims=True)
        std = jnp.sqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True))
        o_ref[...] = threshold.select(x, jnp.minimum(mean + z * std, top), form)
        return
    n = jnp.sum(valid.astype(jnp.float32), axis=-1, keepdims=True)
    n_safe = jnp.maximum(n, 1.0)
    top = jnp.max(jnp.where(valid, xf, -jnp.inf), axis=-1, keepdims=True)
    shift = jnp.where(n > 0, top, 0.0)
    mean = shift + jnp.sum(jnp.where(valid, xf - shift, 0.0), axis=-1, keepdims=True) / n_safe
    var = jnp.sum(jnp.where(valid, jnp.square(xf - mean), 0.0), axis=-1, keepdims=True) / n_safe
    theta = jnp.minimum(mean + threshold.masked_z(n, k) * jnp.sqrt(var), top)
    o_ref[...] = threshold.select(x, theta, form, valid=valid, keep_all=n <= k)


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
      block_sizes: tiling; ``rows`` rows per grid step.
      interpret: run in TPU interpret mode.

    Returns:
      [M, d] in ``x.dtype``.
    """
    m, d = x.shape
    rows = block_sizes.rows
    m_pad = pl.cdiv(m, rows) * rows
    operands = [x]
    if valid is not None:
        operands.append(valid.astype(jnp.int32))
    # Padded rows are all-invalid (or zero) rows: finite moments, sliced off below.
    operands = [jnp.pad(a, ((0, m_pad - m), (0, 0))) for a in operands]
    block = pl.BlockSpec((rows, d), lambda i: (i, 0))
    kernel = functools.partial(_topk_kernel, k=k, z=z, form=form, masked=valid is not None)
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // rows,),
        in_specs=[block] * len(operands),
        out_specs=block,
        out_shape=jax.ShapeDtypeStruct((m_pad, d), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=tpu_interpret(interpret),
        name="stat_topk_tpu",
    )(*operands)
    return out[:m]
