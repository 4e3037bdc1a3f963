"""Sparse FFN on TPU: the shared row-gather kernel with identity scores.

Neuron indices ride in SMEM through scalar prefetch and each selected row of K2 and V is
DMA'd from HBM (see ``pallas_kernels._common.gather_tpu``).
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import gather_tpu
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
    return gather_tpu.gather_rows(
        h,
        idx,
        x_rest,
        k2,
        v,
        activation="identity",
        block_a=block_sizes.selected,
        out_dtype=jnp.result_type(x_rest, v),
        interpret=interpret,
        name="sparse_ffn_tpu",
    )
