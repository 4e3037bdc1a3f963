"""Statistical top-k in XLA: the implementation the model runs on CPU (and for ``"xla"``).

A linear-time threshold from the row mean and standard deviation.

For a row x of width d and a target count k, ``theta = mean(x) + z * std(x)`` with
``z = Phi^-1(1 - k/d)``; entries above theta are kept. Two forms:

* soft (FFN): ``max(x - theta, 0)``;
* mask (attention): ``where(x >= theta, x, -inf)``, applied before a softmax.

Moments are taken in float32 over the last axis in two passes (mean, then the centred second
moment: no cancellation when the mean dwarfs the spread). With a ``valid`` mask they cover valid
entries only, ``z`` uses the row's valid count, and rows with at most k valid entries keep all
of them. theta is capped at the row's largest valid entry, so every row with a valid entry keeps
at least one (an all-equal row keeps all); a row with no valid entry keeps none. With
``axis_name`` the last axis is taken to be sharded over that mapped axis: the moments come from
a ``psum`` of (sum, count) and one of the centred sum of squares per row, and the cap from a
``pmax``: per-row scalars, never an all-gather of the row.

``method`` swaps the threshold for the k-th largest value found by ``jax.lax.top_k`` or
``jax.lax.approx_max_k``: the baselines the benchmarks compare against (unsharded only).
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import jax
import jax.numpy as jnp


def gaussian_quantile(k: int, d: int) -> float:
    """z = Phi^-1(1 - k/d) as a Python float; requires 0 < k < d."""
    if not 0 < k < d:
        raise ValueError(f"k={k} must be in (0, d={d}) for a Gaussian quantile")
    return NormalDist().inv_cdf(1.0 - k / d)


def _safe_sqrt(var: jax.Array) -> jax.Array:
    # sqrt has an infinite derivative at 0 (constant rows, one valid entry); the double where
    # keeps inf * 0 = nan out of the gradient and takes the subgradient 0 there.
    positive = var > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def _valid_max(xf: jax.Array, valid: jax.Array | None, axis_name: str | None) -> jax.Array:
    """Row maximum over valid entries (keepdims); -inf on rows with none."""
    masked = xf if valid is None else jnp.where(valid, xf, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    if axis_name is not None:
        row_max = jax.lax.pmax(row_max, axis_name)
    return row_max


def _row_moments(
    x: jax.Array, valid: jax.Array | None, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, population std and count over the last axis (at least float32, keepdims).

    Two passes: the mean, then the mean squared deviation from it. The one-pass
    ``E[x^2] - mean^2`` loses every digit of the variance to cancellation when the mean
    dwarfs the spread (scores bunched under the soft-cap, mean 40 with std 0.01); the second
    pass costs one more read of the row, small beside the matmul that produced it. Sharded,
    each pass is one ``psum`` of per-row scalars.
    """
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if valid is None:
        count = jnp.full((*xf.shape[:-1], 1), xf.shape[-1], xf.dtype)
        total = jnp.sum(xf, axis=-1, keepdims=True)
    else:
        count = jnp.sum(valid, axis=-1, keepdims=True, dtype=xf.dtype)
        total = jnp.sum(jnp.where(valid, xf, 0.0), axis=-1, keepdims=True)
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    safe_count = jnp.maximum(count, 1.0)
    mean = total / safe_count
    dev = xf - mean
    if valid is not None:
        dev = jnp.where(valid, dev, 0.0)
    squares = jnp.sum(dev * dev, axis=-1, keepdims=True)
    if axis_name is not None:
        squares = jax.lax.psum(squares, axis_name)
    return mean, _safe_sqrt(squares / safe_count), count


def _kth_largest(x: jax.Array, k: int, method: str) -> jax.Array:
    if method == "lax_top_k":
        values, _ = jax.lax.top_k(x, k)
    else:
        values, _ = jax.lax.approx_max_k(x, k)
    return values[..., k - 1 : k].astype(jnp.float32)


def statistical_threshold(
    x: jax.Array,
    k: int,
    *,
    valid: jax.Array | None = None,
    axis_name: str | None = None,
    method: str = "statistical",
) -> tuple[jax.Array, jax.Array]:
    """Threshold theta and a keep-all flag per row.

    Args:
      x: [..., d] scores; the last axis is reduced.
      k: target number of kept entries per row (static).
      valid: optional bool [..., d]; moments and counts use valid entries only.
      axis_name: mapped axis over which the last axis is sharded (``shard_map``/``pmap``).
      method: ``"statistical"``, ``"lax_top_k"`` or ``"approx_max_k"``.

    Returns:
      theta [..., 1] float32 and keep_all [..., 1] bool (rows with n_valid <= k).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1")
    if method != "statistical":
        if axis_name is not None:
            raise ValueError(f"method={method!r} does not support a sharded axis")
        d = x.shape[-1]
        if valid is not None:
            x = jnp.where(valid, x, -jnp.inf)
        if k >= d:
            theta = jnp.full((*x.shape[:-1], 1), -jnp.inf, jnp.float32)
        else:
            theta = _kth_largest(x, k, method)
        count = (
            jnp.full(theta.shape, d, jnp.float32)
            if valid is None
            else jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32)
        )
        return theta, count <= k
    row_max = _valid_max(x.astype(jnp.promote_types(x.dtype, jnp.float32)), valid, axis_name)
    mean, std, count = _row_moments(x, valid, axis_name)
    if valid is None and axis_name is None:
        d = x.shape[-1]
        if k >= d:
            return mean, jnp.ones(mean.shape, bool)
        z = gaussian_quantile(k, d)
        keep_all = jnp.zeros(mean.shape, bool)
    else:
        keep_all = count <= k
        frac = jnp.clip(1.0 - k / jnp.maximum(count, 1.0), 1e-6, 1.0 - 1e-6)
        z = jax.scipy.special.ndtri(frac)
    # theta never exceeds the row's largest valid entry, so a row with a valid entry keeps at
    # least its top one: an all-equal row keeps every entry (all tie at the maximum), and a
    # row whose spread is lost to rounding cannot end with an empty selection (a softmax over
    # nothing). The soft form is unchanged by this: max(x - theta, 0) is 0 everywhere either
    # way.
    return jnp.minimum(mean + z * std, row_max), keep_all


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _soft_threshold(x: jax.Array, z: float, axis_name: str | None) -> jax.Array:
    """``max(x - (mean + z * std), 0)`` over the last axis, unmasked."""
    return _soft_threshold_fwd(x, z, axis_name)[0]


def _soft_threshold_fwd(
    x: jax.Array, z: float, axis_name: str | None
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    # theta is not capped at the row maximum here: above it or at it, max(x - theta, 0) is 0
    # everywhere.
    mean, std, count = _row_moments(x, None, axis_name)
    theta = (mean + z * std).astype(x.dtype)
    return jnp.maximum(x - theta, 0), (x, theta, mean, std, count)


def _soft_threshold_bwd(
    z: float, axis_name: str | None, res: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array]:
    # d theta / d x_j = 1/n + z (x_j - mean) / (n std); one row reduction, the rest fused.
    x, theta, mean, std, count = res
    passed = jnp.where(x > theta, g, 0).astype(mean.dtype)
    total = jnp.sum(passed, axis=-1, keepdims=True)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    scale = total / count
    # At std = 0 (a constant row) the std term takes its subgradient 0, as _safe_sqrt does.
    inv_std = jnp.where(std > 0, 1.0 / jnp.where(std > 0, std, 1.0), 0.0)
    grad = passed - scale - (z * scale * inv_std) * (x.astype(mean.dtype) - mean)
    return (grad.astype(x.dtype),)


_soft_threshold.defvjp(_soft_threshold_fwd, _soft_threshold_bwd)


def statistical_topk(
    x: jax.Array,
    k: int,
    *,
    valid: jax.Array | None = None,
    enabled: jax.Array | bool = True,
    axis_name: str | None = None,
    method: str = "statistical",
) -> jax.Array:
    """Soft form: ``max(x - theta, 0)``; invalid entries give 0.

    Rows that keep everything (n_valid <= k, or ``enabled`` false) return x unchanged at valid
    entries. ``enabled`` may be a traced bool, so one scanned layer stack can mix sparse and
    dense layers.

    Args:
      x: [..., d].
      k: target kept count per row.
      valid: optional bool [..., d].
      enabled: bool scalar; false keeps every entry.
      axis_name: see :func:`statistical_threshold`.
      method: see :func:`statistical_threshold`.

    Returns:
      [..., d] in x's dtype.
    """
    if valid is None and method == "statistical":
        # The FFN's training path: a closed-form backward (one row reduction) instead of
        # autodiff through the moments, same gradients.
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1")
        d = x.shape[-1] * (1 if axis_name is None else jax.lax.axis_size(axis_name))
        if k >= d:
            return x
        soft = _soft_threshold(x, gaussian_quantile(k, d), axis_name)
        return jnp.where(enabled, soft, x)
    theta, keep_all = statistical_threshold(x, k, valid=valid, axis_name=axis_name, method=method)
    keep_all = jnp.logical_or(keep_all, jnp.logical_not(enabled))
    out = jnp.where(keep_all, x, jnp.maximum(x - theta.astype(x.dtype), 0))
    if valid is not None:
        out = jnp.where(valid, out, 0)
    return out


def statistical_topk_mask(
    x: jax.Array,
    k: int,
    *,
    valid: jax.Array | None = None,
    enabled: jax.Array | bool = True,
    axis_name: str | None = None,
    method: str = "statistical",
) -> jax.Array:
    """Mask form: ``where(x >= theta, x, -inf)``; invalid entries give -inf.

    Args and semantics as :func:`statistical_topk`.
    """
    theta, keep_all = statistical_threshold(x, k, valid=valid, axis_name=axis_name, method=method)
    keep = jnp.logical_or(keep_all, jnp.logical_not(enabled)) | (x >= theta.astype(x.dtype))
    if valid is not None:
        keep = keep & valid
    return jnp.where(keep, x, -jnp.inf)
