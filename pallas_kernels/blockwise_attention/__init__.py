"""Blockwise (flash-style) dense and Spark attention for training and prefill: O(T x block)
memory, gradients by a blockwise backward. ``xla``: a scan over blocks (any backend)."""

from pallas_kernels.blockwise_attention.xla import blockwise_attention

__all__ = ["blockwise_attention"]
