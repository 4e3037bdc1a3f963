"""Attention over a KV cache: the masked path (any query count) and the sparse decode path.

The masked path is the training computation (``sparse_jax.model.attention``) transcribed to the
cache layout [B, K, S, *]: every cached key is read, invalid ones (empty, future, outside the
window) are masked. The sparse path, for one query per row, reads the predictor halves
``k_pred`` of all cached keys, thresholds each query head's scores by statistical top-k over
the valid keys (the same threshold as the masked path, so both keep the same keys), compacts the
kept slots into a static capacity and gathers only their ``k_rest`` and ``v`` rows
(:func:`pallas_kernels.topk_attention.xla.topk_attention` on CPU). If any query head keeps more keys
than the capacity, the step's layer takes the masked combination instead (``lax.cond``) and
reports an overflow, so a result is never silently truncated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.stat_topk.xla import statistical_threshold
from sparse_jax.decode.gather import capacity, compact
from sparse_jax.decode.policy import policy_for
from sparse_jax.kernels import XLA_KERNELS, Kernels
from sparse_jax.model.attention import attention_mask
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.layers import safe_softmax, softcap


def _grouped(cfg: ModelConfig, q: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T, H]."""
    b, t, n, h = q.shape
    kv = cfg.num_kv_heads
    return jnp.transpose(q.reshape(b, t, kv, n // kv, h), (0, 2, 3, 1, 4))


def _per_kv(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An einsum over [B, K, G, T, *] operands with G and T merged into one axis.

    XLA's CPU dot runs several times slower with the query axes kept apart (29 ms against
    11 ms for the scores of an 8192-key decode step), so both become one M axis of a batched
    matmul.

    Args:
      spec: "scores" (q [B, K, G, T, W] . keys [B, K, S, W] -> [B, K, G, T, S]) or "values"
        (weights [B, K, G, T, S] . values [B, K, S, W] -> [B, K, G, T, W]).
      a: the grouped operand.
      b: the cache operand.

    Returns:
      float32 [B, K, G, T, S or W].
    """
    bsz, kv, g, t, w = a.shape
    merged = a.reshape(bsz, kv, g * t, w)
    if spec == "scores":
        # Keys as the left operand: [S, M] comes out faster than [M, S] (6.7 against 11 ms).
        out = jnp.einsum("bksw,bkmw->bksm", b, merged, preferred_element_type=jnp.float32)
        out = jnp.swapaxes(out, -1, -2)
    else:
        out = jnp.einsum("bkms,bksw->bkmw", merged, b, preferred_element_type=jnp.float32)
    return out.reshape(bsz, kv, g, t, out.shape[-1])


def _scores(q: jax.Array, layer: dict, new: dict | None, name: str) -> jax.Array:
    """q [B, K, G, T, W] against cached keys ``layer[name]`` then the new ones: [.., S (+1)]."""
    scores = _per_kv("scores", q, layer[name])
    if new is None:
        return scores
    return jnp.concatenate([scores, _per_kv("scores", q, new[name])], axis=-1)


def _values(weights: jax.Array, layer: dict, new: dict | None) -> jax.Array:
    """Weights [B, K, G, T, S (+1)] over cached (then new) values: [B, K, G, T, H]."""
    v = layer["v"]
    s = v.shape[2]
    out = _per_kv("values", weights[..., :s].astype(v.dtype), v)
    if new is not None:
        out = out + _per_kv("values", weights[..., s:].astype(v.dtype), new["v"])
    return out


def _valid(q_pos: jax.Array, layer: dict, new: dict | None, window: int) -> jax.Array:
    """bool [B, T, S (+1)]: causal, in-window, filled slots (and the new keys)."""
    pos = layer["pos"] if new is None else jnp.concatenate([layer["pos"], new["pos"]], axis=1)
    return attention_mask(q_pos, pos, window)


def spark_scores(
    cfg: ModelConfig, qg: jax.Array, layer: dict, new: dict | None = None
) -> jax.Array:
    """Soft-capped predictor scores [B, K, G, T, S (+1)] float32 of queries [B, K, G, T, H]."""
    r = cfg.attn_predictor_dim
    q_pred = qg[..., :r] * jnp.asarray(cfg.resolved_predictor_query_scale, qg.dtype)
    return softcap(_scores(q_pred, layer, new, "k_pred"), cfg.attn_logit_softcap)


def spark_keep(
    cfg: ModelConfig, scores: jax.Array, valid: jax.Array, enabled: bool | jax.Array
) -> jax.Array:
    """Statistical top-k keep mask over valid keys, as ``statistical_topk_mask``.

    Args:
      cfg: model config (top-k, threshold method).
      scores: [B, K, G, T, S] float32.
      valid: bool [B, T, S].
      enabled: false keeps every valid key.

    Returns:
      bool [B, K, G, T, S].
    """
    valid = valid[:, None, None]
    theta, keep_all = statistical_threshold(
        scores, cfg.attn_top_k, valid=valid, method=cfg.topk_method
    )
    keep = jnp.logical_or(keep_all, jnp.logical_not(enabled)) | (scores >= theta)
    return keep & valid


def _gate_query(cfg: ModelConfig, qg: jax.Array) -> jax.Array:
    r = cfg.attn_predictor_dim
    return qg[..., r:] * jnp.asarray(cfg.resolved_gate_query_scale, qg.dtype)


def _spark_combine(cfg, qg, scores, keep, layer, new=None) -> jax.Array:
    """Masked Spark combination: [B, K, G, T, H] float32 from every cached (and new) key."""
    probs = safe_softmax(jnp.where(keep, scores, -jnp.inf))
    gate = _scores(_gate_query(cfg, qg), layer, new, "k_rest")
    return _values(probs * jax.nn.softplus(gate), layer, new)


def _dense_combine(cfg, qg, valid, layer, new=None) -> jax.Array:
    """Dense softmax attention: [B, K, G, T, H] float32 from every cached (and new) key."""
    q = qg * jnp.asarray(cfg.resolved_query_scale, qg.dtype)
    scores = softcap(_scores(q, layer, new, "k"), cfg.attn_logit_softcap)
    return _values(safe_softmax(jnp.where(valid[:, None, None], scores, -jnp.inf)), layer, new)


def _ungroup(out: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H]."""
    b, kv, g, t, h = out.shape
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, kv * g, h)


def attend_masked(
    cfg: ModelConfig,
    q: jax.Array,
    layer: dict[str, jax.Array],
    q_pos: jax.Array,
    window: int,
    enabled: bool,
    new: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of T queries per row over a cache, reading every slot.

    Args:
      cfg: model config.
      q: [B, T, N, H] rotated queries.
      layer: one layer's cache entries (keys [B, K, S, *], ``pos`` [B, S]).
      q_pos: [B, T] query positions; -1 marks a padding query (its output is 0).
      window: the layer's attention window.
      enabled: Spark layers only: false keeps every valid key.
      new: optional entries not yet in the cache (same keys, one slot: [B, K, 1, *] and
        ``pos`` [B, 1]), attended after the cached ones.

    Returns:
      out [B, T, N, H] float32 and the number of attended keys per query [B, N, T] (float32).
    """
    valid = _valid(q_pos, layer, new, window)
    qg = _grouped(cfg, q)
    b, kv, g, t, _ = qg.shape
    if cfg.attn_kind == "spark":
        scores = spark_scores(cfg, qg, layer, new)
        keep = spark_keep(cfg, scores, valid, enabled)
        out = _spark_combine(cfg, qg, scores, keep, layer, new)
        kept = jnp.sum(keep, axis=-1, dtype=jnp.float32).reshape(b, kv * g, t)
    else:
        out = _dense_combine(cfg, qg, valid, layer, new)
        kept = jnp.broadcast_to(jnp.sum(valid, axis=-1, dtype=jnp.float32)[:, None], (b, kv * g, t))
    return _ungroup(out), kept


def attention_capacity(cfg: ModelConfig, cache_size: int, slack: float) -> int:
    """Gathered keys per query head for a cache of ``cache_size`` slots."""
    return capacity(cfg.attn_top_k, cache_size, slack)


def sparse_attention_pays(cfg: ModelConfig, cache_size: int, cap: int) -> bool:
    """Whether the sparse path reads fewer byte-equivalents than the masked one at this size.

    Per kv head the masked path streams ``S * 2H`` values; the sparse path streams ``S * R``
    predictor values and gathers ``G * C * (2H - R)``, each gathered value costing
    the backend policy's ``gather_cost`` streamed ones (:mod:`sparse_jax.decode.policy`).
    """
    h, r, g = cfg.head_dim, cfg.attn_predictor_dim, cfg.group_size
    sparse = cache_size * r + policy_for().gather_cost * g * cap * (2 * h - r)
    return sparse < cache_size * 2 * h


def attend_sparse(
    cfg: ModelConfig,
    q: jax.Array,
    layer: dict[str, jax.Array],
    q_pos: jax.Array,
    window: int,
    cap: int,
    new: dict[str, jax.Array],
    kernels: Kernels = XLA_KERNELS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Spark attention of one query per row, gathering only the kept keys' rest and values.

    The current token's own key is not in the cache yet (``new``): it takes part in the
    threshold and the softmax as key number S, and its term is added outside the gather.

    Args:
      cfg: model config (``attn_kind`` must be "spark").
      q: [B, 1, N, H] rotated queries.
      layer: one layer's cache entries before this token.
      q_pos: [B, 1] query positions.
      window: the layer's attention window.
      cap: static number of gathered keys per query head (see :func:`attention_capacity`).
      new: this token's entries ([B, K, 1, *] and ``pos`` [B, 1]).
      kernels: runs the gathered combination (:mod:`sparse_jax.kernels`).

    Returns:
      out [B, 1, N, H] float32, kept keys per query [B, N, 1] float32, and an int32 scalar:
      1 if some query head kept more keys than the capacity (the masked combination was used).
    """
    valid = _valid(q_pos, layer, new, window)
    qg = _grouped(cfg, q)
    b, kv, g, _, h = qg.shape
    s = layer["pos"].shape[1]
    scores = spark_scores(cfg, qg, layer, new)
    keep = spark_keep(cfg, scores, valid, True)
    idx, count = compact(keep[:, :, :, 0], cap)  # [B, K, G, C] in [0, S], [B, K, G]
    overflow = jnp.any(count > cap)

    def masked(_: None) -> jax.Array:
        return _spark_combine(cfg, qg, scores, keep, layer, new)[:, :, :, 0]

    def gathered(_: None) -> jax.Array:
        picked = jnp.take_along_axis(scores[:, :, :, 0], idx, axis=-1)
        in_count = jnp.arange(cap) < count[..., None]
        p = safe_softmax(jnp.where(in_count, picked, -jnp.inf))
        is_new = (idx == s) & in_count
        q_rest = _gate_query(cfg, qg)[:, :, :, 0]  # [B, K, G, H-R]
        out = kernels.topk_attention(
            q_rest.reshape(b, kv * g, -1),
            jnp.where(is_new, 0.0, p).reshape(b, kv * g, cap),
            jnp.where(is_new, 0, idx).reshape(b, kv * g, cap),
            layer["k_rest"],
            layer["v"],
        ).reshape(b, kv, g, h)
        p_new = jnp.sum(jnp.where(is_new, p, 0.0), axis=-1)  # [B, K, G]
        gate_new = jnp.einsum("bkgr,bkr->bkg", q_rest, new["k_rest"][:, :, 0])
        weight_new = p_new * jax.nn.softplus(gate_new.astype(jnp.float32))
        return out + weight_new[..., None] * new["v"][:, :, 0][:, :, None].astype(jnp.float32)

    out = jax.lax.cond(overflow, masked, gathered, None)
    kept = count.astype(jnp.float32).reshape(b, kv * g, 1)
    return out.reshape(b, 1, kv * g, h), kept, overflow.astype(jnp.int32)
