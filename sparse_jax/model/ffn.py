"""Feed-forward blocks: Gemma-2's gated GeLU FFN and the Spark FFN (docs/method.md, section 2).

Spark FFN, per token x of width D with predictor width R:
``y = V^T [gelu(statistical_topk(K1 x[:R])) * (K2 x[R:])]``. K1 is stored [F, R]; K2 [F, D-R]
and V [F, D] hold one neuron per contiguous row, so decoding can gather the active rows.

One module serves every path. The masked form (training, evaluation, prefill, and decoding
where gathering would read more) multiplies by every row of K2 and V, most of them against
exact zeros. The sparse form (decoding, one token per row) takes the same threshold, compacts
the active neurons into a static capacity and gathers only their rows of K2 and V, either per
token (``"per_token"``) or once for the union of the batch's active sets (``"union"``). An
overflowing selection takes the masked product for that step, counted, never truncated. The
block form (prefill chunks, native CPU kernels: ``"block"``) computes only the active (token,
neuron) pairs, each active neuron's K2 and V rows read once for all its tokens in the block;
with the statistical threshold on a sparse layer the kernel takes the pre-activations and
applies the threshold and the gelu itself, else the masked form's activations.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.stat_topk.xla import statistical_threshold
from sparse_jax.kernels import DEFAULT_KERNELS, Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.layers import dtype_of
from sparse_jax.model.selection import compact, sparse_ffn_union
from sparse_jax.model.weights import GATED_FFN, SPARK_FFN, declare_all
from sparse_jax.parallel.sharding import FFN_HIDDEN

FFN_MODES = ("masked", "per_token", "union", "block")


def gelu(x: jax.Array) -> jax.Array:
    """Gemma's gelu (tanh approximation); gelu(0) = 0."""
    return jax.nn.gelu(x, approximate=True)


class GatedFFN(nn.Module):
    """``W_down (gelu(W_gate x) * (W_up x))`` with W_gate, W_up [F, D] and W_down [D, F].

    Attributes:
      cfg: the model.
      kernels: the implementation of the weight products (:mod:`sparse_jax.kernels`).
    """

    cfg: ModelConfig
    kernels: Kernels = DEFAULT_KERNELS

    def setup(self) -> None:
        declare_all(self, self.cfg, GATED_FFN)

    def __call__(
        self, x: jax.Array, enabled: jax.Array | bool, mode: str = "masked", capacity: int = 0
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], active neurons per token [B, T], overflow flag)."""
        del enabled, mode, capacity  # the gated FFN has no sparsity
        dtype = dtype_of(self.cfg.dtype)
        gate, up = self.kernels.linear_many(x, (self.w_gate, self.w_up), dtype)
        gate = checkpoint_name(gate, "ffn_pre")
        y = self.kernels.linear((gelu(gate) * up).astype(dtype), self.w_down, dtype)
        y = y.astype(dtype)
        active = jnp.full(x.shape[:-1], self.cfg.ffn_dim, jnp.float32)
        return y, active, jnp.zeros((), jnp.int32)


class SparkFFN(nn.Module):
    """Spark FFN: predictor K1 [F, R], value branch K2 [F, D-R], down projection V [F, D].

    Attributes:
      cfg: the model.
      kernels: the weight products, the statistical top-k of the masked form and the
        gathered product of the per-token form (:mod:`sparse_jax.kernels`); the union
        product is XLA's.
    """

    cfg: ModelConfig
    kernels: Kernels = DEFAULT_KERNELS

    def setup(self) -> None:
        declare_all(self, self.cfg, SPARK_FFN)

    def __call__(
        self, x: jax.Array, enabled: jax.Array | bool, mode: str = "masked", capacity: int = 0
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Spark FFN of x [B, T, D].

        Args:
          x: [B, T, D] normed inputs.
          enabled: whether the layer's sparsity is on (static or traced bool).
          mode: "masked"; for decoding (T = 1, ``enabled`` true) "per_token" or "union"; for
            prefill with the native kernels (no gradient) "block".
          capacity: static gathered neurons per selection of the sparse modes.

        Returns:
          y [B, T, D] (compute dtype), active neurons per token [B, T] float32, and an int32
          scalar, 1 if a sparse selection overflowed its capacity (the masked product was used).
        """
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        r = cfg.ffn_predictor_dim
        pre = checkpoint_name(self.kernels.linear(x[..., :r], self.k1, dtype), "ffn_pre")
        if mode == "block" and cfg.topk_method == "statistical" and enabled is True:
            # The threshold and the gelu in the kernel: the [M, F] activations never exist.
            b, t, d = x.shape
            y, active = self.kernels.spark_ffn_block(
                pre.reshape(b * t, -1),
                x[..., r:].reshape(b * t, -1),
                self.k2,
                self.v,
                keep_count=cfg.ffn_keep_count,
            )
            return y.reshape(b, t, d).astype(dtype), active.reshape(b, t), jnp.zeros((), jnp.int32)
        if mode in ("masked", "block"):
            act = gelu(
                self.kernels.soft_topk(
                    pre,
                    cfg.ffn_keep_count,
                    enabled=enabled,
                    method=cfg.topk_method,
                    logical=FFN_HIDDEN,
                )
            )
            active = jnp.sum(act != 0, axis=-1, dtype=jnp.float32)
            if mode == "block":
                b, t, d = x.shape
                y = self.kernels.sparse_ffn_block(
                    act.reshape(b * t, -1), x[..., r:].reshape(b * t, -1), self.k2, self.v
                )
                return y.reshape(b, t, d).astype(dtype), active, jnp.zeros((), jnp.int32)
            value = self.kernels.linear(x[..., r:], self.k2, dtype)
            y = self.kernels.linear_rows((act * value).astype(dtype), self.v, dtype)
            return y.astype(dtype), active, jnp.zeros((), jnp.int32)
        b, t, d = x.shape
        y, active, overflow = self._gathered(
            x.reshape(b * t, d), pre.reshape(b * t, -1), mode, capacity
        )
        return y.reshape(b, t, d).astype(dtype), active.reshape(b, t), overflow

    def _gathered(
        self, x: jax.Array, pre: jax.Array, mode: str, cap: int
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The sparse forms on rows x [M, D] with predictor outputs pre [M, F]."""
        cfg = self.cfg
        x_rest = x[:, cfg.ffn_predictor_dim :]
        theta, _ = statistical_threshold(pre, cfg.ffn_keep_count, method=cfg.topk_method)
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
            return self.kernels.linear_rows(act * self.kernels.linear(x_rest, self.k2), self.v)

        def gathered(_: None) -> jax.Array:
            h = jnp.where(in_count, gelu(jnp.maximum(picked - theta, 0.0)), 0.0)
            if mode == "union":
                return sparse_ffn_union(h, idx, x_rest, self.k2, self.v)
            return self.kernels.sparse_ffn(h, idx, x_rest, self.k2, self.v)

        y = jax.lax.cond(overflow, masked, gathered, None)
        return y, active, overflow.astype(jnp.int32)


def make_ffn(cfg: ModelConfig, name: str, kernels: Kernels = DEFAULT_KERNELS) -> nn.Module:
    if cfg.ffn_kind == "spark":
        return SparkFFN(cfg, kernels, name=name)
    return GatedFFN(cfg, kernels, name=name)
