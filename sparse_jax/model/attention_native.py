"""One decode step's attention (T = 1, with a cache) in one native CPU kernel, dense or Spark;
and when the model's attention takes the native kernels (decode, prefill, blockwise Spark).

:func:`native_decode` says when the model's attention takes this path (the native kernels on
CPU, one query per row, a cache; Spark needs the statistical threshold); the kernels are
:mod:`pallas_kernels.decode_attention`, reached through :class:`sparse_jax.kernels.Kernels`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax.kernels import Kernels
from sparse_jax.model.config import ModelConfig

Segment = dict[str, jax.Array]


def attend_decode_native(
    cfg: ModelConfig,
    q: jax.Array,
    cache: Segment,
    new: Segment,
    q_pos: jax.Array,
    window: jax.Array | int,
    kernels: Kernels,
) -> tuple[jax.Array, jax.Array]:
    """One decode step's attention (T = 1) in one native CPU kernel, dense or Spark.

    The same result as :func:`sparse_jax.model.attention.attend_masked` over
    ``(cache, new)``; Spark reads the kept keys' ``k_rest`` and ``v`` rows only, with no
    capacity (nothing can overflow).

    Args:
      cfg: model config (Spark layers need ``topk_method="statistical"``).
      q: [B, 1, N, H] rotated queries.
      cache: one layer's cache entries before this token (the layout of
        :func:`sparse_jax.model.attention.key_entries`).
      new: this token's entries (one slot, at ``q_pos``).
      q_pos: [B, 1] query positions.
      window: the layer's attention window.
      kernels: a native :class:`Kernels`.

    Returns:
      out [B, 1, N, H] float32 and the attended keys per query head [B, N, 1] float32.
    """
    q1, q_pos1 = q[:, 0], q_pos[:, 0]
    own = {name: a[:, :, 0] for name, a in new.items() if name != "pos"}
    softcap_ = cfg.attn_logit_softcap
    if cfg.attn_kind == "spark":
        r = cfg.attn_predictor_dim
        q_pred = q1[..., :r] * jnp.asarray(cfg.resolved_predictor_query_scale, q1.dtype)
        q_rest = q1[..., r:] * jnp.asarray(cfg.resolved_gate_query_scale, q1.dtype)
        out, count = kernels.spark_decode_attention(
            q_pred, q_rest, cache["k_pred"], cache["k_rest"], cache["v"], cache["pos"],
            own["k_pred"], own["k_rest"], own["v"], q_pos1, window,
            top_k=cfg.attn_top_k, softcap=softcap_,
        )  # fmt: skip
    else:
        q_scaled = q1 * jnp.asarray(cfg.resolved_query_scale, q1.dtype)
        out, count = kernels.dense_decode_attention(
            q_scaled, cache["k"], cache["v"], cache["pos"], own["k"], own["v"], q_pos1, window,
            softcap=softcap_,
        )  # fmt: skip
    return out[:, None], count[..., None]


def native_decode(cfg: ModelConfig, kernels: Kernels, length: int, cache: Segment | None) -> bool:
    """Whether a block of ``length`` queries attends through :func:`attend_decode_native`."""
    return (
        cache is not None
        and length == 1
        and kernels.native()
        and (cfg.attn_kind == "dense" or cfg.topk_method == "statistical")
    )


def native_blockwise(cfg: ModelConfig, kernels: Kernels, cache: Segment | None) -> bool:
    """Whether a Spark sequence attending to its own keys (training, evaluation, a forward
    without a cache) takes the native blockwise kernels under ``attn_impl="auto"`` at any
    length: the native kernels on one device (under a mesh they are off). They read only the
    kept keys, and a ``small``-preset train step at 256 tokens measured faster with them than
    with the materialized form (``benchmarks/train_step.py`` on an AMD EPYC)."""
    return (
        cache is None
        and cfg.attn_kind == "spark"
        and cfg.attn_impl == "auto"
        and cfg.topk_method == "statistical"
        and kernels.native()
    )


# The raw scores a chunk's native Spark attention holds at once ([B, N, T, S] float32): above
# this, the chunk attends blockwise in O(T x block) memory instead.
SCORED_MAX_BYTES = 1 << 30


def native_prefill(
    cfg: ModelConfig,
    kernels: Kernels,
    shape: tuple[int, int],
    cache: Segment | None,
    enabled,
) -> bool:
    """Whether a prefill chunk of ``shape`` = (rows, queries) attends through
    :func:`sparse_jax.model.attention.attend_scored_native`: a Spark layer with the statistical
    threshold, ``attn_impl="auto"``, the native kernels, a cache, more than one query, the
    layer's sparsity known at trace time, and raw scores of at most ``SCORED_MAX_BYTES``."""
    if cache is None or shape[1] < 2 or cfg.attn_kind != "spark" or cfg.attn_impl != "auto":
        return False
    keys = cache["pos"].shape[1] + shape[1]
    scored = 4 * shape[0] * cfg.num_heads * shape[1] * keys
    return (
        cfg.topk_method == "statistical"
        and isinstance(enabled, bool)
        and scored <= SCORED_MAX_BYTES
        and kernels.native()
    )
