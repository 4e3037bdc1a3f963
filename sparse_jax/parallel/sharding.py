"""Logical axis names, the rules that map them onto a (data, fsdp, tensor) mesh, and the mesh.

Every parameter axis and every activation axis at a block boundary has a logical name
(``embed``, ``mlp``, ``heads``, ``batch`` ...). Each parameter's names are declared once, with
its shape and initialiser, in :mod:`sparse_jax.model.weights` (``LOGICAL_AXES``, by leaf name);
the scanned layer stack adds a leading ``layers`` axis.
:class:`ShardingRules` maps each logical name to zero or more mesh axes, and a
:class:`ShardingPlan` (a mesh plus rules) turns logical names into PartitionSpecs,
NamedShardings and sharding constraints. The defaults shard the batch over ``data`` and
``fsdp``, every weight's model dimension D over ``fsdp`` (fully sharded data parallel), and the
FFN width F, the query and kv heads and the vocabulary over ``tensor`` (Megatron-style tensor
parallel). A mesh axis that does not divide a dimension is left out of that dimension's spec
(the dimension is replicated over it), so one rules object serves every model size.

Mesh shapes are written ``data=2,fsdp=2,tensor=2`` (:func:`parse_mesh`); axes not named have
size 1, except ``data``, which takes the devices left over when it is not named; ``-1`` asks one
named axis to take them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The key of the scanned layer stack; its leaves get a leading "layers" axis.
SCANNED_KEY = "layers"

# Activations at block boundaries.
RESIDUAL = ("batch", "seq", "act_embed")  # [B, T, D]
FFN_HIDDEN = ("batch", "seq", "mlp")  # [B, T, F]
LOGITS = ("batch", "seq", "vocab")  # [B, T, V]
TOKENS = ("batch", "seq")  # [B, T]

MeshAxes = tuple[str, ...]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", ()),
    ("act_embed", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor", "fsdp")),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("norm", ()),
    ("layers", ()),
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axes (an empty tuple replicates the axis).

    Attributes:
      rules: ``(logical_name, mesh_axes)`` pairs; every logical name used by the model must
        appear once, and every mesh axis must be one of :data:`MESH_AXES`.
    """

    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        names = [name for name, _ in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"ShardingRules.rules names a logical axis twice: {names}")
        for name, axes in self.rules:
            if not isinstance(axes, tuple) or any(a not in MESH_AXES for a in axes):
                raise ValueError(
                    f"ShardingRules.rules[{name!r}]={axes!r} is invalid: must be a tuple of "
                    f"mesh axes from {MESH_AXES}"
                )

    def mesh_axes(self, logical: str) -> MeshAxes:
        """The mesh axes that ``logical`` is split over."""
        for name, axes in self.rules:
            if name == logical:
                return axes
        raise ValueError(
            f"logical axis {logical!r} has no sharding rule; known: {[n for n, _ in self.rules]}"
        )

    def spec(
        self, logical: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int]
    ) -> P:
        """The PartitionSpec of an array with these logical axes on a mesh of ``axis_sizes``.

        A logical axis of ``None`` is replicated.
        Mesh axes of size 1, axes already used by an earlier dimension, and axes whose size
        does not divide what is left of the dimension are skipped (that share is replicated).
        """
        if len(logical) != len(shape):
            raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
        used: set[str] = set()
        out: list[Any] = []
        for name, size in zip(logical, shape, strict=True):
            kept: list[str] = []
            for axis in () if name is None else self.mesh_axes(name):
                n = axis_sizes[axis]
                if n > 1 and axis not in used and size % (n * _product(kept, axis_sizes)) == 0:
                    kept.append(axis)
            used.update(kept)
            out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        while out and out[-1] is None:
            out.pop()
        return P(*out)


def _product(axes: Sequence[str], axis_sizes: Mapping[str, int]) -> int:
    return math.prod(axis_sizes[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh and the rules that place logical axes on it.

    Attributes:
      mesh: a mesh whose axis names are :data:`MESH_AXES` (see :func:`make_mesh`).
      rules: the logical-to-mesh mapping.
    """

    mesh: Mesh
    rules: ShardingRules = ShardingRules()

    def __post_init__(self) -> None:
        if tuple(self.mesh.axis_names) != MESH_AXES:
            raise ValueError(f"mesh axes {self.mesh.axis_names} must be {MESH_AXES}")

    def spec(self, logical: Sequence[str | None], shape: Sequence[int]) -> P:
        return self.rules.spec(logical, shape, self.mesh.shape)

    def sharding(self, logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_shards(self) -> int:
        """How many ways the batch axis is split (rows must divide evenly)."""
        return _product(self.rules.mesh_axes("batch"), self.mesh.shape)

    def constrain(self, x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        """``with_sharding_constraint`` of ``x`` to its logical axes."""
        return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape))

    def tree_shardings(self, tree: Any) -> Any:
        """NamedShardings for a tree of parameters (or arrays or ShapeDtypeStructs like them).

        Any tree that holds parameter-shaped leaves under the parameters' keys works, such as
        optimizer moments; scalars are replicated.
        """
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: self.sharding(logical_axes(path, leaf.shape), leaf.shape), tree
        )


def constrain(x: jax.Array, logical: Sequence[str | None], plan: ShardingPlan | None) -> jax.Array:
    """The one activation-sharding helper: a no-op without a plan (single device)."""
    return x if plan is None else plan.constrain(x, logical)


def logical_axes(path: Sequence[Any], shape: Sequence[int]) -> tuple[str, ...]:
    """Logical axes of the leaf at ``path`` (a ``jax.tree_util`` key path) with ``shape``."""
    if len(shape) == 0:
        return ()
    # Imported here: the model package imports this module for its activation constraints.
    from sparse_jax.model.weights import LOGICAL_AXES

    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    name = keys[-1] if keys else None
    if name not in LOGICAL_AXES:
        raise ValueError(
            f"no logical axes declared for {jax.tree_util.keystr(tuple(path))} with shape "
            f"{tuple(shape)}; describe the weight in sparse_jax.model.weights"
        )
    axes = LOGICAL_AXES[name]
    if SCANNED_KEY in keys:
        axes = ("layers", *axes)
    if len(axes) != len(shape):
        raise ValueError(
            f"{jax.tree_util.keystr(tuple(path))} has shape {tuple(shape)} but its logical "
            f"axes are {axes}"
        )
    return axes


def parse_mesh(text: str) -> dict[str, int]:
    """Parses ``"data=2,fsdp=2,tensor=2"`` into ``{axis: size}``; ``-1`` marks one free axis.

    Raises:
      ValueError: unknown axis, repeated axis, a size that is not an integer >= 1 or -1, or
        more than one -1.
    """
    sizes: dict[str, int] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq or name not in MESH_AXES:
            raise ValueError(
                f"mesh {text!r}: {item!r} must look like AXIS=SIZE with AXIS one of {MESH_AXES}"
            )
        if name in sizes:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 and size != -1:
            raise ValueError(f"mesh {text!r}: {name}={value!r} must be an integer >= 1 or -1")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh {text!r}: at most one axis may be -1")
    return sizes


def mesh_shape(text: str, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for ``text`` on ``num_devices`` devices.

    Raises:
      ValueError: a bad string, or sizes whose product is not ``num_devices``.
    """
    sizes = parse_mesh(text)
    if -1 not in sizes.values() and "data" not in sizes:
        sizes["data"] = -1
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for name, size in sizes.items():
        if size == -1:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {text!r}: the other axes ({fixed} devices) do not divide the "
                    f"{num_devices} available devices"
                )
            sizes[name] = num_devices // fixed
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {text!r} spans {math.prod(shape)} devices but {num_devices} are available; "
            "the product of the axis sizes must equal the device count"
        )
    return shape  # type: ignore[return-value]


def make_mesh(text: str = "", devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process).

    ``jax.make_mesh`` orders the devices for the hardware topology. With CPU devices the order
    is process by process, so the leading ``data`` and ``fsdp`` axes split across processes
    first and each process holds one contiguous block of batch rows
    (:func:`sparse_jax.parallel.distributed.process_rows` checks this for any mesh).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(text, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def describe_shardings(params: Any, rules: ShardingRules, axis_sizes: Mapping[str, int]) -> str:
    """A readable table of the parameters' layout on a mesh of ``axis_sizes``.

    One row per parameter: path, shape, logical axes, PartitionSpec and the shape of one
    device's shard. ``params`` may hold arrays or ShapeDtypeStructs; no device is needed.
    """
    rows = [("path", "shape", "logical_axes", "partition_spec", "shard_shape")]
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        axes = logical_axes(path, leaf.shape)
        spec = rules.spec(axes, leaf.shape, axis_sizes)
        entries = list(spec) + [None] * (len(leaf.shape) - len(spec))
        local = [
            size // _product(() if e is None else (e,) if isinstance(e, str) else e, axis_sizes)
            for size, e in zip(leaf.shape, entries, strict=True)
        ]
        rows.append(
            (
                "/".join(str(p.key) for p in path),
                "x".join(map(str, leaf.shape)),
                ",".join(axes) or "-",
                "P(" + ", ".join(repr(e) for e in spec) + ")",
                "x".join(map(str, local)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    mesh = ",".join(f"{a}={axis_sizes[a]}" for a in MESH_AXES)
    lines = [f"# mesh {mesh}"]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"
