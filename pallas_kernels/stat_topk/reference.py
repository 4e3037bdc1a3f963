"""Readable jnp statistical top-k: the oracle every implementation is tested against.

``theta = mean(x) + z * std(x)`` per row of the last axis (population std, float32
moments); soft form ``max(x - theta, 0)``, mask form ``where(x >= theta, x, -inf)``. With a
``valid`` mask the moments and ``z = Phi^-1(1 - k/n)`` use the ``n`` valid entries of each
row, invalid entries give 0 (soft) or -inf (mask), and rows with ``n <= k`` keep every valid
entry unchanged. Without a mask and ``k >= d`` every entry is kept (the output is ``x``).
theta is capped at the row's largest valid entry: a row keeps at least its top entry (every
entry of an all-equal row), and only a row with no valid entry keeps none (mask form: all
``-inf``; a softmax over it must give zeros, not NaN).
"""

import statistics

import jax
import jax.numpy as jnp

FORMS = ("soft", "mask")


def quantile_z(k: int, d: int) -> float:
    """``Phi^-1(1 - k/d)`` as a Python float, for ``0 < k < d``."""
    return statistics.NormalDist().inv_cdf(1.0 - k / d)


def _safe_sqrt(var: jnp.ndarray) -> jnp.ndarray:
    # sqrt has an infinite derivative at 0 (rows with one valid entry, constant rows); the
    # double where keeps that inf * 0 = nan out of the gradient.
    positive = var > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def row_threshold(
    x: jnp.ndarray, k: int, valid: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-row threshold and keep-all flag.

    Args:
      x: [..., d] input.
      k: target kept count per row, >= 1.
      valid: optional bool [..., d].

    Returns:
      ``(theta, keep_all)``: float32 [..., 1] thresholds (``-inf`` on keep-all rows) and
      bool [..., 1], True where a row keeps every valid entry.
    """
    xf = x.astype(jnp.float32)
    d = x.shape[-1]
    if valid is None:
        if k >= d:
            keep_all = jnp.ones((*x.shape[:-1], 1), bool)
            return jnp.full(keep_all.shape, -jnp.inf, jnp.float32), keep_all
        valid = jnp.ones(x.shape, bool)
        z = quantile_z(k, d)
    else:
        n = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32)
        eps = jnp.finfo(jnp.float32).eps
        z = jax.scipy.special.ndtri(jnp.clip(1.0 - k / jnp.maximum(n, 1.0), eps, 1.0 - eps))
    n = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32)
    n_safe = jnp.maximum(n, 1.0)
    # Moments of the row shifted by its largest valid entry, in two passes: neither loses the
    # spread to cancellation when the mean dwarfs it, and a constant row comes out exact.
    top = jnp.max(jnp.where(valid, xf, -jnp.inf), axis=-1, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    mean = shift + jnp.sum(jnp.where(valid, xf - shift, 0.0), axis=-1, keepdims=True) / n_safe
    var = jnp.sum(jnp.where(valid, jnp.square(xf - mean), 0.0), axis=-1, keepdims=True) / n_safe
    # Capped at the largest valid entry: a row with any valid entry keeps at least its top one
    # (all of an all-equal row), so no query ends with an empty selection.
    theta = jnp.minimum(mean + z * _safe_sqrt(var), top)
    keep_all = n <= k
    return jnp.where(keep_all, -jnp.inf, theta), keep_all


def statistical_topk(
    x: jnp.ndarray, k: int, *, valid: jnp.ndarray | None = None, form: str = "soft"
) -> jnp.ndarray:
    """Statistical top-k over the last axis.

    Args:
      x: [..., d] input, any float dtype.
      k: target kept count per row, >= 1.
      valid: optional bool [..., d]; moments and counts use valid entries only.
      form: ``"soft"`` or ``"mask"``.

    Returns:
      [..., d] in ``x.dtype``.
    """
    theta, keep_all = row_threshold(x, k, valid)
    xf = x.astype(jnp.float32)
    valid_or_all = jnp.ones(x.shape, bool) if valid is None else valid
    if form == "soft":
        kept = jnp.where(keep_all, xf, jnp.maximum(xf - theta, 0.0))
        return jnp.where(valid_or_all, kept, 0.0).astype(x.dtype)
    return jnp.where(valid_or_all & (xf >= theta), x, -jnp.inf)
