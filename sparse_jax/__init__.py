"""sparse_jax: the Spark Transformer (sparse FFN and attention by statistical top-k) in JAX."""

from pallas_kernels.stat_topk.xla import (
    statistical_threshold,
    statistical_topk,
    statistical_topk_mask,
)
from sparse_jax.kernels import Kernels
from sparse_jax.model.config import ModelConfig, override
from sparse_jax.model.transformer import (
    Transformer,
    abstract_params,
    count_params,
    forward,
    init_params,
)
from sparse_jax.parallel.sharding import ShardingPlan, ShardingRules, make_mesh
from sparse_jax.serve.loading import LoadedModel, load

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
