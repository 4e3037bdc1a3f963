"""Decode attention over selected keys (GQA, contiguous KV cache)."""

from pallas_kernels.topk_attention.api import topk_attention
from pallas_kernels.topk_attention.block_sizes import BlockSizes

__all__ = ["BlockSizes", "topk_attention"]
