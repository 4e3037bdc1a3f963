"""Decode-time Spark FFN over a gathered set of neurons."""

from pallas_kernels.sparse_ffn.api import sparse_ffn
from pallas_kernels.sparse_ffn.block_sizes import BlockSizes

__all__ = ["BlockSizes", "sparse_ffn"]
