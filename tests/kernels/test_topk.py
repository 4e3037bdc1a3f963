"""Statistical top-k: kept counts, the exact formula, gradients, masking and sharding."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from tolerances import F32_VS_F64, GRAD_FD, SHARDED

from pallas_kernels.stat_topk.xla import (
    statistical_threshold,
    statistical_topk,
    statistical_topk_mask,
)


def _np_threshold(x: np.ndarray, k: int) -> np.ndarray:
    x = x.astype(np.float64)
    z = NormalDist().inv_cdf(1 - k / x.shape[-1])
    return x.mean(-1, keepdims=True) + z * x.std(-1, keepdims=True)


def test_kept_count_on_gaussian_rows_is_close_to_k():
    d, rows = 13824, 300
    k = round(0.08 * d)
    x = jax.random.normal(jax.random.key(0), (rows, d))
    kept = np.asarray(jnp.sum(statistical_topk(x, k) > 0, axis=-1))
    # Binomial standard deviation of one row's count, plus the error of estimated moments.
    row_sd = np.sqrt(k * (1 - k / d))
    assert abs(kept.mean() - k) < 4 * row_sd / np.sqrt(rows) + 0.005 * k
    assert np.all(np.abs(kept - k) < 6 * row_sd)


def test_kept_count_is_monotone_in_k():
    x = jax.random.normal(jax.random.key(1), (8, 2048)) * 3 + 1
    counts = [np.asarray(jnp.sum(statistical_topk(x, k) > 0, -1)) for k in range(1, 2048, 97)]
    assert np.all(np.diff(np.stack(counts), axis=0) >= 0)


def test_soft_form_matches_independent_formula():
    x = np.asarray(jax.random.normal(jax.random.key(2), (16, 1000))) * 2.5 - 0.7
    k = 80
    want = np.maximum(x - _np_threshold(x, k), 0)
    got = np.asarray(statistical_topk(jnp.asarray(x), k))
    np.testing.assert_allclose(got, want, **F32_VS_F64)
    mask = np.asarray(statistical_topk_mask(jnp.asarray(x), k))
    keep = x >= _np_threshold(x, k)
    np.testing.assert_array_equal(np.isfinite(mask), keep)
    np.testing.assert_array_equal(mask[keep], x[keep].astype(np.float32))


def test_gradients_are_finite_and_match_finite_differences():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(3), (3, 40), dtype=jnp.float64)
        w = jax.random.normal(jax.random.key(4), (3, 40), dtype=jnp.float64)

        def loss(x):
            return jnp.sum(jax.nn.gelu(statistical_topk(x, 6)) * w)

        grad = jax.grad(loss)(x)
        assert np.all(np.isfinite(np.asarray(grad)))
        eps = 1e-6
        direction = jax.random.normal(jax.random.key(5), x.shape, dtype=jnp.float64)
        numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
        analytic = jnp.sum(grad * direction)
        np.testing.assert_allclose(float(analytic), float(numeric), **GRAD_FD)
        # The threshold depends on every entry: gradient reaches dropped entries too.
        dropped = np.asarray(statistical_topk(x, 6)) == 0
        assert np.any(np.asarray(grad)[dropped] != 0)


def test_masked_rows_use_valid_entries_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    valid = np.zeros((6, 50), bool)
    for row, n in enumerate([50, 40, 21, 8, 5, 1]):
        valid[row, :n] = True
    k = 8
    soft = np.asarray(statistical_topk(jnp.asarray(x), k, valid=jnp.asarray(valid)))
    mask = np.asarray(statistical_topk_mask(jnp.asarray(x), k, valid=jnp.asarray(valid)))
    for row in range(6):
        v = valid[row]
        n = int(v.sum())
        assert np.all(soft[row, ~v] == 0)
        assert np.all(mask[row, ~v] == -np.inf)
        xs = x[row, v].astype(np.float64)
        if n <= k:  # keep every valid entry
            np.testing.assert_array_equal(soft[row, v], x[row, v])
            np.testing.assert_array_equal(mask[row, v], x[row, v])
            continue
        theta = xs.mean() + NormalDist().inv_cdf(1 - k / n) * xs.std()
        np.testing.assert_allclose(soft[row, v], np.maximum(xs - theta, 0), **F32_VS_F64)
        np.testing.assert_array_equal(np.isfinite(mask[row, v]), xs >= theta)


def test_disabled_keeps_everything():
    x = jax.random.normal(jax.random.key(6), (4, 64))
    np.testing.assert_array_equal(statistical_topk(x, 4, enabled=jnp.asarray(False)), x)
    np.testing.assert_array_equal(statistical_topk_mask(x, 4, enabled=False), x)


@pytest.mark.parametrize("method", ["lax_top_k", "approx_max_k"])
def test_baseline_methods_threshold_at_kth_largest(method):
    x = jax.random.normal(jax.random.key(7), (4, 512))
    theta, keep_all = statistical_threshold(x, 20, method=method)
    kept = np.asarray(jnp.sum(x >= theta, -1))
    assert not np.any(np.asarray(keep_all))
    if method == "lax_top_k":
        np.testing.assert_array_equal(kept, 20)
    else:
        assert np.all(kept >= 1)


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="k="):
        statistical_topk(jnp.ones((2, 8)), 0)


@pytest.mark.parametrize("masked", [False, True])
def test_sharded_moments_equal_unsharded(masked):
    devices = jax.devices()
    assert len(devices) >= 4, "conftest sets 8 host devices"
    n = 8 if len(devices) >= 8 else 4
    mesh = jax.make_mesh((n,), ("tensor",), axis_types=(AxisType.Auto,))
    x = jax.random.normal(jax.random.key(8), (6, 64 * n)) * 2 + 0.5
    valid = jax.random.bernoulli(jax.random.key(9), 0.7, x.shape) if masked else None
    k = 5 * n

    def local(x, valid):
        return statistical_topk(x, k, valid=valid, axis_name="tensor")

    spec = P(None, "tensor")
    sharded = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, spec if masked else None),
            out_specs=spec,
        )
    )(x, valid)
    np.testing.assert_allclose(sharded, statistical_topk(x, k, valid=valid), **SHARDED)

    def local_mask(x, valid):
        return statistical_topk_mask(x, k, valid=valid, axis_name="tensor")

    sharded_mask = jax.jit(
        jax.shard_map(
            local_mask, mesh=mesh, in_specs=(spec, spec if masked else None), out_specs=spec
        )
    )(x, valid)
    want = statistical_topk_mask(x, k, valid=valid)
    assert np.mean(np.isfinite(sharded_mask) == np.isfinite(want)) > 0.999
