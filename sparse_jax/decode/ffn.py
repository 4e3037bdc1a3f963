"""FFN blocks at decode: the masked path and the Spark FFN's sparse gather path.

Both compute ``y = V^T [gelu(statistical_topk(K1 x[:R])) * (K2 x[R:])]`` on decode-layout
weights (:mod:`sparse_jax.decode.layout`). The masked path multiplies by every row of K2 and V,
most of them against exact zeros, as training does. The sparse path computes the predictor
densely, takes the same threshold, compacts the active neurons into a static capacity and
gathers only their rows of K2 and V, either per token or, for a batch, once for the union of
the batch's active sets (:func:`ffn_mode` picks, or the masked path where gathering would read
more). An overflowing selection takes the masked product for that step, counted, never
truncated.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.stat_topk.xla import statistical_threshold
from sparse_jax.decode.gather import (
    capacity,
    compact,
    sparse_ffn_union,
    union_capacity,
)
from sparse_jax.decode.layout import linear, linear_rows
from sparse_jax.decode.policy import policy_for
from sparse_jax.kernels import XLA_KERNELS, Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.ffn import gelu

FFNMode = Literal["masked", "per_token", "union"]


def gated_ffn(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Gemma-2's gated FFN: x [M, D] -> [M, D] float32."""
    gate, up = jnp.split(linear(x, p["w_gate_up"]), 2, axis=-1)
    return linear(gelu(gate) * up, p["w_down"])


def _threshold(cfg: ModelConfig, pre: jax.Array) -> jax.Array:
    theta, _ = statistical_threshold(pre, cfg.ffn_keep_count, method=cfg.topk_method)
    return theta


def spark_ffn_masked(
    cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, enabled: bool
) -> tuple[jax.Array, jax.Array]:
    """Spark FFN over all neurons, inactive ones multiplied by zero.

    Args:
      cfg: model config.
      p: one decode-layout block (``k1`` [F, R], ``k2`` [F, D-R], ``v`` [F, D]).
      x: [M, D] normed inputs.
      enabled: false keeps every neuron (a layer with sparsity switched off).

    Returns:
      y [M, D] float32 and the active neuron count per row [M] (float32).
    """
    r, f = cfg.ffn_predictor_dim, cfg.ffn_dim
    pre = linear(x[:, :r], p["k1"])
    if enabled and cfg.ffn_keep_count < f:
        act = gelu(jnp.maximum(pre - _threshold(cfg, pre), 0.0))
    else:
        act = gelu(pre)
    value = linear(x[:, r:], p["k2"])
    active = jnp.sum(act != 0, axis=-1, dtype=jnp.float32)
    return linear_rows(act * value, p["v"]), active


def ffn_capacities(cfg: ModelConfig, batch_size: int, slack: float) -> tuple[int, int]:
    """(per-token, union) capacities of a Spark FFN selection at this batch size."""
    k, f = cfg.ffn_keep_count, cfg.ffn_dim
    return capacity(k, f, slack), union_capacity(k, f, batch_size, slack)


def ffn_mode(
    cfg: ModelConfig, batch_size: int, path: str, caps: tuple[int, int], batch_mode: str
) -> str:
    """How a sparse Spark FFN layer runs at this batch size: masked, per-token or union.

    Compares gathered row-equivalents: per token ``B * C * gather_cost``, union
    ``C_union * union_gather_cost`` (the backend policy's constants,
    :mod:`sparse_jax.decode.policy`), masked ``F`` (every row streamed once).

    Args:
      cfg: model config.
      batch_size: B.
      path: "sparse" (never masked), "masked" or "auto".
      caps: (per-token, union) capacities.
      batch_mode: "auto", "per_token" or "union" (forces the sparse variant).

    Returns:
      "masked", "per_token" or "union".
    """
    if path == "masked" or cfg.ffn_keep_count >= cfg.ffn_dim:
        return "masked"
    policy = policy_for()
    costs = {
        "per_token": batch_size * caps[0] * policy.gather_cost,
        "union": caps[1] * policy.union_gather_cost,
    }
    if batch_size == 1:
        costs.pop("union")
    if batch_mode != "auto":
        costs = {batch_mode: costs.get(batch_mode, 0.0)}
    if path == "auto":
        costs["masked"] = float(cfg.ffn_dim)
    return min(costs, key=costs.__getitem__)


def spark_ffn_sparse(
    cfg: ModelConfig,
    p: dict[str, jax.Array],
    x: jax.Array,
    mode: FFNMode,
    cap: int,
    kernels: Kernels = XLA_KERNELS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Spark FFN gathering the active neurons' rows of K2 and V.

    Args:
      cfg: model config.
      p: one decode-layout block.
      x: [B, D] normed inputs, one token per row.
      mode: "per_token" (each row gathers its own active set) or "union" (one gather of the
        union of the batch's active sets).
      cap: static number of gathered neurons (per token, or for the union).
      kernels: runs the per-token gathered product (:mod:`sparse_jax.kernels`); the union
        product is XLA's.

    Returns:
      y [B, D] float32, active neurons per row [B] (float32) and an int32 scalar, 1 if the
      selection overflowed the capacity (the masked product was used instead).
    """
    r = cfg.ffn_predictor_dim
    x_rest = x[:, r:]
    pre = linear(x[:, :r], p["k1"])
    theta = _threshold(cfg, pre)
    keep = pre > theta
    active = jnp.sum(keep, axis=-1, dtype=jnp.float32)
    if mode == "union":
        idx, count = compact(jnp.any(keep, axis=0), cap)
        in_count = jnp.arange(cap) < count
        picked = jnp.take(pre, idx, axis=1)
    else:
        idx, count = compact(keep, cap)
        in_count = jnp.arange(cap) < count[:, None]
        picked = jnp.take_along_axis(pre, idx, axis=1)
    overflow = jnp.any(count > cap)

    def masked(_: None) -> jax.Array:
        act = gelu(jnp.maximum(pre - theta, 0.0))
        return linear_rows(act * linear(x_rest, p["k2"]), p["v"])

    def gathered(_: None) -> jax.Array:
        h = jnp.where(in_count, gelu(jnp.maximum(picked - theta, 0.0)), 0.0)
        if mode == "union":
            return sparse_ffn_union(h, idx, x_rest, p["k2"], p["v"])
        return kernels.sparse_ffn(h, idx, x_rest, p["k2"], p["v"])

    y = jax.lax.cond(overflow, masked, gathered, None)
    return y, active, overflow.astype(jnp.int32)
