"""The materialized oracle of blockwise attention: every [B, K, G, T, S] tensor at once.

Readable jnp that the tests hold every implementation to, forward and gradients (no gradient
through theta, as in the mask form of the statistical top-k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def blockwise_attention(
    q: tuple[jax.Array, ...],
    keys: tuple[jax.Array, ...],
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    window,
    *,
    enabled=True,
    softcap: float | None = None,
    top_k: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Same arguments and results as :func:`pallas_kernels.blockwise_attention.api.
    blockwise_attention`, without the block sizes."""

    def dot(a, b):
        return jnp.einsum("bkgtw,bksw->bkgts", a, b, preferred_element_type=jnp.float32)

    s = dot(q[0], keys[0])
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    qp, kp = q_pos[:, None, None, :, None], k_pos[:, None, None, None, :]
    valid = (kp >= 0) & (qp >= 0) & (kp <= qp) & (qp - kp < window)
    valid = jnp.broadcast_to(valid, s.shape)
    weight_of = lambda p: p  # noqa: E731
    kept = valid
    if top_k:
        n = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32)
        n_safe = jnp.maximum(n, 1.0)
        mean = jnp.sum(jnp.where(valid, s, 0.0), axis=-1, keepdims=True) / n_safe
        var = jnp.sum(jnp.where(valid, jnp.square(s - mean), 0.0), -1, keepdims=True) / n_safe
        frac = jnp.clip(1.0 - top_k / n_safe, 1e-6, 1.0 - 1e-6)
        top = jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True)
        theta = jnp.minimum(mean + jax.scipy.special.ndtri(frac) * jnp.sqrt(var), top)
        theta = jax.lax.stop_gradient(theta)
        keep_all = (n <= top_k) | jnp.logical_not(enabled)
        kept = valid & (keep_all | (s >= theta))
        gate = jax.nn.softplus(dot(q[1], keys[1]))
        weight_of = lambda p: p * gate  # noqa: E731
    masked = jnp.where(kept, s, -jnp.inf)
    top = jnp.max(masked, axis=-1, keepdims=True)
    e = jnp.where(kept, jnp.exp(masked - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum(
        "bkgts,bksh->bkgth", weight_of(p), v.astype(jnp.float32), preferred_element_type=jnp.float32
    )
    return out, jnp.sum(kept, axis=-1, dtype=jnp.float32)
