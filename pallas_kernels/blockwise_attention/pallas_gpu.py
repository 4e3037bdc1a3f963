"""Blockwise attention on GPU (Pallas Triton): one program per query block, keys in a loop.

As in flash attention on GPU, each program owns one query head's ``bq`` queries (the key-side
backward kernel: one kv head's ``bk`` keys) and walks the other side's blocks with
``fori_loop``, holding its running state in registers; tiles with no valid pair (see
:func:`pallas_kernels.blockwise_attention.tile.live_tiles`) are skipped with ``lax.cond``.
Triton tensors need power-of-two sizes, so feature widths are zero-padded up to one (exact for
the dot products) and block sizes are powers of two >= 16.

Layouts (see ``pallas.py``): query parts [BK, G, T, W], key parts [BK, S, W], values
[BK, S, H], positions [B, T] and [B, S], per-query statistics [BK, G, T].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blockwise_attention import tile

_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


def _width(w: int) -> int:
    return max(16, 1 << (w - 1).bit_length())


def _pad_last(x: jax.Array) -> jax.Array:
    extra = _width(x.shape[-1]) - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class _Grid:
    """Static sizes of one call and the tile liveness lookup."""

    def __init__(self, bq: int, bk: int, num_kv: int, t: int, s: int):
        self.bq, self.bk, self.num_kv, self.nq, self.nk = bq, bk, num_kv, t // bq, s // bk

    def live(self, live_ref, b, i, j) -> jax.Array:
        return live_ref[(b * self.nq + i) * self.nk + j] != 0

    def rows(self, i):
        return pl.ds(i * self.bq, self.bq)

    def cols(self, j):
        return pl.ds(j * self.bk, self.bk)


def _call(kernel, grid, out_shape, interpret, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=_PARAMS,
        interpret=interpret,
        name=name,
    )


def _moments_kernel(live_ref, window_ref, q_ref, k_ref, qpos_ref, kpos_ref, *outs, grid, softcap):
    h, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b = lax.div(h, grid.num_kv)
    rows = grid.rows(i)
    q = q_ref[h, g, rows, :]
    q_pos = qpos_ref[b, rows][:, None]
    window = window_ref[0]

    def body(j, state):
        def merge(state):
            cols = grid.cols(j)
            ok = tile.valid(q_pos, kpos_ref[b, cols][None, :], window)
            s = tile.cap(tile.scores(q, k_ref[h, cols, :]), softcap)
            return tile.merge_moments(*state, s, ok)

        return lax.cond(grid.live(live_ref, b, i, j), merge, lambda x: x, state)

    zeros = jnp.zeros((grid.bq, 1), jnp.float32)
    state = lax.fori_loop(0, grid.nk, body, (zeros, zeros, zeros, zeros - jnp.inf))
    for ref, x in zip(outs, state, strict=True):
        ref[h, g, rows] = x.reshape(grid.bq)


def moments(q_pred, k_pred, q_pos, k_pos, live, window, *, bq, bk, softcap, interpret):
    """Per query (count, mean, M2, max) of the capped predictor scores over valid keys, each
    [BK, G, T] float32."""
    bkv, g, t, _ = q_pred.shape
    grid = _Grid(bq, bk, bkv // q_pos.shape[0], t, k_pred.shape[1])
    stat = jax.ShapeDtypeStruct((bkv, g, t), jnp.float32)
    return _call(
        functools.partial(_moments_kernel, grid=grid, softcap=softcap),
        (bkv, g, grid.nq),
        [stat] * 4,
        interpret,
        "blockwise_moments_gpu",
    )(live, window, _pad_last(q_pred), _pad_last(k_pred), q_pos, k_pos)


def _forward_kernel(live_ref, window_ref, *refs, grid, softcap, spark):
    parts = 2 if spark else 1
    q_refs, k_refs = refs[:parts], refs[parts : 2 * parts]
    v_ref, qpos_ref, kpos_ref, theta_ref, keep_ref, o_ref, lse_ref, n_ref = refs[2 * parts :]
    h, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b = lax.div(h, grid.num_kv)
    rows = grid.rows(i)
    q = [r[h, g, rows, :] for r in q_refs]
    q_pos = qpos_ref[b, rows][:, None]
    theta, keep_all = theta_ref[h, g, rows][:, None], keep_ref[h, g, rows][:, None]
    window = window_ref[0]

    def body(j, state):
        def update(state):
            cols = grid.cols(j)
            ok = tile.valid(q_pos, kpos_ref[b, cols][None, :], window)
            s = tile.cap(tile.scores(q[0], k_refs[0][h, cols, :]), softcap)
            keep = tile.kept(s, ok, theta, keep_all, spark)
            gate = tile.scores(q[1], k_refs[1][h, cols, :]) if spark else None
            return tile.online_update(*state, s, keep, gate, v_ref[h, cols, :])

        return lax.cond(grid.live(live_ref, b, i, j), update, lambda x: x, state)

    zeros = jnp.zeros((grid.bq, 1), jnp.float32)
    acc = jnp.zeros((grid.bq, v_ref.shape[-1]), jnp.float32)
    m, total, acc, n = lax.fori_loop(0, grid.nk, body, (zeros - jnp.inf, zeros, acc, zeros))
    out, lse = tile.finish(total, acc, m)
    o_ref[h, g, rows, :] = out
    lse_ref[h, g, rows] = lse.reshape(grid.bq)
    n_ref[h, g, rows] = n.reshape(grid.bq)


def forward(q, keys, v, q_pos, k_pos, live, window, theta, keep_all, *, bq, bk, softcap, interpret):
    """(out [BK, G, T, H] f32, lse [BK, G, T], attended count [BK, G, T])."""
    bkv, g, t, _ = q[0].shape
    s, h = v.shape[1:]
    spark = len(q) == 2
    grid = _Grid(bq, bk, bkv // q_pos.shape[0], t, s)
    stat = jax.ShapeDtypeStruct((bkv, g, t), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct((bkv, g, t, _width(h)), jnp.float32), stat, stat]
    out, lse, n = _call(
        functools.partial(_forward_kernel, grid=grid, softcap=softcap, spark=spark),
        (bkv, g, grid.nq),
        out_shape,
        interpret,
        "blockwise_attention_gpu",
    )(
        live, window, *map(_pad_last, q), *map(_pad_last, keys), _pad_last(v), q_pos, k_pos,
        theta, keep_all,
    )  # fmt: skip
    return out[..., :h], lse, n


def _tile_gradients(q, keys, v, do, stats, ok, softcap, spark):
    d_raw, d_gate, weight = tile.gradients(q, keys, v, do, *stats, ok, softcap, spark)
    return q, keys, (d_raw, d_gate)[: len(q)], weight


def _unpack(refs, spark):
    parts = 2 if spark else 1
    q_refs, k_refs = refs[:parts], refs[parts : 2 * parts]
    v_ref, qpos_ref, kpos_ref, do_ref, *stat_refs = refs[2 * parts : 2 * parts + 8]
    return q_refs, k_refs, v_ref, qpos_ref, kpos_ref, do_ref, stat_refs, refs[2 * parts + 8 :]


def _dq_kernel(live_ref, window_ref, *refs, grid, softcap, spark):
    q_refs, k_refs, v_ref, qpos_ref, kpos_ref, do_ref, stat_refs, outs = _unpack(refs, spark)
    h, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b = lax.div(h, grid.num_kv)
    rows = grid.rows(i)
    q = [r[h, g, rows, :] for r in q_refs]
    do = do_ref[h, g, rows, :]
    stats = [r[h, g, rows][:, None] for r in stat_refs]
    q_pos = qpos_ref[b, rows][:, None]
    window = window_ref[0]

    def body(j, dq):
        def add(dq):
            cols = grid.cols(j)
            ok = tile.valid(q_pos, kpos_ref[b, cols][None, :], window)
            keys = [r[h, cols, :] for r in k_refs]
            _, keys, d_scores, _ = _tile_gradients(
                q, keys, v_ref[h, cols, :], do, stats, ok, softcap, spark
            )
            return tuple(a + tile.product(d, k) for a, d, k in zip(dq, d_scores, keys, strict=True))

        return lax.cond(grid.live(live_ref, b, i, j), add, lambda x: x, dq)

    dq0 = tuple(jnp.zeros((grid.bq, r.shape[-1]), jnp.float32) for r in q_refs)
    dq = lax.fori_loop(0, grid.nk, body, dq0)
    for ref, d in zip(outs, dq, strict=True):
        ref[h, g, rows, :] = d


def _dkv_kernel(live_ref, window_ref, *refs, grid, softcap, spark, groups):
    q_refs, k_refs, v_ref, qpos_ref, kpos_ref, do_ref, stat_refs, outs = _unpack(refs, spark)
    h, j = pl.program_id(0), pl.program_id(1)
    b = lax.div(h, grid.num_kv)
    cols = grid.cols(j)
    keys = [r[h, cols, :] for r in k_refs]
    v = v_ref[h, cols, :]
    k_pos = kpos_ref[b, cols][None, :]
    window = window_ref[0]

    def body(step, acc):
        g, i = lax.div(step, grid.nq), lax.rem(step, grid.nq)

        def add(acc):
            rows = grid.rows(i)
            ok = tile.valid(qpos_ref[b, rows][:, None], k_pos, window)
            q = [r[h, g, rows, :] for r in q_refs]
            do = do_ref[h, g, rows, :]
            stats = [r[h, g, rows][:, None] for r in stat_refs]
            q, _, d_scores, weight = _tile_gradients(q, keys, v, do, stats, ok, softcap, spark)
            new = [a + tile.product_t(d, x) for a, d, x in zip(acc[:-1], d_scores, q, strict=True)]
            return (*new, acc[-1] + tile.product_t(weight, do.astype(v.dtype)))

        return lax.cond(grid.live(live_ref, b, i, j), add, lambda x: x, acc)

    acc0 = tuple(jnp.zeros((grid.bk, r.shape[-1]), jnp.float32) for r in (*k_refs, v_ref))
    acc = lax.fori_loop(0, groups * grid.nq, body, acc0)
    for ref, d in zip(outs, acc, strict=True):
        ref[h, cols, :] = d


def backward(q, keys, v, q_pos, k_pos, live, window, stats, d_out, *, bq, bk, softcap, interpret):
    """(dq parts, dk parts, dv) float32 from the per-query ``stats`` (lse, delta, theta,
    keep_all), each [BK, G, T], and ``d_out`` [BK, G, T, H] float32."""
    bkv, g, t, _ = q[0].shape
    spark = len(q) == 2
    grid = _Grid(bq, bk, bkv // q_pos.shape[0], t, v.shape[1])
    padded = [_pad_last(x) for x in (*q, *keys, v)]
    operands = (*padded, q_pos, k_pos, _pad_last(d_out), *stats)
    f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # noqa: E731
    n = len(q)
    dq = _call(
        functools.partial(_dq_kernel, grid=grid, softcap=softcap, spark=spark),
        (bkv, g, grid.nq),
        [f32(x) for x in padded[:n]],
        interpret,
        "blockwise_attention_dq_gpu",
    )(live, window, *operands)
    dkv = _call(
        functools.partial(_dkv_kernel, grid=grid, softcap=softcap, spark=spark, groups=g),
        (bkv, grid.nk),
        [f32(x) for x in padded[n:]],
        interpret,
        "blockwise_attention_dkv_gpu",
    )(live, window, *operands)
    cut = lambda d, x: d[..., : x.shape[-1]]  # noqa: E731
    dq = tuple(cut(d, x) for d, x in zip(dq, q, strict=True))
    dk = tuple(cut(d, x) for d, x in zip(dkv[:-1], keys, strict=True))
    return dq, dk, cut(dkv[-1], v)
