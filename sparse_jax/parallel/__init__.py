"""Parallelism: logical-axis sharding over a device mesh, and multi-process runs.

``sharding`` (logical axis names, :class:`ShardingRules`, :class:`ShardingPlan`, meshes) and
``distributed`` (joining JAX's distributed runtime, each process's rows of a batch).
"""

from sparse_jax.parallel.sharding import ShardingPlan, ShardingRules, make_mesh, parse_mesh

__all__ = ["ShardingPlan", "ShardingRules", "make_mesh", "parse_mesh"]
