"""Top-k attention on TPU: the shared row-gather kernel with softplus scores.

Key positions ride in SMEM through scalar prefetch and each selected row of the flattened
caches is DMA'd from HBM (see ``pallas_kernels._common.gather_tpu``).
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import gather_tpu
from pallas_kernels.topk_attention import layout
from pallas_kernels.topk_attention.block_sizes import BlockSizes


def topk_attention(
    q_rest: jax.Array,
    p: jax.Array,
    idx: jax.Array,
    k_rest: jax.Array,
    v: jax.Array,
    *,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:
    """Shapes as in ``reference.topk_attention``; returns [B, N, H]."""
    w, rows, query, keys, values = layout.flatten(q_rest, p, idx, k_rest, v)
    out = gather_tpu.gather_rows(
        w,
        rows,
        query,
        keys,
        values,
        activation="softplus",
        block_a=block_sizes.selected,
        out_dtype=jnp.result_type(q_rest, v),
        interpret=interpret,
        name="topk_attention_tpu",
    )
    return out.reshape((*p.shape[:2], v.shape[-1]))
