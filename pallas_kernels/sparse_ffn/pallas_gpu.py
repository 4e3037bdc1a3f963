"""Sparse FFN on GPU: the shared Triton row-gather kernels with identity scores.

One launch gathers K2 rows and forms ``h * (k2_row . x_rest)``, a second gathers V rows per
block of output columns (see ``pallas_kernels._common.gather_gpu``).
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import gather_gpu
from pallas_kernels.sparse_ffn.block_sizes import BlockSizes


def sparse_ffn(
    h: jax.Array,
    idx: jax.Array,
    x_rest: jax.Array,
    k2: jax.Array,
    v: jax.Array,
    *,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:
    """Shapes as in ``reference.sparse_ffn``; returns [B, D] in ``result_type(x_rest, v)``."""
    return gather_gpu.gather_rows(
        h,
        idx,
        x_rest,
        k2,
        v,
        activation="identity",
        block_a=block_sizes.selected,
        columns=block_sizes.columns,
        out_dtype=jnp.result_type(x_rest, v),
        interpret=interpret,
        name="sparse_ffn_gpu",
    )
