"""Building blocks shared by every variant: RMSNorm, tied embedding, RoPE, soft-capping and the
attention softmax."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.kernels import DEFAULT_KERNELS, Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.weights import EMBEDDING, declare


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``; identity when ``cap`` is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def safe_softmax(scores: jax.Array) -> jax.Array:
    """Softmax over the last axis that gives zeros, not NaN, on a row with no finite entry.

    Such a row is a query that attends to nothing (a padding query, or a Spark row with no
    valid key): its output is 0. Forward and gradient stay finite, so one such row cannot
    poison the rest of a batch through a masked 0 * NaN.
    """
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalized = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / jnp.where(total > 0, total, 1.0)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + scale)``, scale initialised to 0."""

    eps: float = 1e-6
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
    """Token embedding [V, D], scaled by sqrt(D) on the way in and tied on the way out.

    Attributes:
      cfg: the model.
      kernels: the implementation of the unembedding product (:mod:`sparse_jax.kernels`).
    """

    cfg: ModelConfig
    kernels: Kernels = DEFAULT_KERNELS

    def setup(self) -> None:
        self.embedding = declare(self, self.cfg, "embedding", EMBEDDING)

    def encode(self, tokens: jax.Array, table: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int -> [B, T, D] in the compute dtype.

        ``table`` replaces the parameter as the lookup table (the same values, passed as a
        program input of its own; see :meth:`sparse_jax.model.transformer.Transformer.extend`).
        """
        dtype = dtype_of(self.cfg.dtype)
        table = self.embedding if table is None else table
        x = jnp.take(table, tokens, axis=0).astype(dtype)
        return x * jnp.asarray(self.cfg.model_dim**0.5, dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> logits [B, T, V] in float32."""
        return self.kernels.linear(x, self.embedding, x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding over the last axis (split-half rotation, as Gemma).

    Args:
      x: [B, T, ..., W] with W even.
      positions: [B, T] integer positions.
      base: wavelength base.

    Returns:
      x rotated, same shape and dtype.
    """
    width = x.shape[-1]
    half = width // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / width)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, W/2]
    angle = angle.reshape(angle.shape[:2] + (1,) * (x.ndim - 3) + (half,))
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def split_rope(x: jax.Array, positions: jax.Array, base: float, split: int | None) -> jax.Array:
    """RoPE on the whole head, or (Spark) on ``[:split]`` and ``[split:]`` independently."""
    if split is None:
        return rope(x, positions, base)
    head, tail = x[..., :split], x[..., split:]
    return jnp.concatenate([rope(head, positions, base), rope(tail, positions, base)], axis=-1)
