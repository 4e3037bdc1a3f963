"""Statistical top-k: fused row moments and threshold over the last axis."""

from pallas_kernels.stat_topk.api import statistical_topk
from pallas_kernels.stat_topk.block_sizes import BlockSizes

__all__ = ["BlockSizes", "statistical_topk"]
