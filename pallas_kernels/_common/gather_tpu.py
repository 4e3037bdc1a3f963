"""Pallas TPU kernel for a weighted sum over gathered rows, shared by FFN and attention.

For each query row m: ``out[m] = sum_a w[m, a] * act(keys[rows[m, a]] . query[m]) *
values[rows[m, a]]``. The row ids go through scalar prefetch (SMEM, so ``M * A`` int32 must
fit there); keys and values stay in HBM and each grid step DMAs ``block_a`` selected rows of
each into VMEM, one row per DMA, double-buffered across the sequential A axis so the next
block's copies overlap this block's arithmetic. The M axis is parallel (megacore).

Unverified on hardware: this kernel has been lowered to Mosaic and run in TPU interpret
mode, never compiled by the TPU compiler. Row copies at any row offset are reported to be
legal for 32-bit rows; TPU tiles pack two bf16 rows into each 32-bit sublane word, so for
bf16 keys or values a one-row copy is a sub-word DMA that Mosaic may reject at compile time.

Letters local to this kernel: M query rows (B for the FFN, B*N for attention), C score width
(D-R or H-R), E output width (D or H).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import activations
from pallas_kernels._common.dispatch import tpu_interpret


def _row_copy(src_hbm, buf, sems, which: int, slot, row, r):
    return pltpu.make_async_copy(
        src_hbm.at[pl.ds(row, 1)], buf.at[slot, pl.ds(r, 1)], sems.at[which, slot]
    )


def _gather_kernel(
    rows_ref, w_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sems, acc, *, block_a, activation
):
    """Kernel body.

    Refs: rows int32 [M * A] (SMEM), w f32 [block_a, 1], query [1, C], keys [rows_k, C] (HBM),
    values [rows_v, E] (HBM), out [1, E]; scratch kbuf [2, block_a, C], vbuf [2, block_a, E],
    DMA semaphores [2, 2] (keys/values x slot), acc f32 [1, E].
    """
    m, j, num_blocks = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
    row_base = m * num_blocks * block_a

    def start_block(block, slot):
        def start_row(r, carry):
            row = rows_ref[row_base + block * block_a + r]
            _row_copy(k_hbm, kbuf, sems, 0, slot, row, r).start()
            _row_copy(v_hbm, vbuf, sems, 1, slot, row, r).start()
            return carry

        lax.fori_loop(0, block_a, start_row, 0)

    def wait_block(slot):
        # Every row copy signals the slot's semaphore; wait once per row with a same-shaped
        # descriptor.
        def wait_row(r, carry):
            _row_copy(k_hbm, kbuf, sems, 0, slot, 0, r).wait()
            _row_copy(v_hbm, vbuf, sems, 1, slot, 0, r).wait()
            return carry

        lax.fori_loop(0, block_a, wait_row, 0)

    @pl.when(j == 0)
    def _():
        acc[...] = jnp.zeros_like(acc)
        start_block(0, 0)

    slot = j % 2

    @pl.when(j + 1 < num_blocks)
    def _():
        start_block(j + 1, 1 - slot)

    wait_block(slot)
    keys = kbuf[slot].astype(jnp.float32)
    scores = jnp.sum(keys * q_ref[...].astype(jnp.float32), axis=-1, keepdims=True)
    weights = w_ref[...] * activations.apply(activation, scores)
    acc[...] += jnp.sum(weights * vbuf[slot].astype(jnp.float32), axis=0, keepdims=True)

    @pl.when(j == num_blocks - 1)
    def _():
        o_ref[...] = acc[...].astype(o_ref.dtype)


def gather_rows(
    w: jax.Array,
    rows: jax.Array,
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    *,
    activation: str,
    block_a: int,
    out_dtype: jnp.dtype,
    interpret: bool = False,
    name: str = "gather_rows_tpu",
) -> jax.Array:
    """Weighted sum over gathered rows.

    Args:
      w: [M, A] float weights (0 on padding slots).
      rows: int32 [M, A] row ids into ``keys`` and ``values``; each must be in range.
      query: [M, C] query rows.
      keys: [rows_k, C] key rows, one selectable row each.
      values: [rows_v, E] value rows.
      activation: one of ``activations.ACTIVATIONS``, applied to the scores.
      block_a: selected rows per grid step, a multiple of 8.
      out_dtype: dtype of the result.
      interpret: run in TPU interpret mode.
      name: kernel name in profiles.

    Returns:
      [M, E] in ``out_dtype``, accumulated in float32.
    """
    num_m, a = w.shape
    c, e = query.shape[-1], values.shape[-1]
    a_pad = pl.cdiv(a, block_a) * block_a
    # Padding slots get weight 0 and row 0, which every non-empty source has.
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, a_pad - a)))[..., None]
    rows = jnp.pad(rows.astype(jnp.int32), ((0, 0), (0, a_pad - a))).reshape(-1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(num_m, a_pad // block_a),
        in_specs=[
            pl.BlockSpec((None, block_a, 1), lambda m, j, rows_ref: (m, j, 0)),
            pl.BlockSpec((None, 1, c), lambda m, j, rows_ref: (m, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, 1, e), lambda m, j, rows_ref: (m, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, block_a, c), keys.dtype),
            pltpu.VMEM((2, block_a, e), values.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((1, e), jnp.float32),
        ],
    )
    kernel = functools.partial(_gather_kernel, block_a=block_a, activation=activation)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_m, 1, e), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
        name=name,
    )(rows, w, query[:, None, :], keys, values)
    return out[:, 0, :]
