"""Wrapping a kernel call in ``jax.shard_map`` when the caller passes a mesh.

Pallas calls are opaque to the SPMD partitioner, so a sharded caller must run each kernel
per shard. Each op names which of its array axes are split (batch over ``batch_axes``,
heads over a tensor axis); without a mesh the kernel is called directly.
"""

from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec


def check_mesh_axes(mesh: Mesh, axes: Sequence[str | None], arg: str) -> None:
    """Raises ValueError if an axis named by argument ``arg`` is not an axis of ``mesh``."""
    missing = [a for a in axes if a is not None and a not in mesh.axis_names]
    if missing:
        raise ValueError(f"{arg} names axes {missing} that mesh does not have {mesh.axis_names}")


def batch_entry(batch_axes: Sequence[str]) -> str | tuple[str, ...] | None:
    """The PartitionSpec entry that splits one array axis over ``batch_axes``."""
    axes = tuple(batch_axes)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def maybe_shard_map(
    fn: Callable,
    mesh: Mesh | None,
    in_specs: tuple[PartitionSpec, ...],
    out_specs: PartitionSpec,
) -> Callable:
    """Returns ``fn`` run per shard over ``mesh``, or ``fn`` itself when ``mesh`` is None.

    ``check_vma=False`` because a ``pallas_call`` carries no varying-manual-axes annotations.
    """
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
