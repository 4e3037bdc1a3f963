"""Public entry points of one decode step's attention: validation and dispatch.

Forward only (decode). Implementations: ``"native"`` (the C++ kernels, CPU), ``"xla"`` (the
op's ``xla`` module) and ``"auto"`` (native where it runs, else XLA). On TPU and GPU the model
decodes through the gathered top-k attention kernels instead (:mod:`pallas_kernels.
topk_attention`), so the Pallas names are not accepted here.

Shapes: B rows, N query heads, K kv heads, S cache slots, R predictor dims, H head dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch
from pallas_kernels.decode_attention import native, xla

IMPLEMENTATIONS = ("auto", "xla", "native")


def _resolve(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"decode attention takes implementation in {IMPLEMENTATIONS}, got {implementation!r}"
        )
    name = dispatch.resolve_implementation(implementation, False)
    return name if name == "native" else "xla"


def _check(q_shapes, caches, pos, news, q_pos, window) -> None:
    (b, n, _), *_ = q_shapes
    for shape in q_shapes:
        if len(shape) != 3 or shape[:2] != (b, n):
            raise ValueError(f"queries must be [B, N, W] with B, N = {b}, {n}; got {shape}")
    k, s = caches[0].shape[1:3]
    if n % k:
        raise ValueError(f"N={n} query heads must be a multiple of K={k} kv heads")
    for q_shape, cache in zip(q_shapes, caches, strict=False):
        if cache.shape != (b, k, s, q_shape[2]):
            raise ValueError(
                f"a key cache must be [B, K, S, W] = {(b, k, s, q_shape[2])}, got {cache.shape}"
            )
    if caches[-1].ndim != 4 or caches[-1].shape[:3] != (b, k, s):
        raise ValueError(
            f"v must be [B, K, S, H] with B, K, S = {(b, k, s)}, got {caches[-1].shape}"
        )
    for new, cache in zip(news, caches, strict=False):
        if new.shape != (b, k, cache.shape[3]):
            raise ValueError(
                f"the token's own entries must be [B, K, W] = {(b, k, cache.shape[3])}, got "
                f"{new.shape}"
            )
    if pos.shape != (b, s) or not jnp.issubdtype(pos.dtype, jnp.integer):
        raise ValueError(f"pos must be integer [B, S] = {(b, s)}, got {pos.dtype} {pos.shape}")
    if q_pos.shape != (b,) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
        raise ValueError(f"q_pos must be integer [B] = {(b,)}, got {q_pos.dtype} {q_pos.shape}")
    if jnp.ndim(window) != 0:
        raise ValueError(f"window must be a scalar, got shape {jnp.shape(window)}")


def spark_decode_attention(
    q_pred: jax.Array,
    q_rest: jax.Array,
    k_pred: jax.Array,
    k_rest: jax.Array,
    v: jax.Array,
    pos: jax.Array,
    new_k_pred: jax.Array,
    new_k_rest: jax.Array,
    new_v: jax.Array,
    q_pos: jax.Array,
    window: jax.Array | int,
    *,
    top_k: int,
    softcap: float | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Spark attention of one query per row over its cache and its own key.

    Args:
      q_pred: [B, N, R] predictor half of each query, scaled and rotated.
      q_rest: [B, N, H-R] other half, scaled by the gate's scale and rotated.
      k_pred, k_rest, v: [B, K, S, R], [B, K, S, H-R], [B, K, S, H] cached entries.
      pos: int [B, S] positions of the cached slots (-1: empty).
      new_k_pred, new_k_rest, new_v: [B, K, *] the token's own entries (its key is slot S, at
        position ``q_pos``).
      q_pos: int [B] query positions (-1: a padding row, which attends to nothing).
      window: scalar; keys at distance >= window are out of reach.
      top_k: the statistical top-k's target count (static, >= 1).
      softcap: the predictor scores' soft-cap, or None.
      implementation: "auto", "xla" or "native".

    Returns:
      out [B, N, H] float32 and the kept keys per query head [B, N] float32.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1")
    _check(
        (q_pred.shape, q_rest.shape), (k_pred, k_rest, v), pos, (new_k_pred, new_k_rest, new_v),
        q_pos, window,
    )  # fmt: skip
    impl = native if _resolve(implementation) == "native" else xla
    return impl.spark_decode_attention(
        q_pred, q_rest, k_pred, k_rest, v, pos, new_k_pred, new_k_rest, new_v, q_pos, window,
        top_k=top_k, softcap=softcap,
    )  # fmt: skip


def dense_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
    q_pos: jax.Array,
    window: jax.Array | int,
    *,
    softcap: float | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Dense (Gemma-2) attention of one query per row over its cache and its own key.

    Args as :func:`spark_decode_attention`, with q [B, N, H] scaled, k and v [B, K, S, H].

    Returns:
      out [B, N, H] float32 and the valid keys per query head [B, N] float32.
    """
    _check((q.shape,), (k, v), pos, (new_k, new_v), q_pos, window)
    impl = native if _resolve(implementation) == "native" else xla
    return impl.dense_decode_attention(q, k, v, pos, new_k, new_v, q_pos, window, softcap=softcap)
