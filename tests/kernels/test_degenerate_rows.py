"""Statistical top-k on degenerate rows: every implementation against one float64 oracle.

The rows are the ones where a threshold goes wrong: all entries equal, a tight cluster with a
large mean (the spread is lost by a one-pass variance in float32), scores bunched under the
attention soft-cap, and valid counts of 0, 1, k and k + 1. The semantics are those of the
library: theta = mean + z * std over the valid entries, capped at the largest valid entry, so
a row with any valid entry keeps at least its top one (all of an all-equal row); rows with at
most k valid entries keep all of them; a row with none keeps nothing, and the softmax over it
gives zeros. Each implementation (the model's XLA code, the kernel reference, the Pallas TPU
and GPU kernels in interpret mode, the kernel seam and the decode path's keep mask) must keep
exactly the oracle's entries. Then a zero input vector in the model: logits and gradients
stay finite in training, and cached decode still equals the full forward.
"""

import dataclasses
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro_configs import model_variants
from tolerances import F32_VS_F64

from pallas_kernels.stat_topk import api as stat_topk_api
from pallas_kernels.stat_topk.xla import statistical_topk, statistical_topk_mask
from sparse_jax import forward, init_params
from sparse_jax.decode.cache import init_cache
from sparse_jax.decode.step import DecodeOptions, decode_params, decode_step, prefill
from sparse_jax.kernels import Kernels
from sparse_jax.model.attention import spark_keep
from sparse_jax.model.layers import safe_softmax, softcap

D, K = 64, 8
SOFTCAP = 50.0


def _oracle(x: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask and soft output of one row, in float64 from the definition."""
    n = int(valid.sum())
    if n == 0:
        return np.zeros_like(valid), np.zeros(x.shape)
    xv = x[valid].astype(np.float64)
    if n <= k:
        return valid.copy(), np.where(valid, x, 0.0)
    z = NormalDist().inv_cdf(1.0 - k / n)
    theta = min(xv.mean() + z * xv.std(), xv.max())
    keep = valid & (x.astype(np.float64) >= theta)
    return keep, np.where(valid, np.maximum(x.astype(np.float64) - theta, 0.0), 0.0)


def _separated(x: np.ndarray, valid: np.ndarray, k: int, band: float) -> np.ndarray:
    """x with no valid entry within ``band`` below or above the oracle's theta (unless tied at
    the row maximum), so that float32 and float64 thresholds keep the same entries."""
    x = x.astype(np.float64)
    for _ in range(4):
        n = int(valid.sum())
        if n <= k:
            break
        xv = x[valid]
        theta = min(xv.mean() + NormalDist().inv_cdf(1 - k / n) * xv.std(), xv.max())
        close = valid & (np.abs(x - theta) < band) & (x < xv.max())
        if not close.any():
            break
        x = np.where(close, np.where(x >= theta, theta + band, theta - band), x)
    return x.astype(np.float32)


def _rows() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    all_valid = np.ones(D, bool)
    gauss = rng.normal(size=D)
    # Raw scores far past the soft-cap: after it, all sit within 0.25 of 50, several tie at
    # the float32 value 50 exactly.
    capped = np.asarray(softcap(jnp.asarray(rng.uniform(150.0, 600.0, D), jnp.float32), SOFTCAP))
    rows = {
        "all_equal": (np.full(D, 0.3, np.float32), all_valid),
        "all_zero": (np.zeros(D, np.float32), all_valid),
        "tight_cluster_mean_40": (
            _separated(40.0 + 0.01 * gauss, all_valid, K, 5e-4),
            all_valid,
        ),
        "under_softcap": (_separated(capped, all_valid, K, 2e-5), all_valid),
        "gaussian": (_separated(gauss, all_valid, K, 1e-3), all_valid),
    }
    for n in (0, 1, K, K + 1, D // 2):
        valid = np.zeros(D, bool)
        valid[rng.permutation(D)[:n]] = True
        rows[f"n_valid_{n}"] = (_separated(rng.normal(size=D) * 3 + 5, valid, K, 1e-3), valid)
    equal_masked = np.zeros(D, bool)
    equal_masked[: D // 2] = True
    rows["all_equal_half_valid"] = (np.full(D, -2.5, np.float32), equal_masked)
    return rows


ROWS = _rows()
ALL_VALID = [name for name, (_, valid) in ROWS.items() if valid.all()]


def _batch(names):
    x = np.stack([ROWS[n][0] for n in names]).astype(np.float32)
    valid = np.stack([ROWS[n][1] for n in names])
    keep, soft = zip(*(_oracle(ROWS[n][0], ROWS[n][1], K) for n in names), strict=True)
    return x, valid, np.stack(keep), np.stack(soft)


def _soft_tolerance(x: np.ndarray) -> dict:
    # float32 rounding of theta scales with the magnitude of the row, not of x - theta.
    return dict(rtol=F32_VS_F64["rtol"], atol=16 * np.finfo(np.float32).eps * np.abs(x).max())


def _xla_model(x, valid, form):
    fn = statistical_topk if form == "soft" else statistical_topk_mask
    return fn(x, K, valid=valid)


def _kernel(implementation):
    interpret = implementation != "xla"

    def run(x, valid, form):
        return stat_topk_api.statistical_topk(
            x, K, valid=valid, form=form, implementation=implementation, interpret=interpret
        )

    return run


def _seam(x, valid, form):
    kernels = Kernels("pallas_tpu", interpret=True)
    if form == "soft":
        return kernels.soft_topk(x, K)
    return kernels.mask_topk(x, K, valid=valid)


IMPLEMENTATIONS = {
    "model_xla": _xla_model,
    "kernel_reference": _kernel("xla"),
    "pallas_tpu": _kernel("pallas_tpu"),
    "pallas_gpu": _kernel("pallas_gpu"),
    "seam_pallas_tpu": _seam,
}


def _check(x, valid, keep, soft, got_mask, got_soft, names):
    got_keep = np.isfinite(np.asarray(got_mask))
    for i, name in enumerate(names):
        np.testing.assert_array_equal(got_keep[i], keep[i], err_msg=name)
        np.testing.assert_array_equal(np.asarray(got_mask)[i][keep[i]], x[i][keep[i]], name)
        if got_soft is not None:
            np.testing.assert_allclose(
                np.asarray(got_soft)[i], soft[i], err_msg=name, **_soft_tolerance(x[i])
            )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked_rows_keep_what_the_oracle_keeps(implementation):
    names = list(ROWS)
    x, valid, keep, soft = _batch(names)
    run = IMPLEMENTATIONS[implementation]
    got_mask = run(jnp.asarray(x), jnp.asarray(valid), "mask")
    # The seam's soft form has no mask: the FFN's rows are never masked.
    got_soft = None if implementation == "seam_pallas_tpu" else run(x, jnp.asarray(valid), "soft")
    _check(x, valid, keep, soft, got_mask, got_soft, names)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_unmasked_rows_keep_what_the_oracle_keeps(implementation):
    x, valid, keep, soft = _batch(ALL_VALID)
    run = IMPLEMENTATIONS[implementation]
    got_soft = run(jnp.asarray(x), None, "soft")
    got_mask = (
        statistical_topk_mask(jnp.asarray(x), K) if implementation == "seam_pallas_tpu" else None
    )
    if got_mask is None:
        got_mask = run(jnp.asarray(x), None, "mask")
    _check(x, valid, keep, soft, got_mask, got_soft, ALL_VALID)


def test_decode_keep_mask_matches_the_oracle():
    cfg = dataclasses.replace(model_variants((True,), (True,))["spark"], attn_top_k=K)
    names = list(ROWS)
    x, valid, keep, _ = _batch(names)
    # The cache layout: scores [B, K, G, T, S] and validity [B, T, S]; one query per row.
    got = spark_keep(cfg, jnp.asarray(x)[:, None, None, None, :], jnp.asarray(valid)[:, None])
    np.testing.assert_array_equal(np.asarray(got)[:, 0, 0, 0], keep)


def test_kept_rows_are_never_empty_and_empty_rows_give_zero_weights():
    x, valid, keep, _ = _batch(list(ROWS))
    mask = statistical_topk_mask(jnp.asarray(x), K, valid=jnp.asarray(valid))
    assert np.all(keep.any(-1) == valid.any(-1))
    probs = np.asarray(safe_softmax(mask))
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(-1), valid.any(-1).astype(np.float32), rtol=1e-6)
    grad = jax.grad(lambda m: jnp.sum(safe_softmax(m) * jnp.arange(D)))(mask)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_moments_are_sound_on_a_tight_cluster_with_a_large_mean():
    # A one-pass float32 variance, E[x^2] - mean^2, loses the whole spread here.
    rng = np.random.default_rng(1)
    x = (40.0 + 0.01 * rng.normal(size=(64, 4096))).astype(np.float32)
    kept = np.asarray(jnp.sum(statistical_topk(jnp.asarray(x), 328) > 0, -1))
    kept_mask = np.asarray(jnp.sum(jnp.isfinite(statistical_topk_mask(jnp.asarray(x), 328)), -1))
    want = np.asarray([_oracle(row, np.ones(4096, bool), 328)[0].sum() for row in x])
    assert np.abs(kept - want).max() <= 2 and np.abs(kept_mask - want).max() <= 2


# Token 0 embeds to the zero vector, so in the first layer its query scores every key 0: an
# all-equal row. The first layer is global so that at positions past 2 * attn_top_k the
# quantile z is positive, where a threshold floored above the mean would keep no key at all.
ZERO_TOKENS = [[5, 9, 0, 3, 11, 7, 1, 2, 13, 4, 6, 8, 17, 19, 0, 21, 23, 2, 3, 5, 0, 7, 9, 0]]


def _zero_vector_model():
    cfg = model_variants((True, True), (True, True))["spark"]
    return dataclasses.replace(cfg, layer_types=("global", "local"))


def _zero_token_params(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    emb = params["embedder"]["embedding"]
    params["embedder"]["embedding"] = emb.at[0].set(0.0)
    return params


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu"])
def test_a_zero_input_vector_keeps_logits_and_gradients_finite(implementation):
    cfg = _zero_vector_model()
    kernels = Kernels(implementation, interpret=implementation != "xla")
    params = _zero_token_params(cfg)
    tokens = jnp.asarray(ZERO_TOKENS)

    def loss(p):
        logits, _ = forward(cfg, p, tokens, kernels=kernels)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1])

    logits, _ = jax.jit(lambda p: forward(cfg, p, tokens, kernels=kernels))(params)
    assert np.all(np.isfinite(np.asarray(logits)))
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("path", ["masked", "sparse"])
def test_decode_with_a_zero_input_vector_equals_the_forward(path):
    cfg = _zero_vector_model()
    params = _zero_token_params(cfg)
    tokens = np.asarray(ZERO_TOKENS)
    want, _ = jax.jit(lambda p: forward(cfg, p, jnp.asarray(tokens)))(params)
    dparams = decode_params(cfg, params)
    cache = init_cache(cfg, 1, tokens.shape[1])
    masked = DecodeOptions("masked")
    first, cache, _ = prefill(cfg, dparams, cache, tokens[:, :4], None, masked)
    got = [np.asarray(first)]
    for t in range(4, tokens.shape[1]):
        out, cache, _ = decode_step(cfg, dparams, cache, tokens[:, t], DecodeOptions(path))
        got.append(np.asarray(out))
    np.testing.assert_allclose(got[0], np.asarray(want)[:, 3], **F32_VS_F64)
    np.testing.assert_allclose(np.stack(got[1:], 1), np.asarray(want)[:, 4:], **F32_VS_F64)
