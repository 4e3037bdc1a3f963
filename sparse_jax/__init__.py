"""sparse_jax: the Spark Transformer (sparse FFN and attention by statistical top-k) in JAX."""

from pallas_kernels.stat_topk.xla import (
    statistical_threshold,
    statistical_topk,
    statistical_topk_mask,
)
from sparse_jax.config import ModelConfig, override
from sparse_jax.kernels import Kernels
from sparse_jax.loading import LoadedModel, load
from sparse_jax.model import Transformer, abstract_params, count_params, forward, init_params
from sparse_jax.sharding import ShardingPlan, ShardingRules, make_mesh

__all__ = [
    "Kernels",
    "LoadedModel",
    "ModelConfig",
    "ShardingPlan",
    "ShardingRules",
    "Transformer",
    "abstract_params",
    "count_params",
    "forward",
    "init_params",
    "load",
    "make_mesh",
    "override",
    "statistical_threshold",
    "statistical_topk",
    "statistical_topk_mask",
]
