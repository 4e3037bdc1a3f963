"""Pallas kernels of the Spark Transformer, one package per op.

Each op package holds ``api.py`` (validation, dispatch over ``xla`` / ``pallas_tpu`` /
``pallas_gpu``, optional ``shard_map``), ``xla.py`` (the XLA implementation the model runs
on CPU), ``reference.py`` (the readable jnp oracle the tests hold every implementation to),
``pallas_tpu.py`` and ``pallas_gpu.py`` (wrappers around kernel bodies) and a frozen
``BlockSizes``. The row-gather kernels shared by the FFN and attention live in ``_common``.
"""

from pallas_kernels._common.dispatch import IMPLEMENTATIONS, ImplementationUnavailableError
from pallas_kernels.sparse_ffn import sparse_ffn
from pallas_kernels.stat_topk import statistical_topk
from pallas_kernels.topk_attention import topk_attention

__all__ = [
    "IMPLEMENTATIONS",
    "ImplementationUnavailableError",
    "sparse_ffn",
    "statistical_topk",
    "topk_attention",
]
