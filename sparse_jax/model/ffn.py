"""Feed-forward blocks: Gemma-2's gated GeLU FFN and the Spark FFN (docs/method.md, section 2).

Spark FFN, per token x of width D with predictor width R:
``y = V^T [gelu(statistical_topk(K1^T x[:R])) * (K2 x[R:])]``. K1 is stored [R, F]; K2 [F, D-R]
and V [F, D] hold one neuron per contiguous row, so decoding can gather the active rows. In
training the product is computed densely with the thresholded activations (most are exact
zeros); the decode path in :mod:`sparse_jax.decode.step` reads only the selected rows.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sparse_jax.kernels import DEFAULT_KERNELS, Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.layers import dtype_of

fan_in_last = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2
)
fan_in_first = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1
)


def gelu(x: jax.Array) -> jax.Array:
    """Gemma's gelu (tanh approximation); gelu(0) = 0."""
    return jax.nn.gelu(x, approximate=True)


class GatedFFN(nn.Module):
    """``down(gelu(x W_gate) * (x W_up))`` with W_gate, W_up [D, F] and W_down [F, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, enabled: jax.Array) -> tuple[jax.Array, jax.Array]:
        del enabled  # the gated FFN has no sparsity to switch
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        shape_in = (cfg.model_dim, cfg.ffn_dim)
        w_gate = self.param("w_gate", fan_in_first, shape_in, cfg.param_dtype).astype(dtype)
        w_up = self.param("w_up", fan_in_first, shape_in, cfg.param_dtype).astype(dtype)
        w_down = self.param(
            "w_down", fan_in_first, (cfg.ffn_dim, cfg.model_dim), cfg.param_dtype
        ).astype(dtype)
        gate = checkpoint_name(jnp.einsum("btd,df->btf", x, w_gate), "ffn_pre")
        up = jnp.einsum("btd,df->btf", x, w_up)
        y = jnp.einsum("btf,fd->btd", gelu(gate) * up, w_down)
        return y, jnp.ones((), jnp.float32)


class SparkFFN(nn.Module):
    """Spark FFN: predictor K1 [R, F], value branch K2 [F, D-R], down projection V [F, D].

    Statistical top-k runs through ``kernels`` (:mod:`sparse_jax.kernels`).
    """

    cfg: ModelConfig
    kernels: Kernels = DEFAULT_KERNELS

    @nn.compact
    def __call__(self, x: jax.Array, enabled: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], fraction of neurons active)."""
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        r, f, d = cfg.ffn_predictor_dim, cfg.ffn_dim, cfg.model_dim
        k1 = self.param("k1", fan_in_first, (r, f), cfg.param_dtype).astype(dtype)
        k2 = self.param("k2", fan_in_last, (f, d - r), cfg.param_dtype).astype(dtype)
        v = self.param("v", fan_in_first, (f, d), cfg.param_dtype).astype(dtype)
        pre = checkpoint_name(jnp.einsum("btr,rf->btf", x[..., :r], k1), "ffn_pre")
        sparse = self.kernels.soft_topk(
            pre, cfg.ffn_keep_count, enabled=enabled, method=cfg.topk_method
        )
        act = gelu(sparse)
        value = jnp.einsum("btd,fd->btf", x[..., r:], k2)
        y = jnp.einsum("btf,fd->btd", act * value, v)
        active = jnp.mean((act != 0).astype(jnp.float32))
        return y, active


def make_ffn(cfg: ModelConfig, name: str, kernels: Kernels = DEFAULT_KERNELS) -> nn.Module:
    if cfg.ffn_kind == "spark":
        return SparkFFN(cfg, kernels, name=name)
    return GatedFFN(cfg, name=name)
