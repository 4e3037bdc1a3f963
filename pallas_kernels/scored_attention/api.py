"""Public entry point of Spark attention from raw predictor scores: validation and dispatch.

Forward only (prefill). Implementations: ``"native"`` (the C++ kernel, CPU), ``"xla"`` and
``"auto"`` (native where it runs, else XLA). Training and the Pallas backends attend through
:mod:`pallas_kernels.blockwise_attention`, so the Pallas names are not accepted here.

Shapes: B rows, K kv heads, G query heads per kv head, T queries, S keys, C the keys' other
half, H head dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch
from pallas_kernels.scored_attention import native, xla

IMPLEMENTATIONS = ("auto", "xla", "native")


def spark_scored_attention(
    scores: jax.Array,
    q_rest: jax.Array,
    k_rest: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: jax.Array | int,
    *,
    top_k: int,
    softcap: float | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Spark attention of a chunk's queries from their raw predictor scores.

    Args:
      scores: [B, K, G, T, S] float32 raw predictor scores ``q_pred . k_pred`` (queries
        scaled), before the soft-cap.
      q_rest: [B, K, G, T, C] the queries' other half, scaled by the gate's scale and rotated.
      k_rest, v: [B, K, S, C] and [B, K, S, H] the keys' other half and the values (float32 or
        bfloat16, one dtype).
      q_pos: int [B, T] query positions (-1: a padding query, which attends to nothing).
      k_pos: int [B, S] key positions (-1: an empty slot).
      window: scalar; keys at distance >= window are out of reach.
      top_k: the statistical top-k's target count (static, >= 1).
      softcap: the predictor scores' soft-cap, or None.
      implementation: "auto", "xla" or "native".

    Returns:
      out [B, K, G, T, H] float32 and the kept keys per query head [B, K, G, T] float32.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"scored attention takes implementation in {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1")
    if scores.ndim != 5 or q_rest.ndim != 5 or k_rest.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "scores, q_rest, k_rest and v must be [B, K, G, T, S], [B, K, G, T, C], [B, K, S, C] "
            f"and [B, K, S, H]; got {scores.shape}, {q_rest.shape}, {k_rest.shape}, {v.shape}"
        )
    b, k, g, t, s = scores.shape
    c = k_rest.shape[-1]
    if q_rest.shape != (b, k, g, t, c) or k_rest.shape != (b, k, s, c) or v.shape[:3] != (b, k, s):
        raise ValueError(
            f"inconsistent shapes: scores {scores.shape}, q_rest {q_rest.shape}, k_rest "
            f"{k_rest.shape}, v {v.shape} (want q_rest {(b, k, g, t, c)}, k_rest {(b, k, s, c)}, "
            f"v {(b, k, s)} + [H])"
        )
    if k_rest.dtype != v.dtype:
        raise ValueError(f"k_rest and v must share one dtype, got {k_rest.dtype} and {v.dtype}")
    for name, pos, want in (("q_pos", q_pos, (b, t)), ("k_pos", k_pos, (b, s))):
        if pos.shape != want or not jnp.issubdtype(pos.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer {list(want)}, got {pos.dtype} {pos.shape}")
    if jnp.ndim(window) != 0:
        raise ValueError(f"window must be a scalar, got shape {jnp.shape(window)}")
    name = dispatch.resolve_implementation(implementation, False)
    impl = native if name == "native" else xla
    return impl.spark_scored_attention(
        scores, q_rest, k_rest, v, q_pos, k_pos, window, top_k=top_k, softcap=softcap
    )
