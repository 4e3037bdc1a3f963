"""Blockwise attention on TPU (Mosaic): one (query block, key block) tile per grid step.

Every kernel's grid ends in the reduced axes, marked ``"arbitrary"``, and keeps its running
state in VMEM scratch, as TPU flash attention does: only a [bq, W] query tile, a [bk, W] key
tile and a [bk, H] value tile are resident, whatever the context. Each block's position
bounds (:func:`pallas_kernels.blockwise_attention.tile.block_bounds`, O(B x (nq + nk))
words) and the window ride in SMEM by scalar prefetch and give each tile's liveness; a dead
tile (beyond the causal edge, outside the window, all padding) is skipped with ``pl.when``.
Per-query statistics are stored replicated over 128 lanes ([.., T, 128]) so that every
block keeps Mosaic's (8, 128) tiling.

Layouts (see ``pallas.py``): query parts [BK, G, T, W], key parts [BK, S, W], values
[BK, S, H], query positions [B, T, 1], key positions [B, 1, S].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common.dispatch import tpu_interpret
from pallas_kernels.blockwise_attention import tile

LANES = 128


def _read(ref) -> jax.Array:
    """A per-query statistic [bq, 1] from its lane-replicated [bq, 128] block."""
    return jnp.max(ref[...], axis=1, keepdims=True)


def _write(ref, x: jax.Array) -> None:
    ref[...] = jnp.broadcast_to(x, ref.shape).astype(ref.dtype)


class _Layout:
    """Block specs of one kernel's grid. ``order`` names the grid axes: the query-side kernels
    run (h, g, i, j), the key-side one (h, j, g, i); h is the (batch, kv head) pair, g the
    query head in its group, i the query block, j the key block."""

    def __init__(self, order: str, bq: int, bk: int, num_kv: int, nq: int, nk: int, batch: int):
        self.order, self.bq, self.bk, self.num_kv, self.nq, self.nk = order, bq, bk, num_kv, nq, nk
        self.batch = batch

    def _axes(self, *idx):
        return dict(zip(self.order, idx[: len(self.order)], strict=True))

    def query(self, width: int) -> pl.BlockSpec:
        return pl.BlockSpec(
            (None, None, self.bq, width),
            lambda *idx: (lambda a: (a["h"], a["g"], a["i"], 0))(self._axes(*idx)),
        )

    def key(self, width: int) -> pl.BlockSpec:
        return pl.BlockSpec(
            (None, self.bk, width), lambda *idx: (lambda a: (a["h"], a["j"], 0))(self._axes(*idx))
        )

    def stat(self) -> pl.BlockSpec:
        return self.query(LANES)

    def _row(self, a) -> jax.Array:
        """The batch row of (batch, kv head) pair h."""
        return jax.lax.div(a["h"], self.num_kv)

    def q_pos(self) -> pl.BlockSpec:
        def index(*idx):
            a = self._axes(*idx)
            return self._row(a), a["i"], 0

        return pl.BlockSpec((None, self.bq, 1), index)

    def k_pos(self) -> pl.BlockSpec:
        def index(*idx):
            a = self._axes(*idx)
            return self._row(a), 0, a["j"]

        return pl.BlockSpec((None, 1, self.bk), index)

    def live(self, bounds_ref, window_ref) -> jax.Array:
        """Whether this grid step's tile may hold a valid (query, key) pair, from the block
        bounds (:func:`pallas_kernels.blockwise_attention.tile.block_bounds`)."""
        a = self._axes(*(pl.program_id(n) for n in range(len(self.order))))
        b = self._row(a)
        rows, cols = self.batch * self.nq, self.batch * self.nk
        qi, kj = b * self.nq + a["i"], b * self.nk + a["j"]
        return tile.tile_is_live(
            bounds_ref[qi],
            bounds_ref[rows + qi],
            bounds_ref[2 * rows + kj],
            bounds_ref[2 * rows + cols + kj],
            window_ref[0],
        )


def _call(kernel, layout: _Layout, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
    semantics = ("parallel", "parallel", "arbitrary", "arbitrary")
    if layout.order == "hgij":
        semantics = ("parallel", "parallel", "parallel", "arbitrary")
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=tpu_interpret(interpret),
        name=name,
    )


def _tile_valid(window_ref, qpos_ref, kpos_ref) -> jax.Array:
    return tile.valid(qpos_ref[...], kpos_ref[...], window_ref[0])


def _moments_kernel(
    bounds_ref, window_ref, q_ref, k_ref, qpos_ref, kpos_ref, *refs, layout, softcap
):
    outs, scratch = refs[:4], refs[4:]
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _():
        for ref, value in zip(scratch, (0.0, 0.0, 0.0, -jnp.inf), strict=True):
            ref[...] = jnp.full(ref.shape, value, jnp.float32)

    @pl.when(layout.live(bounds_ref, window_ref))
    def _():
        ok = _tile_valid(window_ref, qpos_ref, kpos_ref)
        s = tile.cap(tile.scores(q_ref[...], k_ref[...]), softcap)
        state = tile.merge_moments(*(_read(r) for r in scratch), s, ok)
        for ref, value in zip(scratch, state, strict=True):
            _write(ref, value)

    @pl.when(j == layout.nk - 1)
    def _():
        for out, ref in zip(outs, scratch, strict=True):
            out[...] = ref[...]


def moments(q_pred, k_pred, q_pos, k_pos, live, window, *, bq, bk, softcap, interpret):
    """Per query (count, mean, M2, max) of the capped predictor scores over valid keys, each
    [BK, G, T] float32."""
    bkv, g, t, r = q_pred.shape
    s = k_pred.shape[1]
    num_kv = bkv // q_pos.shape[0]
    layout = _Layout("hgij", bq, bk, num_kv, t // bq, s // bk, q_pos.shape[0])
    stat = jax.ShapeDtypeStruct((bkv, g, t, LANES), jnp.float32)
    kernel = functools.partial(_moments_kernel, layout=layout, softcap=softcap)
    out = _call(
        kernel,
        layout,
        (bkv, g, layout.nq, layout.nk),
        [layout.query(r), layout.key(r), layout.q_pos(), layout.k_pos()],
        [layout.stat()] * 4,
        [stat] * 4,
        [pltpu.VMEM((bq, LANES), jnp.float32)] * 4,
        interpret,
        "blockwise_moments_tpu",
    )(live, window, q_pred, k_pred, q_pos[..., None], k_pos[:, None, :])
    return tuple(x[..., 0] for x in out)


def _forward_kernel(bounds_ref, window_ref, *refs, layout, softcap, spark):
    parts = 2 if spark else 1
    q_refs, k_refs = refs[:parts], refs[parts : 2 * parts]
    v_ref, qpos_ref, kpos_ref, theta_ref, keep_ref = refs[2 * parts : 2 * parts + 5]
    o_ref, lse_ref, n_ref, m_sc, l_sc, n_sc, acc_sc = refs[2 * parts + 5 :]
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        for ref in (l_sc, n_sc, acc_sc):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(layout.live(bounds_ref, window_ref))
    def _():
        ok = _tile_valid(window_ref, qpos_ref, kpos_ref)
        s = tile.cap(tile.scores(q_refs[0][...], k_refs[0][...]), softcap)
        keep = tile.kept(s, ok, _read(theta_ref), _read(keep_ref), spark)
        gate = tile.scores(q_refs[1][...], k_refs[1][...]) if spark else None
        m, total, acc, n = tile.online_update(
            _read(m_sc), _read(l_sc), acc_sc[...], _read(n_sc), s, keep, gate, v_ref[...]
        )
        _write(m_sc, m)
        _write(l_sc, total)
        _write(n_sc, n)
        acc_sc[...] = acc

    @pl.when(j == layout.nk - 1)
    def _():
        out, lse = tile.finish(_read(l_sc), acc_sc[...], _read(m_sc))
        o_ref[...] = out.astype(o_ref.dtype)
        _write(lse_ref, lse)
        n_ref[...] = n_sc[...]


def forward(q, keys, v, q_pos, k_pos, live, window, theta, keep_all, *, bq, bk, softcap, interpret):
    """(out [BK, G, T, H] f32, lse [BK, G, T], attended count [BK, G, T])."""
    bkv, g, t, _ = q[0].shape
    s, h = v.shape[1:]
    spark = len(q) == 2
    layout = _Layout("hgij", bq, bk, bkv // q_pos.shape[0], t // bq, s // bk, q_pos.shape[0])
    stat = jax.ShapeDtypeStruct((bkv, g, t, LANES), jnp.float32)
    lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))  # noqa: E731
    kernel = functools.partial(_forward_kernel, layout=layout, softcap=softcap, spark=spark)
    out, lse, n = _call(
        kernel,
        layout,
        (bkv, g, layout.nq, layout.nk),
        [layout.query(x.shape[-1]) for x in q]
        + [layout.key(x.shape[-1]) for x in keys]
        + [layout.key(h), layout.q_pos(), layout.k_pos(), layout.stat(), layout.stat()],
        [layout.query(h), layout.stat(), layout.stat()],
        [jax.ShapeDtypeStruct((bkv, g, t, h), jnp.float32), stat, stat],
        [pltpu.VMEM((bq, LANES), jnp.float32)] * 3 + [pltpu.VMEM((bq, h), jnp.float32)],
        interpret,
        "blockwise_attention_tpu",
    )(
        live,
        window,
        *q,
        *keys,
        v,
        q_pos[..., None],
        k_pos[:, None, :],
        lanes(theta),
        lanes(keep_all),
    )
    return out, lse[..., 0], n[..., 0]


def _backward_refs(refs, spark):
    parts = 2 if spark else 1
    q_refs, k_refs = refs[:parts], refs[parts : 2 * parts]
    rest = refs[2 * parts :]
    return q_refs, k_refs, rest[0], rest[1:8], rest[8:]


def _tile_gradients(window_ref, q_refs, k_refs, v_ref, stats, softcap, spark):
    qpos_ref, kpos_ref, do_ref, lse_ref, delta_ref, theta_ref, keep_ref = stats
    ok = _tile_valid(window_ref, qpos_ref, kpos_ref)
    q, k = tuple(r[...] for r in q_refs), tuple(r[...] for r in k_refs)
    d_raw, d_gate, weight = tile.gradients(
        q, k, v_ref[...], do_ref[...], _read(lse_ref), _read(delta_ref),
        _read(theta_ref), _read(keep_ref), ok, softcap, spark,
    )  # fmt: skip
    return q, k, (d_raw, d_gate)[: len(q)], weight, do_ref[...].astype(v_ref.dtype)


def _accumulate(first, last, scratch, outs, live, increments) -> None:
    """Zeroes the float32 ``scratch`` at the ``first`` step of the reduced axes, adds
    ``increments()`` (one per scratch ref) on ``live`` steps, writes ``outs`` at the ``last``."""

    @pl.when(first)
    def _():
        for ref in scratch:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(live)
    def _():
        for ref, d in zip(scratch, increments(), strict=True):
            ref[...] += d

    @pl.when(last)
    def _():
        for out, ref in zip(outs, scratch, strict=True):
            out[...] = ref[...].astype(out.dtype)


def _dq_kernel(bounds_ref, window_ref, *refs, layout, softcap, spark):
    q_refs, k_refs, v_ref, stats, rest = _backward_refs(refs, spark)
    j = pl.program_id(3)

    def increments():
        _, k, d_scores, _, _ = _tile_gradients(
            window_ref, q_refs, k_refs, v_ref, stats, softcap, spark
        )
        return [tile.product(d, key) for d, key in zip(d_scores, k, strict=True)]

    n = len(q_refs)
    live = layout.live(bounds_ref, window_ref)
    _accumulate(j == 0, j == layout.nk - 1, rest[n:], rest[:n], live, increments)


def _dkv_kernel(bounds_ref, window_ref, *refs, layout, softcap, spark, groups):
    q_refs, k_refs, v_ref, stats, rest = _backward_refs(refs, spark)
    g, i = pl.program_id(2), pl.program_id(3)

    def increments():
        q, _, d_scores, weight, do = _tile_gradients(
            window_ref, q_refs, k_refs, v_ref, stats, softcap, spark
        )
        dk = [tile.product_t(d, query) for d, query in zip(d_scores, q, strict=True)]
        return [*dk, tile.product_t(weight, do)]

    n = len(k_refs) + 1
    first, last = (g == 0) & (i == 0), (g == groups - 1) & (i == layout.nq - 1)
    live = layout.live(bounds_ref, window_ref)
    _accumulate(first, last, rest[n:], rest[:n], live, increments)


def backward(q, keys, v, q_pos, k_pos, live, window, stats, d_out, *, bq, bk, softcap, interpret):
    """(dq parts, dk parts, dv) float32 from the per-query ``stats`` (lse, delta, theta,
    keep_all), each [BK, G, T], and ``d_out`` [BK, G, T, H] float32."""
    bkv, g, t, _ = q[0].shape
    s, h = v.shape[1:]
    spark = len(q) == 2
    num_kv = bkv // q_pos.shape[0]
    lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))  # noqa: E731
    operands = (
        *q, *keys, v, q_pos[..., None], k_pos[:, None, :], d_out, *(lanes(x) for x in stats),
    )  # fmt: skip

    def specs(layout):
        return (
            [layout.query(x.shape[-1]) for x in q]
            + [layout.key(x.shape[-1]) for x in keys]
            + [layout.key(h), layout.q_pos(), layout.k_pos(), layout.query(h)]
            + [layout.stat()] * 4
        )

    rows = _Layout("hgij", bq, bk, num_kv, t // bq, s // bk, q_pos.shape[0])
    dq = _call(
        functools.partial(_dq_kernel, layout=rows, softcap=softcap, spark=spark),
        rows,
        (bkv, g, rows.nq, rows.nk),
        specs(rows),
        [rows.query(x.shape[-1]) for x in q],
        [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in q],
        [pltpu.VMEM((bq, x.shape[-1]), jnp.float32) for x in q],
        interpret,
        "blockwise_attention_dq_tpu",
    )(live, window, *operands)
    cols = _Layout("hjgi", bq, bk, num_kv, t // bq, s // bk, q_pos.shape[0])
    dkv = _call(
        functools.partial(_dkv_kernel, layout=cols, softcap=softcap, spark=spark, groups=g),
        cols,
        (bkv, cols.nk, g, cols.nq),
        specs(cols),
        [cols.key(x.shape[-1]) for x in (*keys, v)],
        [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (*keys, v)],
        [pltpu.VMEM((bk, x.shape[-1]), jnp.float32) for x in (*keys, v)],
        interpret,
        "blockwise_attention_dkv_tpu",
    )(live, window, *operands)
    return tuple(dq), tuple(dkv[:-1]), dkv[-1]
