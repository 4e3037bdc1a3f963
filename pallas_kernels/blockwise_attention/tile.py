"""The per-tile math of the Pallas blockwise attention kernels, shared by TPU and GPU.

A tile is one query head's ``bq`` queries against ``bk`` keys: 2-D arrays only (queries
[bq, W], keys [bk, W], values [bk, H], per-query statistics [bq, 1]), so the same functions
lower to Mosaic and to Triton. Scores are float32; matmuls take the operands' dtype and
accumulate in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """``q @ k.T`` in float32: [bq, W] x [bk, W] -> [bq, bk]."""
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` accumulated in float32: [m, n] x [n, w] -> [m, w]. The float32 tile ``a``
    is rounded to ``b``'s dtype first, so bfloat16 operands keep the fast matmul path."""
    return jax.lax.dot_general(
        a.astype(b.dtype), b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def product_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a.T @ b`` accumulated in float32: [m, n] x [m, w] -> [n, w] (``a`` rounded to
    ``b``'s dtype, as in :func:`product`)."""
    return jax.lax.dot_general(
        a.astype(b.dtype), b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def cap(raw: jax.Array, softcap: float | None) -> jax.Array:
    return raw if softcap is None else softcap * jnp.tanh(raw / softcap)


def cap_grad(capped: jax.Array, softcap: float | None) -> jax.Array:
    """d cap(raw) / d raw from the capped value."""
    return 1.0 if softcap is None else 1.0 - jnp.square(capped / softcap)


def valid(q_pos: jax.Array, k_pos: jax.Array, window) -> jax.Array:
    """bool [bq, bk] from query positions [bq, 1] and key positions [1, bk] (-1: none)."""
    return (k_pos >= 0) & (q_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < window)


def merge_moments(count, mean, m2, top, s: jax.Array, ok: jax.Array):
    """Merges one tile's valid scores into each query's (count, mean, M2, max), [bq, 1] each,
    by Chan's parallel formula (no ``E[x^2] - mean^2`` cancellation)."""
    n_b = jnp.sum(ok.astype(jnp.float32), axis=1, keepdims=True)
    mean_b = jnp.sum(jnp.where(ok, s, 0.0), axis=1, keepdims=True) / jnp.maximum(n_b, 1.0)
    dev = jnp.where(ok, s - mean_b, 0.0)
    m2_b = jnp.sum(dev * dev, axis=1, keepdims=True)
    max_b = jnp.max(jnp.where(ok, s, -jnp.inf), axis=1, keepdims=True)
    total = count + n_b
    delta = mean_b - mean
    share = n_b / jnp.maximum(total, 1.0)
    return (
        total,
        mean + delta * share,
        m2 + m2_b + delta * delta * count * share,
        jnp.maximum(top, max_b),
    )


def kept(s: jax.Array, ok: jax.Array, theta, keep_all, spark: bool) -> jax.Array:
    """The attended keys of a tile: valid, and for Spark at or above theta (or keep-all)."""
    if not spark:
        return ok
    return ok & ((keep_all > 0) | (s >= theta))


def online_update(m, total, acc, n, s, keep, gate_pre, v):
    """One tile of the online softmax: running max m, denominator total, numerator acc
    [bq, H] (``softplus(gate) * v`` weighted for Spark, ``gate_pre`` None for dense) and the
    attended count n."""
    masked = jnp.where(keep, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(masked, axis=1, keepdims=True))
    safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    p = jnp.exp(masked - safe)
    rescale = jnp.exp(jnp.where(m > -jnp.inf, m - safe, -jnp.inf))
    weight = p if gate_pre is None else p * jax.nn.softplus(gate_pre)
    acc = acc * rescale + product(weight.astype(v.dtype), v)
    total = total * rescale + jnp.sum(p, axis=1, keepdims=True)
    return m_new, total, acc, n + jnp.sum(keep.astype(jnp.float32), axis=1, keepdims=True)


def finish(total, acc, m):
    """(out [bq, H], lse [bq, 1]) from the online softmax state; rows that attend nothing
    give out 0 and lse +inf."""
    out = jnp.where(total > 0, acc / jnp.maximum(total, 1e-30), 0.0)
    lse = jnp.where(total > 0, m + jnp.log(jnp.maximum(total, 1e-30)), jnp.inf)
    return out, lse


def gradients(q, keys, v, do, lse, delta, theta, keep_all, ok, softcap, spark: bool):
    """The tile's score gradients and value weights for the backward pass.

    Args:
      q: query parts, each [bq, W] (dense: one, Spark: predictor and gate).
      keys: key parts, each [bk, W].
      v: [bk, H]; do: the output cotangent [bq, H] float32 (rounded to v's dtype for its
        products, as flash attention's backward does).
      lse, delta, theta, keep_all: per-query [bq, 1] (delta = do . out).
      ok: bool [bq, bk] valid pairs.

    Returns:
      (d_raw, d_gate) [bq, bk] float32 (d_gate None for dense), the cotangents of the raw
      predictor (or dense) scores and of the gate's pre-activation, and the value weights
      [bq, bk] float32 (``p * softplus(gate)`` for Spark, ``p`` for dense).
    """
    s = cap(scores(q[0], keys[0]), softcap)
    keep = kept(s, ok, theta, keep_all, spark)
    safe = jnp.where(lse < jnp.inf, lse, 0.0)
    p = jnp.where(keep, jnp.exp(s - safe), 0.0)
    dv_dot = scores(do.astype(v.dtype), v)
    if spark:
        gate_pre = scores(q[1], keys[1])
        gate = jax.nn.softplus(gate_pre)
        weight = p * gate
        d_gate = p * dv_dot * jax.nn.sigmoid(gate_pre)
        d_s = p * (gate * dv_dot - delta)
    else:
        weight, d_gate = p, None
        d_s = p * (dv_dot - delta)
    return d_s * cap_grad(s, softcap), d_gate, weight


def block_bounds(q_pos: jax.Array, k_pos: jax.Array, bq: int, bk: int) -> jax.Array:
    """int32 [2 * B * nq + 2 * B * nk]: each query block's smallest real position and largest
    position (-1: all padding), then each key block's smallest and largest filled position
    (int32 max and -1 when empty), each part flattened over (row, block)."""
    parts = (
        *position_bounds(q_pos.reshape(q_pos.shape[0], -1, bq), -1),
        *position_bounds(k_pos.reshape(k_pos.shape[0], -1, bk), -1),
    )
    return jnp.concatenate([p.reshape(-1) for p in parts])


def position_bounds(pos: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
    """The smallest and largest real position (>= 0) along ``axis`` (None: all), int32 max
    and -1 where there is none."""
    real = pos >= 0
    lo = jnp.min(jnp.where(real, pos, jnp.iinfo(jnp.int32).max), axis=axis)
    return lo, jnp.max(jnp.where(real, pos, -1), axis=axis)


def tile_is_live(q_lo, q_hi, k_lo, k_hi, window):
    """Whether a query block and a key block share a valid pair by their bounds (some key at
    or before some query, within the window); conservative, never false for a live tile."""
    return (k_hi >= 0) & (q_hi >= 0) & (k_lo <= q_hi) & (q_lo - k_hi < window)


def live_tiles(q_pos: jax.Array, k_pos: jax.Array, window, bq: int, bk: int) -> jax.Array:
    """int32 [B * nq * nk]: :func:`tile_is_live` of query block i and key block j of a row."""
    b, nq, nk = q_pos.shape[0], q_pos.shape[1] // bq, k_pos.shape[1] // bk
    bounds = block_bounds(q_pos, k_pos, bq, bk)
    q_lo, q_hi = (bounds[n * b * nq : (n + 1) * b * nq].reshape(b, nq, 1) for n in range(2))
    k_lo, k_hi = (
        bounds[2 * b * nq + n * b * nk : 2 * b * nq + (n + 1) * b * nk].reshape(b, 1, nk)
        for n in range(2)
    )
    live = tile_is_live(q_lo, q_hi, k_lo, k_hi, window)
    return live.astype(jnp.int32).reshape(-1)
