"""Spark attention from given predictor scores (a prefill chunk's queries), native and XLA,
against a float64 NumPy transcription of the method: invalid keys, rows with no valid key or
with n_valid <= k, ties, huge and zero inputs, one key, key tables larger than the kernel's
cache blocks; every instruction set; float32 and bfloat16 keys; vmap, jit, determinism; bad
inputs. The whole-model prefill with this kernel is in ``tests/decode``."""

import jax
import jax.numpy as jnp
import kernel_test_base as base
import numpy as np
import pytest
from scipy.special import ndtri

from pallas_kernels.scored_attention import api, native, reference, xla

needs_native = pytest.mark.skipif(not base.NATIVE, reason="native kernels not built")
TOP_K = 16
# Relative to each row's output scale: float32 exp and softplus (within a few ulps) over up
# to a few thousand kept keys.
REL = 3e-5


def _oracle(scores, q_rest, k_rest, v, top_k):
    """out [B, K, M, H], kept [B, K, M] and the smallest |score - theta| of a thresholded row."""
    s64 = np.asarray(scores, np.float64)
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q_rest, k_rest, v))
    b, kv, m, _ = s64.shape
    out = np.zeros((b, kv, m, v64.shape[-1]))
    kept = np.zeros((b, kv, m))
    margin = np.inf
    for i in range(b):
        for k in range(kv):
            for r in range(m):
                s = s64[i, k, r]
                ok = s > -np.inf
                if not ok.any():
                    continue
                sv = s[ok]
                if sv.size <= top_k:
                    keep = ok
                else:
                    z = ndtri(np.clip(1.0 - top_k / sv.size, 1e-6, 1 - 1e-6))
                    theta = min(sv.mean() + z * sv.std(), sv.max())
                    keep = ok & (s >= theta)
                    off = np.abs(sv - theta)[sv != sv.max()]
                    margin = min(margin, np.min(off, initial=np.inf))
                e = np.where(keep, np.exp(np.where(keep, s, 0.0) - sv.max()), 0.0)
                gate = k64[i, k] @ q64[i, k, r]
                w = e / e.sum() * np.logaddexp(gate, 0.0)
                out[i, k, r] = w @ v64[i, k]
                kept[i, k, r] = keep.sum()
    return out, kept, margin


def _case(gen, b, kv, m, s, c, h, dtype, invalid=0.3, scale=3.0):
    scores = gen.standard_normal((b, kv, m, s)) * scale
    scores[gen.random(scores.shape) < invalid] = -np.inf
    return (
        jnp.asarray(scores, jnp.float32),
        jnp.asarray(gen.standard_normal((b, kv, m, c)) * 0.2, jnp.float32),
        base.to_device(gen.standard_normal((b, kv, s, c)), dtype),
        base.to_device(gen.standard_normal((b, kv, s, h)), dtype),
    )


def _scale(v, m):
    # Outputs are weighted means of the values times gates of a few: the largest |v| per table.
    top = np.abs(np.asarray(v, np.float64)).max(axis=(2, 3))
    return np.broadcast_to(top[:, :, None, None], (*top.shape, m, 1)) * 4.0


def _run(impl, case, top_k=TOP_K):
    fn = jax.jit(lambda *a: impl.spark_scored_attention(*a, top_k=top_k))
    return jax.block_until_ready(fn(*case))  # inside the caller's ISA block (async dispatch)


def _check(got, want, scale, kept_want):
    out, kept = (np.asarray(a, np.float64) for a in got)
    assert out.shape == want.shape
    err = np.abs(out - want)
    assert np.all(err <= REL * scale + 1e-12), float(np.max(err / (scale + 1e-30)))
    np.testing.assert_array_equal(kept, kept_want)


def _impls():
    return base.xla_and_native(xla, native)


# (B, K, M, S, C, H): the 2B head shape (two query heads x 8 positions per kv head) over a
# table of more keys than one cache block holds; odd widths (vector tails); a single row.
SHAPES = ((1, 4, 16, 2100, 128, 256), (2, 3, 5, 37, 20, 52), (1, 1, 1, 700, 8, 24))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_matches_the_float64_method_on_every_implementation(dtype):
    gen = base.rng(0)
    for b, kv, m, s, c, h in SHAPES:
        case = list(_case(gen, b, kv, m, s, c, h, dtype))
        # One row with no valid key, one with fewer valid keys than top_k.
        scores = np.asarray(case[0]).copy()
        scores[0, 0, 0] = -np.inf
        if m > 1:
            scores[0, -1, 1, TOP_K // 2 :] = -np.inf
        case[0] = jnp.asarray(scores)
        want, kept, margin = _oracle(*case, TOP_K)
        assert margin > 1e-4  # no key sits at the threshold within float32 rounding
        assert kept[0, 0, 0] == 0
        for _name, impl, isa in _impls():
            with base.using_isa(isa):
                _check(_run(impl, case), want, _scale(case[3], m), kept)


def test_degenerate_inputs():
    gen = base.rng(1)
    b, kv, m, s, c, h = 1, 2, 6, 300, 16, 40
    for _, impl, isa in _impls():
        with base.using_isa(isa):
            # Equal scores: the threshold keeps every valid key, and with zero queries the
            # output is the mean of the valid keys' values times softplus(0).
            case = list(_case(gen, b, kv, m, s, c, h, jnp.float32, invalid=0.0))
            case[0] = jnp.zeros_like(case[0])
            case[1] = jnp.zeros_like(case[1])
            out, kept = _run(impl, case)
            np.testing.assert_array_equal(kept, np.full((b, kv, m), float(s)))
            mean = np.asarray(case[3], np.float64).mean(axis=2, keepdims=True) * np.log(2.0)
            np.testing.assert_allclose(out, np.broadcast_to(mean, out.shape), rtol=1e-5, atol=1e-6)
            # Scores saturated at a soft-cap (+-50, many ties at the top) and huge gates stay
            # finite; tiny scores (1e-30 apart) too.
            for scale in (50.0, 1e-30):
                case = list(_case(gen, b, kv, m, s, c, h, jnp.float32, scale=scale))
                case[0] = jnp.clip(case[0], -50.0, 50.0)
                case[1] = case[1] * 1e4
                want, kept, _ = _oracle(*case, TOP_K)
                out, got_kept = _run(impl, case)
                assert np.all(np.isfinite(out)) and np.all(np.asarray(got_kept) >= 1)
                np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
            # Zero values give exact zeros; top_k >= n_valid keeps every valid key.
            case = list(_case(gen, b, kv, m, s, c, h, jnp.float32))
            case[3] = jnp.zeros_like(case[3])
            out, kept = _run(impl, case, top_k=10**6)
            np.testing.assert_array_equal(out, np.zeros((b, kv, m, h)))
            np.testing.assert_array_equal(kept, np.sum(np.isfinite(case[0]), axis=-1))
            # One key: kept whenever valid.
            case = list(_case(gen, b, kv, m, 1, c, h, jnp.float32, invalid=0.5))
            want, want_kept, _ = _oracle(*case, TOP_K)
            out, kept = _run(impl, case)
            np.testing.assert_array_equal(kept, want_kept)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@needs_native
def test_native_under_vmap_is_deterministic_and_matches_the_reference():
    gen = base.rng(2)
    cases = [_case(gen, 1, 2, 9, 1500, 16, 48, jnp.bfloat16) for _ in range(3)]
    stacked = [jnp.stack([c[i] for c in cases]) for i in range(4)]
    fn = jax.jit(jax.vmap(lambda *a: native.spark_scored_attention(*a, top_k=TOP_K)))
    out, kept = fn(*stacked)
    again, _ = fn(*stacked)
    np.testing.assert_array_equal(out, again)  # the same bits run to run
    for i, c in enumerate(cases):
        want, want_kept = reference.spark_scored_attention(*c, top_k=TOP_K)
        np.testing.assert_allclose(out[i], want, rtol=2e-5, atol=2e-6)
        np.testing.assert_array_equal(kept[i], want_kept)


def test_bad_inputs_are_refused_with_clear_errors():
    gen = base.rng(3)
    case = list(_case(gen, 1, 2, 4, 10, 8, 24, jnp.float32))
    run = api.spark_scored_attention
    with pytest.raises(ValueError, match="top_k"):
        run(*case, top_k=0)
    with pytest.raises(ValueError, match="implementation"):
        run(*case, top_k=4, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="4-D"):
        run(case[0][0], *case[1:], top_k=4)
    bad = list(case)
    bad[2] = bad[2][:, :, :5]
    with pytest.raises(ValueError, match="inconsistent shapes"):
        run(*bad, top_k=4)
    bad = list(case)
    bad[2] = bad[2].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        run(*bad, top_k=4)
