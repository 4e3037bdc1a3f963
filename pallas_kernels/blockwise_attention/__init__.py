"""Blockwise (flash-style) dense and Spark attention for training and prefill: O(T x block)
memory, gradients by a blockwise backward. ``xla``: a scan over blocks (any backend);
``pallas_tpu`` / ``pallas_gpu``: Pallas kernels (``pallas.py`` glues them into one
``custom_vjp``); ``reference``: the materialized oracle."""

from pallas_kernels.blockwise_attention.api import blockwise_attention

__all__ = ["blockwise_attention"]
