"""Blockwise dense and Spark attention over a sequence's own keys, in O(T x block) memory.

The materialized form (:func:`sparse_jax.model.attention.attend_masked`) builds every
``[B, K, G, T, S]`` tensor at once. Here query blocks are visited one at a time (``lax.map``)
and, inside each, key blocks are scanned; no tensor larger than ``[B, K, G, bq, bk]`` exists.

* Dense (Gemma-2): one pass, an online softmax over the soft-capped scores of valid keys.
* Spark: the statistical threshold needs each query's moments over all of its valid keys, so
  two passes. Pass 1 merges per-block (count, mean, squared deviations, max) with Chan's
  parallel formula, exact up to rounding and free of the ``E[x^2] - mean^2`` cancellation;
  it gives theta as :func:`pallas_kernels.stat_topk.xla.statistical_threshold` does (capped at
  the row's maximum, every valid key kept when ``n_valid <= k``). Pass 2 runs an online
  softmax over the kept scores whose numerator carries ``softplus(gate) * v`` and whose
  denominator does not.

Key blocks without a valid key for the whole query block (beyond the causal edge, outside a
sliding window) are skipped with ``lax.cond``. Gradients come from a ``custom_vjp`` whose
backward recomputes the scores block by block from the saved per-query log-sum-exp (and, for
Spark, theta): no ``[T, S]`` tensor is stored. As in the mask form, no gradient flows through
theta.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.blockwise_attention import tile


class Blocks(NamedTuple):
    """Static settings: block sizes, soft-cap, Spark's k (0 for dense)."""

    block_q: int
    block_k: int
    softcap: float | None
    top_k: int


def _cap(raw: jax.Array, cap: float | None) -> jax.Array:
    return raw if cap is None else cap * jnp.tanh(raw / cap)


def _cap_grad(capped: jax.Array, cap: float | None) -> jax.Array:
    return jnp.ones_like(capped) if cap is None else 1.0 - jnp.square(capped / cap)


def _softplus(x: jax.Array) -> jax.Array:
    """log(1 + e^x) as max(x, 0) + log1p(e^-|x|): finite for every finite x."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _softplus_and_sigmoid(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """softplus(x) and its derivative sigmoid(x) from one exponential, e^-|x|."""
    e = jnp.exp(-jnp.abs(x))
    softplus = jnp.maximum(x, 0.0) + jnp.log1p(e)
    sigmoid = jnp.where(x >= 0, 1.0, e) / (1.0 + e)
    return softplus, sigmoid


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, K, G, q, W] . [B, K, k, W] -> [B, K, G, q, k] float32."""
    return jnp.einsum("bkgqw,bksw->bkgqs", a, b, preferred_element_type=jnp.float32)


def _valid(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array) -> jax.Array:
    """bool [B, 1, 1, q, k]: causal, inside the window, filled key slot, real query."""
    qp, kp = q_pos[:, None, None, :, None], k_pos[:, None, None, None, :]
    return (kp >= 0) & (qp >= 0) & (kp <= qp) & (qp - kp < window)


def _any_valid(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array) -> jax.Array:
    """Whether some (query, key) pair of the two blocks may be valid, by their bounds over the
    whole batch: a scalar for lax.cond."""
    return tile.tile_is_live(
        *tile.position_bounds(q_pos, None), *tile.position_bounds(k_pos, None), window
    )


def _blocks(x: jax.Array, size: int, axis: int) -> jax.Array:
    """Splits ``axis`` (queries or keys) into blocks of ``size``: [n_blocks, ...]."""
    n = x.shape[axis] // size
    x = x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _threshold(scores: jax.Array, valid: jax.Array, carry, top_k: int):
    """Merges one key block into the running (count, mean, M2, max) of each query."""
    count, mean, m2, top = carry
    n_b = jnp.sum(valid, axis=-1, dtype=jnp.float32)
    sum_b = jnp.sum(jnp.where(valid, scores, 0.0), axis=-1)
    mean_b = sum_b / jnp.maximum(n_b, 1.0)
    dev = jnp.where(valid, scores - mean_b[..., None], 0.0)
    m2_b = jnp.sum(dev * dev, axis=-1)
    max_b = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1)
    total = count + n_b
    delta = mean_b - mean
    share = n_b / jnp.maximum(total, 1.0)
    mean = mean + delta * share
    m2 = m2 + m2_b + delta * delta * count * share
    return total, mean, m2, jnp.maximum(top, max_b)


def _theta(count, mean, m2, top, top_k: int, enabled) -> tuple[jax.Array, jax.Array]:
    """theta and keep-all per query, as ``statistical_threshold`` with a valid mask."""
    std = jnp.sqrt(jnp.maximum(m2 / jnp.maximum(count, 1.0), 0.0))
    frac = jnp.clip(1.0 - top_k / jnp.maximum(count, 1.0), 1e-6, 1.0 - 1e-6)
    theta = jnp.minimum(mean + jax.scipy.special.ndtri(frac) * std, top)
    keep_all = (count <= top_k) | jnp.logical_not(enabled)
    return theta, keep_all


def _forward_block(q, keys, v, q_pos, k_pos, window, enabled, blocks: Blocks):
    """One query block: (out [B, K, G, bq, H] f32, lse [B, K, G, bq], theta, keep_all)."""
    spark = blocks.top_k > 0
    b, kv, g, bq, _ = q[0].shape
    bk = blocks.block_k
    kb = [_blocks(x, bk, 2) for x in keys]
    vb = _blocks(v, bk, 2)
    pb = _blocks(k_pos, bk, 1)
    shape = (b, kv, g, bq)
    theta = jnp.full(shape, -jnp.inf, jnp.float32)
    keep_all = jnp.ones(shape, bool)
    if spark:
        # Pass 1 keeps each key block's capped predictor scores (the query block's row of
        # them, [n_k, B, K, G, bq, bk]: O(S x bq)) for pass 2, which then computes no
        # predictor product or soft-cap of its own.
        def moments(carry, xs):
            k_pred, pos = xs

            def merge(c):
                valid = _valid(q_pos, pos, window)
                scores = _cap(_dot(q[0], k_pred), blocks.softcap)
                valid = jnp.broadcast_to(valid, scores.shape)
                return _threshold(scores, valid, c, blocks.top_k), scores

            def skip(c):
                return c, jnp.zeros((*shape, bk), jnp.float32)

            return jax.lax.cond(_any_valid(q_pos, pos, window), merge, skip, carry)

        zeros = jnp.zeros(shape, jnp.float32)
        init = (zeros, zeros, zeros, jnp.full(shape, -jnp.inf, jnp.float32))
        (count, mean, m2, top), pred_scores = jax.lax.scan(moments, init, (kb[0], pb))
        theta, keep_all = _theta(count, mean, m2, top, blocks.top_k, enabled)

    def attend(carry, xs):
        *key_parts, values, pos, stored = xs

        def step(c):
            m, total, acc, n = c
            valid = jnp.broadcast_to(_valid(q_pos, pos, window), (*shape, bk))
            scores = stored if spark else _cap(_dot(q[0], key_parts[0]), blocks.softcap)
            kept = valid & (keep_all[..., None] | (scores >= theta[..., None])) if spark else valid
            s = jnp.where(kept, scores, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - safe[..., None])
            rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
            weight = p * _softplus(_dot(q[1], key_parts[1])) if spark else p
            pv = jnp.einsum(
                "bkgqs,bksw->bkgqw",
                weight.astype(values.dtype),
                values,
                preferred_element_type=jnp.float32,
            )
            n = n + jnp.sum(kept, axis=-1, dtype=jnp.float32)
            return m_new, total * rescale + jnp.sum(p, -1), acc * rescale[..., None] + pv, n

        return jax.lax.cond(_any_valid(q_pos, pos, window), step, lambda c: c, carry), None

    h = v.shape[-1]
    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, h), jnp.float32),
        jnp.zeros(shape, jnp.float32),
    )
    stored = pred_scores if spark else jnp.zeros((pb.shape[0],), jnp.float32)
    (m, total, acc, n), _ = jax.lax.scan(attend, init, (*kb, vb, pb, stored))
    out = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)
    lse = jnp.where(total > 0, m + jnp.log(jnp.maximum(total, 1e-30)), jnp.inf)
    return out, lse, theta, keep_all, n


def _run_forward(q, keys, v, q_pos, k_pos, window, enabled, blocks: Blocks):
    bq = blocks.block_q
    qb = [_blocks(x, bq, 3) for x in q]
    pb = _blocks(q_pos, bq, 1)

    def one(xs):
        *q_parts, pos = xs
        return _forward_block(q_parts, keys, v, pos, k_pos, window, enabled, blocks)

    out, lse, theta, keep_all, n = jax.lax.map(one, (*qb, pb))
    merge = lambda x: jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], -1, *x.shape[5:])  # noqa: E731
    return merge(out), merge(lse), merge(theta), merge(keep_all), merge(n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def attention(q, keys, v, q_pos, k_pos, window, enabled, blocks: Blocks):
    """Padded inputs (T a multiple of ``block_q``, S of ``block_k``); (out f32, count)."""
    out, _, _, _, n = _run_forward(q, keys, v, q_pos, k_pos, window, enabled, blocks)
    return out, n


def _attention_fwd(q, keys, v, q_pos, k_pos, window, enabled, blocks: Blocks):
    out, lse, theta, keep_all, n = _run_forward(q, keys, v, q_pos, k_pos, window, enabled, blocks)
    return (out, n), (q, keys, v, q_pos, k_pos, window, enabled, out, lse, theta, keep_all)


def _attention_bwd(blocks: Blocks, residuals, cotangents):
    q, keys, v, q_pos, k_pos, window, _, out, lse, theta, keep_all = residuals
    d_out, _ = cotangents
    spark = blocks.top_k > 0
    bq, bk = blocks.block_q, blocks.block_k
    delta = jnp.sum(d_out * out, axis=-1)  # do_i . out_i
    qb = [_blocks(x, bq, 3) for x in q]
    per_query = [_blocks(x, bq, 3) for x in (d_out, lse, delta, theta, keep_all)]
    pb = _blocks(q_pos, bq, 1)
    kb = [_blocks(x, bk, 2) for x in keys]
    vb = _blocks(v, bk, 2)
    kpb = _blocks(k_pos, bk, 1)

    def query_block(d_keys, xs):
        *q_parts, do, lse_b, delta_b, theta_b, keep_b, pos = xs

        def key_block(dq, ys):
            *key_parts, values, kpos = ys

            def grads(dq):
                shape = lse_b.shape
                valid = jnp.broadcast_to(_valid(pos, kpos, window), (*shape, bk))
                scores = _cap(_dot(q_parts[0], key_parts[0]), blocks.softcap)
                if spark:
                    kept = valid & (keep_b[..., None] | (scores >= theta_b[..., None]))
                else:
                    kept = valid
                safe_lse = jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)
                p = jnp.where(kept, jnp.exp(scores - safe_lse[..., None]), 0.0)
                dv_dot = jnp.einsum(
                    "bkgqw,bksw->bkgqs", do, values.astype(jnp.float32)
                )  # do_i . v_j
                if spark:
                    gate, gate_grad = _softplus_and_sigmoid(_dot(q_parts[1], key_parts[1]))
                    weight = p * gate
                    d_gate_pre = p * dv_dot * gate_grad
                    d_scores = p * (gate * dv_dot - delta_b[..., None])
                else:
                    weight = p
                    d_scores = p * (dv_dot - delta_b[..., None])
                d_raw = d_scores * _cap_grad(scores, blocks.softcap)
                new_dq = [dq[0] + jnp.einsum("bkgqs,bksw->bkgqw", d_raw, key_parts[0])]
                dk = [jnp.einsum("bkgqs,bkgqw->bksw", d_raw, q_parts[0])]
                if spark:
                    new_dq.append(dq[1] + jnp.einsum("bkgqs,bksw->bkgqw", d_gate_pre, key_parts[1]))
                    dk.append(jnp.einsum("bkgqs,bkgqw->bksw", d_gate_pre, q_parts[1]))
                dv = jnp.einsum("bkgqs,bkgqw->bksw", weight, do)
                return tuple(new_dq), (*dk, dv)

            def skip(dq):
                zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (*key_parts, values))
                return dq, zeros

            return jax.lax.cond(_any_valid(pos, kpos, window), grads, skip, dq)

        dq0 = tuple(jnp.zeros(x.shape, jnp.float32) for x in q_parts)
        dq, d_blocks = jax.lax.scan(key_block, dq0, (*kb, vb, kpb))
        # d_blocks: per key block [n_k, B, K, bk, W] -> [B, K, S, W], added to the totals.
        unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], -1, x.shape[-1])  # noqa: E731
        d_keys = tuple(t + unblock(d) for t, d in zip(d_keys, d_blocks, strict=True))
        return d_keys, dq

    totals = tuple(jnp.zeros(x.shape, jnp.float32) for x in (*keys, v))
    totals, dq_blocks = jax.lax.scan(query_block, totals, (*qb, *per_query, pb))
    merge = lambda x: jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], -1, x.shape[-1])  # noqa: E731
    dq = tuple(merge(d).astype(x.dtype) for d, x in zip(dq_blocks, q, strict=True))
    d_keys = tuple(d.astype(x.dtype) for d, x in zip(totals[:-1], keys, strict=True))
    dv = totals[-1].astype(v.dtype)
    return dq, d_keys, dv, None, None, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
