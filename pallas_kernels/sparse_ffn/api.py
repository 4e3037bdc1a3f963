"""Public entry point of the decode-time sparse FFN: validation, dispatch and sharding.

Forward only: this is the inference path over already-selected neurons (training computes
the Spark FFN densely with the mask). The ``"xla"`` implementation is the op's ``xla`` module,
the one the model runs on CPU; ``reference`` is only the oracle the tests compare every
implementation against.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels._common import dispatch, sharding
from pallas_kernels.sparse_ffn import native, pallas_gpu, pallas_tpu, xla
from pallas_kernels.sparse_ffn.block_sizes import BlockSizes

_KERNELS = {"pallas_tpu": pallas_tpu.sparse_ffn, "pallas_gpu": pallas_gpu.sparse_ffn}


def _check_shapes(h, idx, x_rest, k2, v) -> None:
    if h.ndim != 2 or idx.shape != h.shape:
        raise ValueError(f"h and idx must both be [B, A], got {h.shape} and {idx.shape}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must be an integer array, got {idx.dtype}")
    if x_rest.ndim != 2 or x_rest.shape[0] != h.shape[0]:
        raise ValueError(f"x_rest must be [B, D-R] with B={h.shape[0]}, got {x_rest.shape}")
    if k2.ndim != 2 or k2.shape[1] != x_rest.shape[1]:
        raise ValueError(f"k2 must be [F, D-R] with D-R={x_rest.shape[1]}, got {k2.shape}")
    if v.ndim != 2 or v.shape[0] != k2.shape[0]:
        raise ValueError(f"v must be [F, D] with F={k2.shape[0]}, got {v.shape}")


def sparse_ffn(
    h: jax.Array,
    idx: jax.Array,
    x_rest: jax.Array,
    k2: jax.Array,
    v: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data",),
) -> jax.Array:
    """``y[b] = sum_a h[b, a] * (k2[idx[b, a]] . x_rest[b]) * v[idx[b, a]]``.

    Args:
      h: [B, A] activated predictor values ``gelu(statistical_topk(...))`` at the selected
        neurons; 0 on padding slots.
      idx: int [B, A] neuron indices in [0, F); a padding slot may repeat any valid index
        (its h is 0). Out-of-range indices are not checked (traced values).
      x_rest: [B, D-R] input dims after the predictor width R.
      k2: [F, D-R] value-branch weights, one neuron per contiguous row (float32 or bf16).
      v: [F, D] down projection, one neuron per contiguous row (float32 or bf16).
      implementation: ``"auto"``, ``"xla"`` (the ``xla`` module), ``"native"`` (the C++
        kernel on CPU, float32 or bfloat16 k2 and v of one dtype), ``"pallas_tpu"`` or
        ``"pallas_gpu"``.
      interpret: run the requested Pallas implementation in Pallas interpret mode (any
        backend); needs ``implementation`` ``"pallas_tpu"`` or ``"pallas_gpu"``.
      block_sizes: kernel tiling; ``BlockSizes()`` when None. Ignored by ``"xla"``.
      mesh: when given, runs under ``jax.shard_map`` with B split over ``batch_axes`` and
        the weights replicated.
      batch_axes: mesh axes that split B; used only with ``mesh``.

    Returns:
      [B, D] in ``result_type(x_rest, v)``, accumulated in float32.

    Raises:
      ValueError: inconsistent shapes, a non-integer ``idx``, a bad ``implementation`` or
        mesh axes.
      dispatch.ImplementationUnavailableError: a Pallas implementation that cannot run here.
    """
    _check_shapes(h, idx, x_rest, k2, v)
    name = dispatch.resolve_implementation(implementation, interpret)
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    out_dtype = jnp.result_type(x_rest, v)

    def xla_forward(*arrays):
        return xla.sparse_ffn(*arrays).astype(out_dtype)

    def native_forward(*arrays):
        return native.sparse_ffn(*arrays).astype(out_dtype)

    kernels = {**_KERNELS, "native": native_forward}
    forward = dispatch.forward_of(name, xla_forward, kernels, block_sizes, interpret)
    if mesh is not None:
        sharding.check_mesh_axes(mesh, batch_axes, "batch_axes")
        batch = PartitionSpec(sharding.batch_entry(batch_axes))
        specs = (batch, batch, batch, PartitionSpec(), PartitionSpec())
        forward = sharding.maybe_shard_map(forward, mesh, specs, batch)
    return forward(h, idx.astype(jnp.int32), x_rest, k2, v)
