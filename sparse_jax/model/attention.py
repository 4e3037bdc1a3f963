"""Grouped-query attention, dense (Gemma-2) and Spark (docs/method.md, section 3).

Both variants share the projections ``wq`` [N, H, D], ``wk`` and ``wv`` [K, H, D] and ``wo``
[D, N, H]; they differ in how a query weighs the keys:

* dense: ``softmax(softcap(q.k * H^-1/2))`` over valid keys;
* Spark: predictor scores ``s = softcap(q[:R].k[:R] * R^-1/2)`` pick about ``attn_top_k`` keys by
  statistical top-k over the valid keys, then ``w = softmax(s)[kept] * softplus(q[R:].k[R:] *
  (H-R)^-1/2)``; the weights no longer sum to one. RoPE rotates [:R] and [R:] separately.

One :class:`Attention` module serves training, evaluation, chunked prefill and the decode step.
Keys and values are always held as they are cached, per kv head: ``k`` [B, K, S, H] (dense) or
``k_pred`` [B, K, S, R] and ``k_rest`` [B, K, S, H-R] (Spark), ``v`` [B, K, S, H] and their
positions ``pos`` [B, S] (-1 for an empty slot). A query block attends to a sequence of such
*segments*: in training its own keys; in prefill and decoding the cache, then its own keys
(which the caller writes to the cache afterwards). Decoding may take the sparse path
(:func:`attend_sparse`): the kept keys are compacted into a static capacity and only their
``k_rest`` and ``v`` rows are read; an overflowing selection takes the masked combination for
that step (``lax.cond``) and is counted, never truncated. With the native CPU kernels a
one-token step attends in one fused kernel instead
(:func:`sparse_jax.model.attention_native.attend_decode_native`, dense and Spark), which
gathers any number of kept keys; a Spark prefill chunk takes XLA's raw predictor scores and
one native kernel for the soft-cap, mask, threshold and kept keys (:func:`attend_scored_native`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.stat_topk.xla import statistical_threshold
from sparse_jax.kernels import DEFAULT_KERNELS, Kernels
from sparse_jax.model import attention_native as native_paths
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.layers import dtype_of, safe_softmax, softcap, split_rope
from sparse_jax.model.selection import compact
from sparse_jax.model.weights import ATTENTION, declare_all
from sparse_jax.policy import policy_for

Segment = dict[str, jax.Array]
# Logical axes of the scores per query head [B, N, T, S] (for the kernel seam's sharding).
SCORES = ("batch", "heads", "seq", None)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array | int) -> jax.Array:
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


def key_entries(cfg: ModelConfig, k: jax.Array, v: jax.Array, pos: jax.Array) -> Segment:
    """Rotated keys and values [B, T, K, H] at positions [B, T] -> one segment (cache layout).

    Entries at padding positions (-1) are zeroed, as an empty cache slot holds.
    """
    real = (pos >= 0)[:, :, None, None]
    k = jnp.swapaxes(jnp.where(real, k, 0), 1, 2)
    out: Segment = {}
    if cfg.attn_kind == "spark":
        r = cfg.attn_predictor_dim
        out["k_pred"], out["k_rest"] = k[..., :r], k[..., r:]
    else:
        out["k"] = k
    out["v"] = jnp.swapaxes(jnp.where(real, v, 0), 1, 2)
    out["pos"] = pos
    return out


def _grouped(cfg: ModelConfig, q: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T, H]."""
    b, t, n, h = q.shape
    kv = cfg.num_kv_heads
    return jnp.transpose(q.reshape(b, t, kv, n // kv, h), (0, 2, 3, 1, 4))


def _ungroup(out: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H]."""
    b, kv, g, t, h = out.shape
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, kv * g, h)


def _per_kv(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An einsum over [B, K, G, T, *] operands with G and T merged into one M axis.

    XLA's CPU dot runs several times slower with the query axes kept apart (29 ms against
    11 ms for the scores of an 8192-key decode step), so both become one M axis of a batched
    matmul. For few query rows the backend policy may put the keys on the left
    (``keys_left_max_rows``).

    Args:
      spec: "scores" (q [B, K, G, T, W] . keys [B, K, S, W] -> [B, K, G, T, S]) or "values"
        (weights [B, K, G, T, S] . values [B, K, S, W] -> [B, K, G, T, W]).
      a: the grouped operand.
      b: the key or value operand.

    Returns:
      float32 [B, K, G, T, S or W].
    """
    bsz, kv, g, t, w = a.shape
    merged = a.reshape(bsz, kv, g * t, w)
    if spec == "scores":
        if g * t <= policy_for().keys_left_max_rows:
            out = jnp.einsum("bksw,bkmw->bksm", b, merged, preferred_element_type=jnp.float32)
            out = jnp.swapaxes(out, -1, -2)
        else:
            out = jnp.einsum("bkmw,bksw->bkms", merged, b, preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("bkms,bksw->bkmw", merged, b, preferred_element_type=jnp.float32)
    return out.reshape(bsz, kv, g, t, out.shape[-1])


def _scores(q: jax.Array, segments: Sequence[Segment], name: str) -> jax.Array:
    """q [B, K, G, T, W] against every segment's keys ``name``: [B, K, G, T, S total]."""
    parts = [_per_kv("scores", q, seg[name]) for seg in segments]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _values(weights: jax.Array, segments: Sequence[Segment]) -> jax.Array:
    """Weights [B, K, G, T, S total] over every segment's values: [B, K, G, T, H] float32."""
    out, start = None, 0
    for seg in segments:
        v = seg["v"]
        s = v.shape[2]
        part = _per_kv("values", weights[..., start : start + s].astype(v.dtype), v)
        out = part if out is None else out + part
        start += s
    return out


def _valid(q_pos: jax.Array, segments: Sequence[Segment], window: jax.Array | int) -> jax.Array:
    """bool [B, T, S total]: causal, in-window, filled slots of every segment."""
    pos = [seg["pos"] for seg in segments]
    pos = pos[0] if len(pos) == 1 else jnp.concatenate(pos, axis=1)
    return attention_mask(q_pos, pos, window)


def _softmax(scores: jax.Array, guarded: bool) -> jax.Array:
    # A training query always sees its own key, so no row is empty and the plain softmax
    # serves (the guarded one cost 3% of a small-preset train step on CPU). With a cache,
    # padding queries have no valid key: safe_softmax gives them zero weights.
    return safe_softmax(scores) if guarded else jax.nn.softmax(scores, axis=-1)


def spark_scores(cfg: ModelConfig, qg: jax.Array, segments: Sequence[Segment]) -> jax.Array:
    """Soft-capped predictor scores [B, K, G, T, S] float32 of grouped queries [B, K, G, T, H]."""
    r = cfg.attn_predictor_dim
    q_pred = qg[..., :r] * jnp.asarray(cfg.resolved_predictor_query_scale, qg.dtype)
    return softcap(_scores(q_pred, segments, "k_pred"), cfg.attn_logit_softcap)


def spark_keep(cfg: ModelConfig, scores: jax.Array, valid: jax.Array) -> jax.Array:
    """The sparse path's keep mask: the same keys as the masked path's ``mask_topk``.

    Args:
      cfg: model config (top-k, threshold method).
      scores: [B, K, G, T, S] float32.
      valid: bool [B, T, S].

    Returns:
      bool [B, K, G, T, S].
    """
    valid = valid[:, None, None]
    theta, keep_all = statistical_threshold(
        scores, cfg.attn_top_k, valid=valid, method=cfg.topk_method
    )
    return (keep_all | (scores >= theta)) & valid


def _gate_query(cfg: ModelConfig, qg: jax.Array) -> jax.Array:
    r = cfg.attn_predictor_dim
    return qg[..., r:] * jnp.asarray(cfg.resolved_gate_query_scale, qg.dtype)


def attend_masked(
    cfg: ModelConfig,
    q: jax.Array,
    segments: Sequence[Segment],
    q_pos: jax.Array,
    window: jax.Array | int,
    enabled: jax.Array | bool = True,
    kernels: Kernels = DEFAULT_KERNELS,
    guarded: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Attention of T queries per row over every key of ``segments``, invalid keys masked.

    Args:
      cfg: model config.
      q: [B, T, N, H] rotated queries.
      segments: key segments (see the module docstring), attended in order.
      q_pos: [B, T] query positions; -1 marks a padding query (its output is 0 when guarded).
      window: the layer's attention window.
      enabled: Spark layers only: false keeps every valid key (a traced bool is fine).
      kernels: the implementation of the statistical top-k (:mod:`sparse_jax.kernels`).
      guarded: softmax that gives zeros on a row with no valid key (see :func:`_softmax`).

    Returns:
      out [B, T, N, H] float32 and the attended keys per query head [B, N, T] float32.
    """
    valid = _valid(q_pos, segments, window)
    qg = _grouped(cfg, q)
    b, kv, g, t, _ = qg.shape
    if cfg.attn_kind == "spark":
        scores = spark_scores(cfg, qg, segments)
        # Per query head [B, N, T, S]: the heads axis is split as the projections' heads are.
        kept = kernels.mask_topk(
            scores.reshape(b, kv * g, t, -1),
            cfg.attn_top_k,
            valid=valid[:, None],
            enabled=enabled,
            method=cfg.topk_method,
            logical=SCORES,
        ).reshape(scores.shape)
        gate = _scores(_gate_query(cfg, qg), segments, "k_rest")
        weights = _softmax(kept, guarded) * jax.nn.softplus(gate)
        count = jnp.sum(jnp.isfinite(kept), axis=-1, dtype=jnp.float32).reshape(b, kv * g, t)
    else:
        q_scaled = qg * jnp.asarray(cfg.resolved_query_scale, qg.dtype)
        scores = softcap(_scores(q_scaled, segments, "k"), cfg.attn_logit_softcap)
        weights = _softmax(jnp.where(valid[:, None, None], scores, -jnp.inf), guarded)
        count = jnp.broadcast_to(
            jnp.sum(valid, axis=-1, dtype=jnp.float32)[:, None], (b, kv * g, t)
        )
    return _ungroup(_values(weights, segments)), count


def uses_blockwise(cfg: ModelConfig, length: int, keys: int | None = None) -> bool:
    """Whether a block of ``length`` queries attends blockwise to ``keys`` keys (its own
    ``length`` keys when None; a prefill chunk: the cache's slots and its own).

    Under ``attn_impl="auto"`` that is when the score tensors would hold at least
    ``policy.blockwise_min_len ** 2`` entries per head: a training sequence of that length,
    or a prefill chunk of 256 tokens over 1024 keys at the default 512.
    """
    keys = length if keys is None else keys
    if cfg.attn_impl == "auto":
        least = policy_for().blockwise_min_len
        return cfg.topk_method == "statistical" and length * keys >= least * least
    return cfg.attn_impl == "blockwise"


def _slots(cache: Segment | None) -> int:
    return 0 if cache is None else cache["pos"].shape[1]


def joined(cache: Segment, new: Segment) -> Segment:
    """The cache's entries followed by the block's own: one segment over both."""
    return {
        name: jnp.concatenate([cache[name], new[name]], axis=1 if name == "pos" else 2)
        for name in new
    }


def attend_blockwise(
    cfg: ModelConfig,
    q: jax.Array,
    segment: Segment,
    q_pos: jax.Array,
    window: jax.Array | int,
    enabled: jax.Array | bool = True,
    kernels: Kernels = DEFAULT_KERNELS,
) -> tuple[jax.Array, jax.Array]:
    """:func:`attend_masked` over one segment (a block's own keys, or a cache's joined with
    them), computed blockwise in O(T x ``cfg.attn_key_block_size``) memory
    (:mod:`pallas_kernels.blockwise_attention`, in the implementation ``kernels`` resolves
    to: on CPU the native kernels for Spark on one device and the XLA scan otherwise, Pallas
    on TPU and GPU).

    Returns:
      out [B, T, N, H] float32 and the attended keys per query head [B, N, T] float32.
    """
    qg = _grouped(cfg, q)
    b, kv, g, t, _ = qg.shape
    if cfg.attn_kind == "spark":
        r = cfg.attn_predictor_dim
        parts = (
            qg[..., :r] * jnp.asarray(cfg.resolved_predictor_query_scale, qg.dtype),
            _gate_query(cfg, qg),
        )
        keys = (segment["k_pred"], segment["k_rest"])
    else:
        parts = (qg * jnp.asarray(cfg.resolved_query_scale, qg.dtype),)
        keys = (segment["k"],)
    out, count = kernels.blockwise_attention(
        parts,
        keys,
        segment["v"],
        q_pos,
        segment["pos"],
        window,
        enabled=enabled,
        softcap=cfg.attn_logit_softcap,
        top_k=cfg.attn_top_k if cfg.attn_kind == "spark" else 0,
        block_q=cfg.attn_block_size,
        block_k=cfg.attn_key_block_size,
    )
    return _ungroup(out), count.reshape(b, kv * g, t)


def attend_scored_native(
    cfg: ModelConfig,
    q: jax.Array,
    segments: Sequence[Segment],
    q_pos: jax.Array,
    window: jax.Array | int,
    enabled: bool,
    kernels: Kernels,
) -> tuple[jax.Array, jax.Array]:
    """:func:`attend_masked` of a Spark prefill chunk with the native kernels: XLA's raw
    predictor scores over every key, then one native kernel soft-caps and masks each query's
    row, takes the threshold and reads only the kept keys' ``k_rest`` and ``v`` rows (no
    capacity; nothing overflows).

    Returns:
      out [B, T, N, H] float32 and the attended keys per query head [B, N, T] float32.
    """
    qg = _grouped(cfg, q)
    b, kv, g, t, _ = qg.shape
    r = cfg.attn_predictor_dim
    # One segment: joining the keys copies less than joining the scores would.
    keys = segments[0] if len(segments) == 1 else joined(*segments)
    q_pred = qg[..., :r] * jnp.asarray(cfg.resolved_predictor_query_scale, qg.dtype)
    out, count = kernels.spark_scored_attention(
        _scores(q_pred, (keys,), "k_pred"),
        _gate_query(cfg, qg),
        keys["k_rest"],
        keys["v"],
        q_pos,
        keys["pos"],
        window,
        top_k=cfg.attn_top_k if enabled else keys["pos"].shape[1],
        softcap=cfg.attn_logit_softcap,
    )
    return _ungroup(out), count.reshape(b, kv * g, t)


def attend_sparse(
    cfg: ModelConfig,
    q: jax.Array,
    cache: Segment,
    new: Segment,
    q_pos: jax.Array,
    window: int,
    cap: int,
    kernels: Kernels = DEFAULT_KERNELS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Spark attention of one query per row, gathering only the kept keys' rest and values.

    The current token's own key is not in the cache yet (``new``): it takes part in the
    threshold and the softmax as key number S, and its term is added outside the gather.

    Args:
      cfg: model config (``attn_kind`` must be "spark").
      q: [B, 1, N, H] rotated queries.
      cache: one layer's cache entries before this token (S slots).
      new: this token's entries (one slot).
      q_pos: [B, 1] query positions.
      window: the layer's attention window.
      cap: static number of gathered keys per query head.
      kernels: runs the gathered combination (:mod:`sparse_jax.kernels`).

    Returns:
      out [B, 1, N, H] float32, kept keys per query head [B, N, 1] float32, and an int32
      scalar: 1 if some query head kept more keys than the capacity (the masked combination
      was used).
    """
    segments = (cache, new)
    qg = _grouped(cfg, q)
    b, kv, g, _, h = qg.shape
    s = cache["pos"].shape[1]
    scores = spark_scores(cfg, qg, segments)
    keep = spark_keep(cfg, scores, _valid(q_pos, segments, window))
    idx, count = compact(keep[:, :, :, 0], cap)  # [B, K, G, C] in [0, S], [B, K, G]
    overflow = jnp.any(count > cap)

    def masked(_: None) -> jax.Array:
        probs = safe_softmax(jnp.where(keep, scores, -jnp.inf))
        gate = _scores(_gate_query(cfg, qg), segments, "k_rest")
        return _values(probs * jax.nn.softplus(gate), segments)[:, :, :, 0]

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
            cache["k_rest"],
            cache["v"],
        ).reshape(b, kv, g, h)
        p_new = jnp.sum(jnp.where(is_new, p, 0.0), axis=-1)  # [B, K, G]
        gate_new = jnp.einsum("bkgr,bkr->bkg", q_rest, new["k_rest"][:, :, 0])
        weight_new = p_new * jax.nn.softplus(gate_new.astype(jnp.float32))
        return out + weight_new[..., None] * new["v"][:, :, 0][:, :, None].astype(jnp.float32)

    out = jax.lax.cond(overflow, masked, gathered, None)
    kept = count.astype(jnp.float32).reshape(b, kv * g, 1)
    return out.reshape(b, 1, kv * g, h), kept, overflow.astype(jnp.int32)


class Attention(nn.Module):
    """Projections, RoPE and the attend function chosen by ``cfg.attn_kind``.

    Attributes:
      cfg: the model.
      kernels: implementation of the sparse ops (:mod:`sparse_jax.kernels`).
    """

    cfg: ModelConfig
    kernels: Kernels = DEFAULT_KERNELS

    def setup(self) -> None:
        declare_all(self, self.cfg, ATTENTION)

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> rotated q [B, T, N, H], rotated k and v [B, T, K, H]."""
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        qkv = self.kernels.linear_many(x, (self.wq, self.wk, self.wv), dtype)
        q, k, v = (a.astype(dtype) for a in qkv)
        split = cfg.attn_predictor_dim if cfg.attn_kind == "spark" else None
        q = split_rope(q, positions, cfg.rope_base, split)
        k = split_rope(k, positions, cfg.rope_base, split)
        q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        window: jax.Array | int,
        enabled: jax.Array | bool,
        cache: Segment | None = None,
        sparse_capacity: int | None = None,
    ) -> tuple[jax.Array, Segment, jax.Array, jax.Array]:
        """Attention of x [B, T, D] at ``positions`` [B, T] (-1: padding).

        Args:
          x: [B, T, D] normed inputs.
          positions: [B, T] positions; -1 marks a padding token.
          window: the layer's window (static int or traced scalar).
          enabled: whether the layer's Spark sparsity is on (static or traced bool).
          cache: this layer's cached entries, attended before the block's own keys; None in
            training and evaluation (the block attends to itself).
          sparse_capacity: decode only (T = 1, a Spark layer, a cache): gather this many
            keys per query head instead of reading every cached key.

        Returns:
          y [B, T, D] (compute dtype), this block's entries for the cache, kept keys per query
          head [B, N, T] and an int32 overflow flag of the sparse path.
        """
        dtype = dtype_of(self.cfg.dtype)
        q, k, v = self.project(x, positions)
        new = key_entries(self.cfg, k, v, positions)
        overflow = jnp.zeros((), jnp.int32)
        if native_paths.native_decode(self.cfg, self.kernels, x.shape[1], cache) and (
            sparse_capacity is not None or self.cfg.attn_kind == "dense"
        ):
            out, kept = native_paths.attend_decode_native(
                self.cfg, q, cache, new, positions, window, self.kernels
            )
        elif sparse_capacity is not None:
            out, kept, overflow = attend_sparse(
                self.cfg, q, cache, new, positions, window, sparse_capacity, self.kernels
            )
        elif native_paths.native_prefill(self.cfg, self.kernels, x.shape[:2], cache, enabled):
            out, kept = attend_scored_native(
                self.cfg, q, (cache, new), positions, window, enabled, self.kernels
            )
        elif native_paths.native_blockwise(self.cfg, self.kernels, cache) or (
            uses_blockwise(self.cfg, x.shape[1], x.shape[1] + _slots(cache))
            and (cache is None or x.shape[1] > 1)
        ):
            keys = new if cache is None else joined(cache, new)
            out, kept = attend_blockwise(
                self.cfg, q, keys, positions, window, enabled, self.kernels
            )
        else:
            segments = (new,) if cache is None else (cache, new)
            out, kept = attend_masked(
                self.cfg, q, segments, positions, window, enabled, self.kernels, cache is not None
            )
        b, t, n, h = out.shape
        wo = self.wo.reshape(self.cfg.model_dim, n * h)
        y = self.kernels.linear(out.reshape(b, t, n * h).astype(dtype), wo, dtype).astype(dtype)
        return y, new, kept, overflow
