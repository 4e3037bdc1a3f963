"""Public entry point of Spark attention from given predictor scores: validation and dispatch.

Forward only (prefill). Implementations: ``"native"`` (the C++ kernel, CPU), ``"xla"`` and
``"auto"`` (native where it runs, else XLA). Training and the Pallas backends attend through
:mod:`pallas_kernels.blockwise_attention`, so the Pallas names are not accepted here.

Shapes: B rows, K kv heads, M query rows per kv head (query heads of the group times query
positions, in any order), S keys, C the keys' other half, H head dims.
"""

from __future__ import annotations

import jax

from pallas_kernels._common import dispatch
from pallas_kernels.scored_attention import native, xla

IMPLEMENTATIONS = ("auto", "xla", "native")


def spark_scored_attention(
    scores: jax.Array,
    q_rest: jax.Array,
    k_rest: jax.Array,
    v: jax.Array,
    *,
    top_k: int,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Spark attention of M query rows per kv head from their predictor scores.

    Args:
      scores: [B, K, M, S] float32 soft-capped predictor scores, ``-inf`` for an invalid key
        (every other entry finite).
      q_rest: [B, K, M, C] the queries' other half, scaled by the gate's scale and rotated.
      k_rest, v: [B, K, S, C] and [B, K, S, H] the keys' other half and the values (float32 or
        bfloat16, one dtype).
      top_k: the statistical top-k's target count (static, >= 1).
      implementation: "auto", "xla" or "native".

    Returns:
      out [B, K, M, H] float32 and the kept keys per row [B, K, M] float32 (a row with no
      valid key gives zeros).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"scored attention takes implementation in {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1")
    if scores.ndim != 4 or q_rest.ndim != 4 or k_rest.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "scores, q_rest, k_rest and v must be 4-D [B, K, M, S], [B, K, M, C], [B, K, S, C] "
            f"and [B, K, S, H]; got {scores.shape}, {q_rest.shape}, {k_rest.shape}, {v.shape}"
        )
    b, k, m, s = scores.shape
    c = k_rest.shape[-1]
    if q_rest.shape != (b, k, m, c) or k_rest.shape != (b, k, s, c) or v.shape[:3] != (b, k, s):
        raise ValueError(
            f"inconsistent shapes: scores {scores.shape}, q_rest {q_rest.shape}, k_rest "
            f"{k_rest.shape}, v {v.shape} (want q_rest {(b, k, m, c)}, k_rest {(b, k, s, c)}, "
            f"v {(b, k, s)} + [H])"
        )
    if k_rest.dtype != v.dtype:
        raise ValueError(f"k_rest and v must share one dtype, got {k_rest.dtype} and {v.dtype}")
    name = dispatch.resolve_implementation(implementation, False)
    impl = native if name == "native" else xla
    return impl.spark_scored_attention(scores, q_rest, k_rest, v, top_k=top_k)
