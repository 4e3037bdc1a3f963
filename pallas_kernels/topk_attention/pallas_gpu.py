"""Top-k attention on GPU: the shared Triton row-gather kernels with softplus scores.

One launch gathers key rows and forms ``p * softplus(q_rest . k_rest_row)``, a second
gathers value rows per block of head dims (see ``pallas_kernels._common.gather_gpu``).
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import gather_gpu
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
    out = gather_gpu.gather_rows(
        w,
        rows,
        query,
        keys,
        values,
        activation="softplus",
        block_a=block_sizes.selected,
        columns=block_sizes.columns,
        out_dtype=jnp.result_type(q_rest, v),
        interpret=interpret,
        name="topk_attention_gpu",
    )
    return out.reshape((*p.shape[:2], v.shape[-1]))
