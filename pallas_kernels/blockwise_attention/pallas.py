"""The Pallas blockwise attention: kernels per backend, glued by one ``custom_vjp``.

Forward: Spark runs a moments kernel (count, mean, M2, max of each query's capped predictor
scores over its valid keys), then theta in XLA (the ``[B, K, G, T]`` per-query formula of
:mod:`pallas_kernels.blockwise_attention.xla`), then the attention kernel; dense runs the
attention kernel alone. Backward: ``delta = do . out`` in XLA, then a query-side kernel
(dq) and a key-side kernel (dk, dv), both recomputing their tiles from the saved per-query
log-sum-exp and theta. No ``[T, S]`` tensor exists at any point. The kernels themselves live
in ``pallas_tpu`` and ``pallas_gpu``; both take the (batch, kv head)-flattened layouts
their docstrings list.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.blockwise_attention import pallas_gpu, pallas_tpu, xla
from pallas_kernels.blockwise_attention.tile import block_bounds, live_tiles

_BACKENDS = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}


class Settings(NamedTuple):
    """Static settings of one call."""

    implementation: str
    block_q: int
    block_k: int
    softcap: float | None
    top_k: int
    interpret: bool


def _flat(x: jax.Array) -> jax.Array:
    """Merges the batch and kv-head axes: [B, K, ...] -> [B * K, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _run_forward(q, keys, v, q_pos, k_pos, window, enabled, settings: Settings):
    backend = _BACKENDS[settings.implementation]
    b, kv, g, t, _ = q[0].shape
    sizes = dict(
        bq=settings.block_q,
        bk=settings.block_k,
        softcap=settings.softcap,
        interpret=settings.interpret,
    )
    bq, bk = settings.block_q, settings.block_k
    if settings.implementation == "pallas_tpu":
        # SMEM holds O(B x (nq + nk)) block bounds, not the O(B x nq x nk) table.
        live = block_bounds(q_pos, k_pos, bq, bk)
    else:
        live = live_tiles(q_pos, k_pos, window, bq, bk)
    window_arr = window.reshape(1)
    qf = tuple(_flat(x) for x in q)
    kf = tuple(_flat(x) for x in keys)
    vf = _flat(v)
    if settings.top_k:
        moments = backend.moments(qf[0], kf[0], q_pos, k_pos, live, window_arr, **sizes)
        theta, keep_all = xla._theta(*moments, settings.top_k, enabled)
    else:
        theta = jnp.zeros((b * kv, g, t), jnp.float32)
        keep_all = jnp.ones((b * kv, g, t), bool)
    keep_all = keep_all.astype(jnp.float32)
    out, lse, n = backend.forward(
        qf, kf, vf, q_pos, k_pos, live, window_arr, theta, keep_all, **sizes
    )
    unflat = lambda x: x.reshape(b, kv, *x.shape[1:])  # noqa: E731
    return unflat(out), unflat(n), (live, window_arr, lse, theta, keep_all, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def attention(q, keys, v, q_pos, k_pos, window, enabled, settings: Settings):
    """Same contract as the XLA ``_attention`` (padded inputs); returns (out f32, count)."""
    out, n, _ = _run_forward(q, keys, v, q_pos, k_pos, window, enabled, settings)
    return out, n


def _fwd(q, keys, v, q_pos, k_pos, window, enabled, settings: Settings):
    out, n, saved = _run_forward(q, keys, v, q_pos, k_pos, window, enabled, settings)
    return (out, n), (q, keys, v, q_pos, k_pos, saved)


def _bwd(settings: Settings, residuals, cotangents):
    q, keys, v, q_pos, k_pos, (live, window_arr, lse, theta, keep_all, out) = residuals
    d_out, _ = cotangents
    d_out = _flat(d_out.astype(jnp.float32))
    delta = jnp.sum(d_out * out, axis=-1)
    dq, dk, dv = _BACKENDS[settings.implementation].backward(
        tuple(_flat(x) for x in q),
        tuple(_flat(x) for x in keys),
        _flat(v),
        q_pos,
        k_pos,
        live,
        window_arr,
        (lse, delta, theta, keep_all),
        d_out,
        bq=settings.block_q,
        bk=settings.block_k,
        softcap=settings.softcap,
        interpret=settings.interpret,
    )
    back = lambda d, x: d.reshape(x.shape).astype(x.dtype)  # noqa: E731
    dq = tuple(back(d, x) for d, x in zip(dq, q, strict=True))
    dk = tuple(back(d, x) for d, x in zip(dk, keys, strict=True))
    return dq, dk, back(dv, v), None, None, None, None


attention.defvjp(_fwd, _bwd)
