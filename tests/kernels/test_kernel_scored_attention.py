"""Spark attention from raw predictor scores (a prefill chunk's queries), native and XLA,
against a float64 NumPy transcription of the method: empty slots, future and out-of-window
keys, padding queries, rows with n_valid <= k, ties, huge and zero inputs, one key, key
tables larger than the kernel's cache blocks; every instruction set; float32 and bfloat16
keys; vmap, jit, determinism; bad inputs. The whole-model prefill with this kernel is in
``tests/decode``."""

import jax
import jax.numpy as jnp
import kernel_test_base as base
import numpy as np
import pytest
from scipy.special import ndtri

from pallas_kernels.scored_attention import api, native, reference, xla

needs_native = pytest.mark.skipif(not base.NATIVE, reason="native kernels not built")
TOP_K = 16
SOFTCAP = 50.0
# Relative to each row's output scale: float32 tanh, exp and softplus (within a few ulps)
# over up to a few thousand kept keys.
REL = 3e-5


def _oracle(case, top_k, softcap=SOFTCAP):
    """out [B, K, G, T, H], kept [B, K, G, T] and the smallest |score - theta| of a
    thresholded row."""
    scores, q_rest, k_rest, v, q_pos, k_pos, window = case
    raw = np.asarray(scores, np.float64)
    s64 = raw if softcap is None else softcap * np.tanh(raw / softcap)
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q_rest, k_rest, v))
    qp, kp = np.asarray(q_pos, np.int64), np.asarray(k_pos, np.int64)
    b, kv, g, t, _ = s64.shape
    out = np.zeros((b, kv, g, t, v64.shape[-1]))
    kept = np.zeros((b, kv, g, t))
    margin = np.inf
    for i in range(b):
        for j in range(t):
            ok = (kp[i] >= 0) & (qp[i, j] >= 0) & (kp[i] <= qp[i, j]) & (qp[i, j] - kp[i] < window)
            if not ok.any():
                continue
            for k in range(kv):
                for h in range(g):
                    s = s64[i, k, h, j]
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
                    gate = k64[i, k] @ q64[i, k, h, j]
                    w = e / e.sum() * np.logaddexp(gate, 0.0)
                    out[i, k, h, j] = w @ v64[i, k]
                    kept[i, k, h, j] = keep.sum()
    return out, kept, margin


def _case(gen, b, kv, g, t, s, c, h, dtype, empty=0.2, scale=30.0, window=10**6):
    """A chunk of t queries at the end of s slots: the first s - t slots a cache ring (some
    empty, written out of order), the last t the chunk's own keys."""
    cached = s - t
    k_pos = np.full((b, s), -1, np.int32)
    for i in range(b):
        filled = gen.permutation(cached)[: int(cached * (1 - empty))]
        k_pos[i, filled] = np.arange(filled.size)
        k_pos[i, cached:] = filled.size + np.arange(t)
    q_pos = k_pos[:, cached:].copy()
    return [
        jnp.asarray(gen.standard_normal((b, kv, g, t, s)) * scale, jnp.float32),
        jnp.asarray(gen.standard_normal((b, kv, g, t, c)) * 0.2, jnp.float32),
        base.to_device(gen.standard_normal((b, kv, s, c)), dtype),
        base.to_device(gen.standard_normal((b, kv, s, h)), dtype),
        jnp.asarray(q_pos),
        jnp.asarray(k_pos),
        window,
    ]


def _scale(v, g, t):
    # Outputs are weighted means of the values times gates of a few: the largest |v| per table.
    top = np.abs(np.asarray(v, np.float64)).max(axis=(2, 3))
    return np.broadcast_to(top[:, :, None, None, None], (*top.shape, g, t, 1)) * 4.0


def _run(impl, case, top_k=TOP_K, softcap=SOFTCAP):
    fn = jax.jit(lambda *a: impl.spark_scored_attention(*a, case[6], top_k=top_k, softcap=softcap))
    return jax.block_until_ready(fn(*case[:6]))  # inside the caller's ISA block (async dispatch)


def _check(got, want, scale, kept_want):
    out, kept = (np.asarray(a, np.float64) for a in got)
    assert out.shape == want.shape
    err = np.abs(out - want)
    assert np.all(err <= REL * scale + 1e-12), float(np.max(err / (scale + 1e-30)))
    np.testing.assert_array_equal(kept, kept_want)


def _impls():
    return base.xla_and_native(xla, native)


# (B, K, G, T, S, C, H): the 2B head shape (two query heads per kv head, 8 queries) over a
# table of more keys than one cache block holds; odd widths (vector tails); one query head.
SHAPES = ((1, 4, 2, 8, 2100, 128, 256), (2, 3, 2, 5, 37, 20, 52), (1, 1, 1, 3, 700, 8, 24))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_matches_the_float64_method_on_every_implementation(dtype):
    gen = base.rng(0)
    for b, kv, g, t, s, c, h in SHAPES:
        for window in (10**6, 12):
            case = _case(gen, b, kv, g, t, s, c, h, dtype, window=window)
            # A padding query, and (short window) rows with fewer valid keys than top_k.
            case[4] = case[4].at[0, 0].set(-1)
            want, kept, margin = _oracle(case, TOP_K)
            assert margin > 1e-4  # no key sits at the threshold within float32 rounding
            assert np.all(kept[0, :, :, 0] == 0)
            assert window > 100 or np.all(kept <= 12)
            for _name, impl, isa in _impls():
                with base.using_isa(isa):
                    _check(_run(impl, case), want, _scale(case[3], g, t), kept)


def test_degenerate_inputs():
    gen = base.rng(1)
    b, kv, g, t, s, c, h = 1, 2, 2, 3, 300, 16, 40
    for _, impl, isa in _impls():
        with base.using_isa(isa):
            # Equal scores: the threshold keeps every valid key, and with zero queries the
            # output is the mean of the valid keys' values times softplus(0).
            case = _case(gen, b, kv, g, t, s, c, h, jnp.float32, empty=0.0)
            case[0] = jnp.zeros_like(case[0])
            case[1] = jnp.zeros_like(case[1])
            want, want_kept, _ = _oracle(case, TOP_K)
            out, kept = _run(impl, case)
            np.testing.assert_array_equal(kept, want_kept)
            assert np.all(want_kept >= s - t)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
            # Huge raw scores saturate at the soft-cap (+-50, many ties at the top); without
            # the cap, scores near 1e4 stay finite through the max-subtracted softmax; huge
            # gates too; tiny scores (1e-18: their squared deviations are still float32
            # normals; the native kernel sums them in float64, so 1e-30 too). Saturated rows
            # put keys within float32 rounding of theta: there the XLA form is the oracle.
            cases = [(1e6, SOFTCAP), (1e4, None), (1e-18, SOFTCAP)]
            cases += [(1e-30, SOFTCAP)] if impl is native else []
            for scale, cap in cases:
                case = _case(gen, b, kv, g, t, s, c, h, jnp.float32, scale=scale)
                case[1] = case[1] * 1e4
                if scale > 1e5:
                    want, want_kept = _run(xla, case, softcap=cap)
                else:
                    want, want_kept, _ = _oracle(case, TOP_K, cap)
                out, kept = _run(impl, case, softcap=cap)
                assert np.all(np.isfinite(out)) and np.all(np.asarray(kept) >= 1)
                np.testing.assert_array_equal(kept, want_kept)
                np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            # Zero values give exact zeros; top_k >= n_valid keeps every valid key.
            case = _case(gen, b, kv, g, t, s, c, h, jnp.float32)
            case[3] = jnp.zeros_like(case[3])
            _, want_kept, _ = _oracle(case, 10**6)
            out, kept = _run(impl, case, top_k=10**6)
            np.testing.assert_array_equal(out, np.zeros((b, kv, g, t, h)))
            np.testing.assert_array_equal(kept, want_kept)
            # One key (the chunk's only query's own): kept.
            case = _case(gen, b, kv, g, 1, 1, c, h, jnp.float32)
            want, want_kept, _ = _oracle(case, TOP_K)
            out, kept = _run(impl, case)
            np.testing.assert_array_equal(kept, np.ones((b, kv, g, 1)))
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@needs_native
def test_native_under_vmap_is_deterministic_and_matches_the_reference():
    gen = base.rng(2)
    cases = [_case(gen, 1, 2, 2, 9, 1500, 16, 48, jnp.bfloat16) for _ in range(3)]
    stacked = [jnp.stack([c[i] for c in cases]) for i in range(6)]

    def one(*a):
        return native.spark_scored_attention(*a, 300, top_k=TOP_K, softcap=SOFTCAP)

    fn = jax.jit(jax.vmap(one))
    out, kept = fn(*stacked)
    again, _ = fn(*stacked)
    np.testing.assert_array_equal(out, again)  # the same bits run to run
    for i, c in enumerate(cases):
        want, want_kept = reference.spark_scored_attention(
            *c[:6], 300, top_k=TOP_K, softcap=SOFTCAP
        )
        # float32 sums over a thousand keys in other orders
        np.testing.assert_allclose(out[i], want, rtol=2e-5, atol=1e-5)
        np.testing.assert_array_equal(kept[i], want_kept)


def test_bad_inputs_are_refused_with_clear_errors():
    gen = base.rng(3)
    case = _case(gen, 1, 2, 2, 4, 10, 8, 24, jnp.float32)
    run = api.spark_scored_attention
    with pytest.raises(ValueError, match="top_k"):
        run(*case, top_k=0)
    with pytest.raises(ValueError, match="implementation"):
        run(*case, top_k=4, implementation="pallas_tpu")
    with pytest.raises(ValueError, match=r"\[B, K, G, T, S\]"):
        run(case[0][0], *case[1:], top_k=4)
    bad = list(case)
    bad[2] = bad[2][:, :, :5]
    with pytest.raises(ValueError, match="inconsistent shapes"):
        run(*bad, top_k=4)
    bad = list(case)
    bad[2] = bad[2].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        run(*bad, top_k=4)
    bad = list(case)
    bad[4] = bad[4].astype(jnp.float32)
    with pytest.raises(ValueError, match="q_pos"):
        run(*bad, top_k=4)
    bad = list(case)
    bad[5] = bad[5][:, :3]
    with pytest.raises(ValueError, match="k_pos"):
        run(*bad, top_k=4)
    with pytest.raises(ValueError, match="window"):
        run(*case[:6], jnp.ones(2, jnp.int32), top_k=4)
