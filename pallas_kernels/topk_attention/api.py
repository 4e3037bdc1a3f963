"""Public entry point of decode attention over selected keys: validation, dispatch, sharding.

Forward only (decode). The ``"xla"`` implementation is the op's ``xla`` module, the one the
model runs on CPU; ``reference`` is only the oracle the tests compare every implementation
against.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels._common import dispatch, sharding
from pallas_kernels.topk_attention import native, pallas_gpu, pallas_tpu, xla
from pallas_kernels.topk_attention.block_sizes import BlockSizes

_KERNELS = {"pallas_tpu": pallas_tpu.topk_attention, "pallas_gpu": pallas_gpu.topk_attention}


def _check_shapes(q_rest, p, idx, k_rest, v) -> None:
    if q_rest.ndim != 3:
        raise ValueError(f"q_rest must be [B, N, H-R], got {q_rest.shape}")
    batch, num_heads, rest = q_rest.shape
    if p.ndim != 3 or p.shape[:2] != (batch, num_heads) or idx.shape != p.shape:
        raise ValueError(
            f"p and idx must both be [B, N, A] with B, N = {batch}, {num_heads}; "
            f"got {p.shape} and {idx.shape}"
        )
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must be an integer array, got {idx.dtype}")
    if k_rest.ndim != 4 or k_rest.shape[0] != batch or k_rest.shape[3] != rest:
        raise ValueError(
            f"k_rest must be [B, K, S, H-R] with B={batch}, H-R={rest}; got {k_rest.shape}"
        )
    if v.ndim != 4 or v.shape[:3] != k_rest.shape[:3]:
        raise ValueError(f"v must be [B, K, S, H] with B, K, S = {k_rest.shape[:3]}, got {v.shape}")
    if num_heads % k_rest.shape[1]:
        raise ValueError(f"N={num_heads} query heads must be a multiple of K={k_rest.shape[1]}")


def topk_attention(
    q_rest: jax.Array,
    p: jax.Array,
    idx: jax.Array,
    k_rest: jax.Array,
    v: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data",),
    head_axis: str | None = "tensor",
) -> jax.Array:
    """``out[b, n] = sum_a p * softplus(q_rest . k_rest[b, kv, idx]) * v[b, kv, idx]``.

    Query head n reads kv head ``kv = n // (N // K)``.

    Args:
      q_rest: [B, N, H-R] non-predictor half of each query, already scaled and rotated.
      p: [B, N, A] softmax weights over the selected keys from the predictor scores; 0 on
        padding slots.
      idx: int [B, N, A] selected key positions in [0, S); a padding slot may repeat any
        valid position (its p is 0). Out-of-range positions are not checked.
      k_rest: [B, K, S, H-R] contiguous cache of the non-predictor halves of the keys.
      v: [B, K, S, H] contiguous value cache.
      implementation: ``"auto"``, ``"xla"`` (the ``xla`` module), ``"native"`` (the C++
        kernel on CPU, float32 or bfloat16 k_rest and v of one dtype), ``"pallas_tpu"`` or
        ``"pallas_gpu"``.
      interpret: run the requested Pallas implementation in Pallas interpret mode (any
        backend); needs ``implementation`` ``"pallas_tpu"`` or ``"pallas_gpu"``.
      block_sizes: kernel tiling; ``BlockSizes()`` when None. Ignored by ``"xla"``.
      mesh: when given, runs under ``jax.shard_map`` with B split over ``batch_axes`` and
        both head axes (N and K) split over ``head_axis``; the split must keep whole GQA
        groups on each shard, which holds when it divides K.
      batch_axes: mesh axes that split B; used only with ``mesh``.
      head_axis: mesh axis that splits N and K, or None to replicate heads.

    Returns:
      [B, N, H] in ``result_type(q_rest, v)``, accumulated in float32.

    Raises:
      ValueError: inconsistent shapes, a non-integer ``idx``, a bad ``implementation`` or
        mesh axes.
      dispatch.ImplementationUnavailableError: a Pallas implementation that cannot run here.
    """
    _check_shapes(q_rest, p, idx, k_rest, v)
    name = dispatch.resolve_implementation(implementation, interpret)
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    out_dtype = jnp.result_type(q_rest, v)

    def xla_forward(*arrays):
        return xla.topk_attention(*arrays).astype(out_dtype)

    def native_forward(*arrays):
        return native.topk_attention(*arrays).astype(out_dtype)

    kernels = {**_KERNELS, "native": native_forward}
    forward = dispatch.forward_of(name, xla_forward, kernels, block_sizes, interpret)
    if mesh is not None:
        sharding.check_mesh_axes(mesh, (*batch_axes, head_axis), "batch_axes/head_axis")
        spec = PartitionSpec(sharding.batch_entry(batch_axes), head_axis)
        forward = sharding.maybe_shard_map(forward, mesh, (spec,) * 5, spec)
    return forward(q_rest, p, idx.astype(jnp.int32), k_rest, v)
