"""Public entry point of statistical top-k: validation, dispatch, sharding and the VJP.

``"xla"`` runs the op's ``xla`` module (the model's CPU path, with its own gradients). For
the Pallas kernels the backward is the VJP of the jnp reference (gradients through x, the
mean and the std), which costs one reference forward in the backward pass and is exact for
the reference's definition.
"""

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels._common import dispatch, sharding
from pallas_kernels.stat_topk import pallas_gpu, pallas_tpu, reference, xla
from pallas_kernels.stat_topk.block_sizes import BlockSizes

_KERNELS = {"pallas_tpu": pallas_tpu.statistical_topk, "pallas_gpu": pallas_gpu.statistical_topk}


def _with_reference_vjp(forward, k: int, form: str):
    @jax.custom_vjp
    def topk(x, valid):
        return forward(x, valid)

    def topk_fwd(x, valid):
        return forward(x, valid), (x, valid)

    def topk_bwd(residuals, g):
        x, valid = residuals
        _, vjp = jax.vjp(lambda x_: reference.statistical_topk(x_, k, valid=valid, form=form), x)
        return vjp(g)[0], None

    topk.defvjp(topk_fwd, topk_bwd)
    return topk


def statistical_topk(
    x: jax.Array,
    k: int,
    *,
    valid: jax.Array | None = None,
    form: str = "soft",
    implementation: str = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data",),
) -> jax.Array:
    """Statistical top-k over the last axis (see ``reference`` for the exact definition).

    Args:
      x: [..., d] float input; moments are taken in float32.
      k: target kept count per row, an int >= 1.
      valid: optional bool [..., d] (same shape as ``x``): moments, counts and the quantile
        use valid entries only; invalid entries give 0 (soft) or -inf (mask); rows with at
        most ``k`` valid entries keep all of them.
      form: ``"soft"`` (``max(x - theta, 0)``, the FFN form) or ``"mask"``
        (``where(x >= theta, x, -inf)``, the attention form).
      implementation: ``"auto"``, ``"xla"`` (the ``xla`` module), ``"pallas_tpu"`` or
        ``"pallas_gpu"``.
      interpret: run the requested Pallas implementation in Pallas interpret mode (any
        backend); needs ``implementation`` ``"pallas_tpu"`` or ``"pallas_gpu"``.
      block_sizes: kernel tiling; ``BlockSizes()`` when None. Ignored by ``"xla"``.
      mesh: when given, the call runs under ``jax.shard_map`` with axis 0 of ``x`` split
        over ``batch_axes`` and the reduced axis whole.
      batch_axes: mesh axes that split axis 0 of ``x``; used only with ``mesh``.

    Returns:
      [..., d] in ``x.dtype``. Differentiable in ``x`` (reference VJP).

    Raises:
      ValueError: bad ``k``, ``form``, ``valid`` shape, ``implementation`` or mesh axes.
      dispatch.ImplementationUnavailableError: a Pallas implementation that cannot run here.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if form not in reference.FORMS:
        raise ValueError(f"form must be one of {reference.FORMS}, got {form!r}")
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (the reduced last axis)")
    if valid is not None and valid.shape != x.shape:
        raise ValueError(f"valid must have x's shape {x.shape}, got {valid.shape}")
    name = dispatch.resolve_implementation(implementation, interpret)
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    d = x.shape[-1]
    if valid is None and k >= d:
        return x
    if valid is not None:
        valid = valid.astype(bool)

    if name in ("xla", "native"):  # no native kernel: XLA's
        xla_fn = xla.statistical_topk if form == "soft" else xla.statistical_topk_mask
        if mesh is None:
            return xla_fn(x, k, valid=valid)
        # The reduced axis stays whole on each shard, so the XLA code runs per shard as is.
        forward = sharding.maybe_shard_map(
            lambda x_, valid_: xla_fn(x_, k, valid=valid_),
            mesh,
            *_specs(x, valid, mesh, batch_axes),
        )
        return forward(x, valid)

    def forward(x_, valid_):
        rows = x_.reshape(-1, d)
        flat_valid = None if valid_ is None else valid_.reshape(-1, d)
        z = None if valid_ is not None else reference.quantile_z(k, d)
        out = _KERNELS[name](
            rows, k, valid=flat_valid, form=form, z=z, block_sizes=block_sizes, interpret=interpret
        )
        return out.reshape(x_.shape)

    if mesh is not None:
        forward = sharding.maybe_shard_map(forward, mesh, *_specs(x, valid, mesh, batch_axes))
    return _with_reference_vjp(forward, k, form)(x, valid)


def _specs(x, valid, mesh: Mesh, batch_axes: Sequence[str]):
    """(in_specs, out_spec) splitting axis 0 over ``batch_axes``, the reduced axis whole."""
    if x.ndim < 2:
        raise ValueError("with a mesh, x needs a leading batch axis besides the reduced one")
    sharding.check_mesh_axes(mesh, batch_axes, "batch_axes")
    spec = PartitionSpec(sharding.batch_entry(batch_axes))
    return (spec, None if valid is None else spec), spec
