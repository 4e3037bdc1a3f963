"""Grouped-query attention, dense (Gemma-2) and Spark (docs/method.md, section 3).

Both variants share the projections q [D, N, H], k and v [D, K, H] and o [N, H, D]; they differ
in how a query weighs the keys:

* dense: ``softmax(softcap(q.k * H^-1/2))`` over valid keys;
* Spark: predictor scores ``s = softcap(q[:R].k[:R] * R^-1/2)`` pick about ``attn_top_k`` keys by
  statistical top-k over the valid keys, then ``w = softmax(s)[kept] * softplus(q[R:].k[R:] *
  (H-R)^-1/2)``; the weights no longer sum to one. RoPE rotates [:R] and [R:] separately.

``attend_dense`` and ``attend_spark`` are pure functions of already-projected q, k, v and a
validity mask (causal and in-window), so the decode path reuses them for its masked fallback.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sparse_jax.kernels import DEFAULT_KERNELS, Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.layers import dtype_of, softcap, split_rope

qkv_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
)
out_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array) -> jax.Array:
    """Valid (query, key) pairs: causal, inside the window, key slot filled.

    Args:
      q_pos: [B, T] query positions.
      k_pos: [B, S] key positions; negative marks an empty cache slot.
      window: scalar; a key at distance >= window is out of reach.

    Returns:
      bool [B, T, S].
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    return (kp >= 0) & (kp <= qp) & (qp - kp < window)


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
    b, t, n, h = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def attend_dense(
    cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Dense GQA attention.

    Args:
      cfg: model config (scales, soft-cap).
      q: [B, T, N, H], already rotated.
      k, v: [B, S, K, H], k already rotated.
      valid: bool [B, T, S].

    Returns:
      out [B, T, N, H] and the mean number of attended keys per query (scalar).
    """
    qg = _group(q, cfg.num_kv_heads) * jnp.asarray(cfg.resolved_query_scale, q.dtype)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = softcap(scores, cfg.attn_logit_softcap)
    scores = jnp.where(valid[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    keys = jnp.mean(jnp.sum(valid, axis=-1, dtype=jnp.float32))
    return out.reshape(q.shape), keys


def attend_spark(
    cfg: ModelConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    enabled: jax.Array | bool = True,
    kernels: Kernels = DEFAULT_KERNELS,
) -> tuple[jax.Array, jax.Array]:
    """Spark attention with statistical top-k over the predictor scores.

    Args:
      cfg: model config (predictor width, top-k, scales, soft-cap).
      q: [B, T, N, H], halves already rotated.
      k, v: [B, S, K, H], k halves already rotated.
      valid: bool [B, T, S].
      enabled: false keeps every valid key (per-layer sparsity switch).
      kernels: the implementation of the top-k (:mod:`sparse_jax.kernels`).

    Returns:
      out [B, T, N, H] and the mean number of kept keys per query (scalar).
    """
    r = cfg.attn_predictor_dim
    qg = _group(q, cfg.num_kv_heads)
    q_pred = qg[..., :r] * jnp.asarray(cfg.resolved_predictor_query_scale, q.dtype)
    q_gate = qg[..., r:] * jnp.asarray(cfg.resolved_gate_query_scale, q.dtype)
    scores = jnp.einsum("btkgr,bskr->bkgts", q_pred, k[..., :r], preferred_element_type=jnp.float32)
    scores = softcap(scores, cfg.attn_logit_softcap)
    kept = kernels.mask_topk(
        scores,
        cfg.attn_top_k,
        valid=valid[:, None, None],
        enabled=enabled,
        method=cfg.topk_method,
    )
    # The threshold is capped at the row maximum, so a row with a valid key keeps at least
    # one, and in the model every query's own key is valid: no row is empty here. So the
    # plain softmax serves (the guarded one cost 3% of a small-preset train step on CPU);
    # the decode path, whose padding queries have no valid key, uses safe_softmax.
    probs = jax.nn.softmax(kept, axis=-1)
    gate = jnp.einsum("btkgr,bskr->bkgts", q_gate, k[..., r:], preferred_element_type=jnp.float32)
    weights = (probs * jax.nn.softplus(gate)).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    keys = jnp.mean(jnp.sum(jnp.isfinite(kept), axis=-1, dtype=jnp.float32))
    return out.reshape(q.shape), keys


class Attention(nn.Module):
    """Projections, RoPE and the attend function chosen by ``cfg.attn_kind``."""

    cfg: ModelConfig
    kernels: Kernels = DEFAULT_KERNELS

    def setup(self) -> None:
        cfg = self.cfg
        d, n, kv, h = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = self.param("wq", qkv_init, (d, n, h), cfg.param_dtype)
        self.wk = self.param("wk", qkv_init, (d, kv, h), cfg.param_dtype)
        self.wv = self.param("wv", qkv_init, (d, kv, h), cfg.param_dtype)
        self.wo = self.param("wo", out_init, (n, h, d), cfg.param_dtype)

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> rotated q [B, T, N, H], rotated k and v [B, T, K, H]."""
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        q = jnp.einsum("btd,dnh->btnh", x, self.wq.astype(dtype))
        k = jnp.einsum("btd,dkh->btkh", x, self.wk.astype(dtype))
        v = jnp.einsum("btd,dkh->btkh", x, self.wv.astype(dtype))
        split = cfg.attn_predictor_dim if cfg.attn_kind == "spark" else None
        q = split_rope(q, positions, cfg.rope_base, split)
        k = split_rope(k, positions, cfg.rope_base, split)
        q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
        return q, k, v

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, enabled: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        if self.cfg.attn_kind == "spark":
            return attend_spark(self.cfg, q, k, v, valid, enabled, self.kernels)
        return attend_dense(self.cfg, q, k, v, valid)

    def output(self, out: jax.Array) -> jax.Array:
        """[B, T, N, H] -> [B, T, D]."""
        return jnp.einsum("btnh,nhd->btd", out, self.wo.astype(out.dtype))

    def __call__(
        self, x: jax.Array, positions: jax.Array, window: jax.Array, enabled: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Self-attention over the sequence: x [B, T, D] -> ([B, T, D], keys per query)."""
        q, k, v = self.project(x, positions)
        valid = attention_mask(positions, positions, window)
        out, keys = self.attend(q, k, v, valid, enabled)
        return self.output(out), keys
