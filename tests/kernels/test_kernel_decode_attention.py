"""One decode step's fused attention (dense and Spark), native and XLA, against a float64
NumPy transcription of the method: ring caches, windows, empty slots, padding rows, n_valid <=
k, ties, huge and zero inputs, an empty cache; every instruction set; vmap, jit, determinism;
bad inputs. The whole-model decode with these kernels is in ``tests/decode``."""

import jax
import jax.numpy as jnp
import kernel_test_base as base
import numpy as np
import pytest
from scipy.special import ndtri

from pallas_kernels.decode_attention import api, native, reference, xla

needs_native = pytest.mark.skipif(not base.NATIVE, reason="native kernels not built")
SOFTCAP = 50.0
TOP_K = 16
# Relative to each output's scale (sum of |weight x value| terms): float32 scores (the
# kernel's tanh and exp are within 2 ulps) feed a softmax over up to a few thousand keys.
REL = 3e-5


def _valid64(pos, q_pos, window):
    kp = np.concatenate([pos, q_pos[:, None]], axis=1).astype(np.int64)
    qp = q_pos[:, None].astype(np.int64)
    return (kp >= 0) & (kp <= qp) & (qp - kp < window)


def _join64(cache, new):
    return np.concatenate(
        [np.asarray(cache, np.float64), np.asarray(new, np.float64)[:, :, None]], 2
    )


def _softcap64(x, cap):
    return x if cap is None else cap * np.tanh(x / cap)


def _spark_oracle(case, top_k, softcap):
    """out [B, N, H], kept [B, N] and the smallest |score - theta| of a thresholded row."""
    qp, qr, kp, kr, v, pos, nkp, nkr, nv, q_pos, window = case
    b, n, _ = qp.shape
    kv = kp.shape[1]
    g = n // kv
    valid = _valid64(np.asarray(pos), np.asarray(q_pos), window)
    kp64, kr64, v64 = _join64(kp, nkp), _join64(kr, nkr), _join64(v, nv)
    out = np.zeros((b, n, v.shape[-1]))
    kept = np.zeros((b, n))
    margin = np.inf
    for i in range(b):
        for h in range(n):
            ok = valid[i]
            if not ok.any():
                continue
            s = _softcap64(kp64[i, h // g] @ np.asarray(qp[i, h], np.float64), softcap)
            sv = s[ok]
            if sv.size <= top_k:
                keep = ok
            else:
                z = ndtri(np.clip(1.0 - top_k / sv.size, 1e-6, 1 - 1e-6))
                theta = min(sv.mean() + z * sv.std(), sv.max())
                keep = ok & (s >= theta)
                margin = min(margin, np.min(np.abs(sv - theta)[sv != sv.max()], initial=np.inf))
            e = np.where(keep, np.exp(s - s[keep].max()), 0.0)
            gate = kr64[i, h // g] @ np.asarray(qr[i, h], np.float64)
            w = e / e.sum() * np.logaddexp(gate, 0.0)
            out[i, h] = w @ v64[i, h // g]
            kept[i, h] = keep.sum()
    return out, kept, margin


def _dense_oracle(case, softcap):
    q, k, v, pos, nk, nv, q_pos, window = case
    b, n, _ = q.shape
    g = n // k.shape[1]
    valid = _valid64(np.asarray(pos), np.asarray(q_pos), window)
    k64, v64 = _join64(k, nk), _join64(v, nv)
    out = np.zeros((b, n, v.shape[-1]))
    for i in range(b):
        if not valid[i].any():
            continue
        for h in range(n):
            s = _softcap64(k64[i, h // g] @ np.asarray(q[i, h], np.float64), softcap)
            e = np.where(valid[i], np.exp(s - s[valid[i]].max()), 0.0)
            out[i, h] = (e / e.sum()) @ v64[i, h // g]
    count = np.broadcast_to(valid.sum(-1)[:, None], (b, n)).astype(np.float64)
    return out, count


def _scale(case_v, new_v, batch, heads):
    # Outputs are weighted means of the values (times gates <= a few): the largest |v| per row.
    joined = np.abs(_join64(case_v, new_v)).max(axis=(1, 2, 3))
    return np.broadcast_to(joined[:, None, None], (batch, heads, 1)) * 4.0


def _ring_positions(gen, b, s, fill):
    """Cache slot positions of a ring written out of order, ``fill[i]`` slots filled per row."""
    pos = np.full((b, s), -1, np.int32)
    for i in range(b):
        slots = gen.permutation(s)[: fill[i]]
        pos[i, slots] = np.arange(fill[i])
    return pos


def _spark_case(gen, b, n, kv, s, r, h, dtype, fill=None, q_scale=0.3, window=10**6):
    fill = [s] * b if fill is None else fill
    pos = _ring_positions(gen, b, s, fill)
    q_pos = np.array([f for f in fill], np.int32)

    def cache(w):
        return base.to_device(gen.standard_normal((b, kv, s, w)), dtype)

    def f32(*shape, scale=1.0):
        return jnp.asarray(gen.standard_normal(shape) * scale, jnp.float32)

    return (
        f32(b, n, r, scale=q_scale), f32(b, n, h - r, scale=0.2), cache(r), cache(h - r),
        cache(h), jnp.asarray(pos), f32(b, kv, r), f32(b, kv, h - r), f32(b, kv, h),
        jnp.asarray(q_pos), window,
    )  # fmt: skip


def _dense_case(gen, b, n, kv, s, h, dtype, fill=None, q_scale=0.3, window=10**6):
    sp = _spark_case(gen, b, n, kv, s, 0, h, dtype, fill, q_scale, window)
    q = jnp.asarray(gen.standard_normal((b, n, h)) * q_scale, jnp.float32)
    k = base.to_device(gen.standard_normal((b, kv, s, h)), dtype)
    nk = jnp.asarray(gen.standard_normal((b, kv, h)), jnp.float32)
    return q, k, sp[4], sp[5], nk, sp[8], sp[9], sp[10]


# (B, N, K, S, R, H): the 2B head shape over three key chunks; odd widths (vector tails) with
# groups of 2; no GQA; one row.
SHAPES = ((1, 8, 4, 1100, 128, 256), (3, 6, 3, 37, 20, 52), (2, 4, 4, 700, 8, 24))


def _run_spark(impl, case, top_k=TOP_K, softcap=SOFTCAP):
    fn = jax.jit(lambda *a: impl.spark_decode_attention(*a, top_k=top_k, softcap=softcap))
    return jax.block_until_ready(fn(*case))  # inside the caller's ISA block (async dispatch)


def _run_dense(impl, case, softcap=SOFTCAP):
    fn = jax.jit(lambda *a: impl.dense_decode_attention(*a, softcap=softcap))
    return jax.block_until_ready(fn(*case))


def _check(got, want, scale, count_want):
    out, count = (np.asarray(a, np.float64) for a in got)
    assert out.shape == want.shape
    err = np.abs(out - want)
    assert np.all(err <= REL * scale + 1e-12), float(np.max(err / (scale + 1e-30)))
    np.testing.assert_array_equal(count, count_want)


def _impls():
    return base.xla_and_native(xla, native)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_spark_matches_the_float64_method_on_every_implementation(dtype):
    gen = base.rng(0)
    for b, n, kv, s, r, h in SHAPES:
        # A partly filled ring in one row, a padding row (q_pos -1) when there are several.
        fill = [s] + [max(0, s - 5 * i) for i in range(1, b)]
        case = list(_spark_case(gen, b, n, kv, s, r, h, dtype, fill))
        if b > 2:
            case[9] = case[9].at[2].set(-1)
        want, kept, margin = _spark_oracle(case, TOP_K, SOFTCAP)
        assert margin > 1e-4  # no key sits at the threshold within float32 rounding
        for _name, impl, isa in _impls():
            with base.using_isa(isa):
                _check(_run_spark(impl, case), want, _scale(case[4], case[8], b, n), kept)
        if b > 2:
            assert kept[2].sum() == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_dense_matches_the_float64_method_on_every_implementation(dtype):
    gen = base.rng(1)
    for b, n, kv, s, _, h in SHAPES:
        fill = [s] + [max(0, s - 7 * i) for i in range(1, b)]
        case = _dense_case(gen, b, n, kv, s, h, dtype, fill)
        want, count = _dense_oracle(case, SOFTCAP)
        for _name, impl, isa in _impls():
            with base.using_isa(isa):
                _check(_run_dense(impl, case), want, _scale(case[2], case[5], b, n), count)


def test_windows_and_rows_with_few_valid_keys():
    gen = base.rng(2)
    b, n, kv, s, r, h = 3, 4, 2, 300, 16, 48
    for window in (1, 5, 40, 299):
        # Row 1 has 10 filled slots (<= top_k: every valid key is kept); row 2 none (only its
        # own key).
        case = _spark_case(gen, b, n, kv, s, r, h, jnp.float32, [s, 10, 0], window=window)
        want, kept, _ = _spark_oracle(case, TOP_K, SOFTCAP)
        dense = _dense_case(gen, b, n, kv, s, h, jnp.float32, [s, 10, 0], window=window)
        want_d, count_d = _dense_oracle(dense, SOFTCAP)
        assert np.all(kept[2] == 1) and np.all(count_d[2] == 1)
        for _, impl, isa in _impls():
            with base.using_isa(isa):
                _check(_run_spark(impl, case), want, _scale(case[4], case[8], b, n), kept)
                _check(_run_dense(impl, dense), want_d, _scale(dense[2], dense[5], b, n), count_d)


def test_degenerate_inputs():
    gen = base.rng(3)
    b, n, kv, s, r, h = 2, 4, 2, 200, 16, 48
    for _, impl, isa in _impls():
        with base.using_isa(isa):
            # Zero queries: every score ties (0); the threshold keeps every valid key, and the
            # output is the mean of the values times softplus(0).
            case = list(_spark_case(gen, b, n, kv, s, r, h, jnp.float32))
            case[0] = jnp.zeros_like(case[0])
            case[1] = jnp.zeros_like(case[1])
            out, kept = _run_spark(impl, case)
            np.testing.assert_array_equal(kept, np.full((b, n), s + 1.0))
            values = _join64(case[4], case[8]).mean(axis=2) * np.log(2.0)
            np.testing.assert_allclose(
                out, np.repeat(values, n // kv, axis=1), rtol=1e-5, atol=1e-6
            )
            # Huge queries: soft-capped scores saturate at +-50 (float32 ties at the cap),
            # nothing overflows; without the soft-cap, scores near 1e4 stay finite through the
            # max-subtracted softmax.
            for scale, cap in ((1e6, SOFTCAP), (1e3, None)):
                case = list(_spark_case(gen, b, n, kv, s, r, h, jnp.float32, q_scale=scale))
                out, kept = _run_spark(impl, case, softcap=cap)
                assert np.all(np.isfinite(out)) and np.all(kept >= 1)
                dense = list(_dense_case(gen, b, n, kv, s, h, jnp.float32, q_scale=scale))
                out_d, _ = _run_dense(impl, dense, softcap=cap)
                assert np.all(np.isfinite(out_d))
            # Zero values give exact zeros; top_k >= n_valid keeps every valid key.
            case = list(_spark_case(gen, b, n, kv, s, r, h, jnp.float32))
            case[4], case[8] = jnp.zeros_like(case[4]), jnp.zeros_like(case[8])
            out, kept = _run_spark(impl, case, top_k=10**6)
            np.testing.assert_array_equal(out, np.zeros((b, n, h)))
            np.testing.assert_array_equal(kept, np.full((b, n), s + 1.0))


def test_an_empty_cache_attends_to_the_tokens_own_key():
    gen = base.rng(4)
    case = _spark_case(gen, 2, 4, 2, 0, 8, 24, jnp.float32, [0, 0])
    dense = _dense_case(gen, 2, 4, 2, 0, 24, jnp.float32, [0, 0])
    for _, impl, isa in _impls():
        with base.using_isa(isa):
            out, kept = _run_spark(impl, case)
            gate = np.logaddexp(
                np.einsum("bkgc,bkc->bkg", np.asarray(case[1]).reshape(2, 2, 2, 16), case[7]), 0
            )
            want = gate[..., None] * np.asarray(case[8])[:, :, None]
            np.testing.assert_allclose(out, want.reshape(2, 4, 24), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(kept, np.ones((2, 4)))
            out_d, count = _run_dense(impl, dense)
            np.testing.assert_allclose(out_d, np.repeat(dense[5], 2, axis=1), rtol=1e-6)
            np.testing.assert_array_equal(count, np.ones((2, 4)))


@needs_native
def test_native_under_vmap_is_deterministic_and_matches_the_reference():
    gen = base.rng(5)
    cases = [_spark_case(gen, 2, 4, 2, 600, 16, 48, jnp.bfloat16) for _ in range(3)]
    stacked = [jnp.stack([c[i] for c in cases]) for i in range(10)]
    window = 300

    def one(*a):
        return native.spark_decode_attention(*a, window, top_k=TOP_K, softcap=SOFTCAP)

    out, kept = jax.jit(jax.vmap(one))(*stacked)
    again, _ = jax.jit(jax.vmap(one))(*stacked)
    np.testing.assert_array_equal(out, again)  # the same bits run to run
    for i, c in enumerate(cases):
        c = (*c[:10], window)
        want, want_kept = reference.spark_decode_attention(*c, top_k=TOP_K, softcap=SOFTCAP)
        np.testing.assert_allclose(out[i], want, rtol=2e-5, atol=2e-6)
        np.testing.assert_array_equal(kept[i], want_kept)
    dense = [_dense_case(gen, 2, 4, 2, 600, 48, jnp.float32) for _ in range(2)]
    stacked = [jnp.stack([c[i] for c in dense]) for i in range(7)]
    out, _ = jax.jit(jax.vmap(lambda *a: native.dense_decode_attention(*a, 50, softcap=None)))(
        *stacked
    )
    for i, c in enumerate(dense):
        want, _ = reference.dense_decode_attention(*c[:7], 50)
        np.testing.assert_allclose(out[i], want, rtol=2e-5, atol=2e-6)


def test_bad_inputs_are_refused_with_clear_errors():
    gen = base.rng(6)
    case = list(_spark_case(gen, 1, 4, 2, 10, 8, 24, jnp.float32))
    run = api.spark_decode_attention
    with pytest.raises(ValueError, match="top_k"):
        run(*case, top_k=0)
    with pytest.raises(ValueError, match="implementation"):
        run(*case, top_k=4, implementation="pallas_tpu")
    bad = list(case)
    bad[3] = bad[3][:, :, :5]
    with pytest.raises(ValueError, match="key cache"):
        run(*bad, top_k=4)
    bad = list(case)
    bad[9] = bad[9].astype(jnp.float32)
    with pytest.raises(ValueError, match="q_pos"):
        run(*bad, top_k=4)
    bad = list(case)
    bad[0] = bad[0][:, :3]
    with pytest.raises(ValueError, match="queries"):
        run(*bad, top_k=4)
    if base.NATIVE:
        bad = list(case)
        bad[3] = bad[3].astype(jnp.bfloat16)
        with pytest.raises(ValueError, match="one dtype"):
            run(*bad, top_k=4, implementation="native")
