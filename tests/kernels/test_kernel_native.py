"""The native CPU kernels: the dense product, the gathered FFN and top-k decode attention
against float64 oracles, on every instruction set this CPU runs; degenerate inputs; vmap,
jit, gradients, determinism; the build, the loader and the ``auto`` fallback when the library
is missing."""

import functools
import logging

import jax
import jax.numpy as jnp
import kernel_test_base as base
import numpy as np
import pytest
from scipy.special import ndtri

from pallas_kernels import ImplementationUnavailableError, _native
from pallas_kernels._common import dispatch
from pallas_kernels._native import build
from pallas_kernels.linear import native as linear_native
from pallas_kernels.linear import reference as linear_reference
from pallas_kernels.sparse_ffn import native as ffn_native
from pallas_kernels.topk_attention import native as attention_native
from sparse_jax.model import products

needs_native = pytest.mark.skipif(not base.NATIVE, reason="native kernels not built")

# Relative to the largest |term| of each output: float32 sums of up to a few thousand terms
# (in any order, with or without FMA) stay well within 1e-5 of it.
F32_REL = 1e-5


def _assert_matches(actual, expected64, scale64):
    actual = np.asarray(actual, np.float64)
    bound = F32_REL * np.maximum(scale64, 1e-30) + 1e-30
    assert actual.shape == expected64.shape
    assert np.all(np.abs(actual - expected64) <= bound), np.max(np.abs(actual - expected64) / bound)


def _as_stored(w, dtype):
    """The weight as stored in ``dtype`` and its exact float64 value."""
    stored = jnp.asarray(w, jnp.float32).astype(dtype)
    return stored, np.asarray(stored.astype(jnp.float32), np.float64)


def _linear_oracle(x, w64):
    x64 = np.asarray(x, np.float64)
    return x64 @ w64.T, np.abs(x64) @ np.abs(w64).T


# (rows, in, out): vector-width tails (in % 16), output tails (out % 4), row tails (rows % 4).
LINEAR_SHAPES = ((1, 37, 5), (2, 16, 4), (3, 64, 9), (4, 33, 130), (7, 2304, 66), (16, 100, 3))


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_linear_matches_the_float64_product_on_every_isa(dtype):
    gen = base.rng(0)
    for rows, width, out in LINEAR_SHAPES:
        x = gen.standard_normal((rows, width)).astype(np.float32)
        w, w64 = _as_stored(gen.standard_normal((out, width)), dtype)
        want, scale = _linear_oracle(x, w64)
        for isa in _native.supported_isas():
            with base.using_isa(isa):
                got = jax.block_until_ready(jax.jit(linear_native.linear)(jnp.asarray(x), w))
            _assert_matches(got, want, scale)


@needs_native
def test_linear_degenerate_inputs():
    gen = base.rng(1)
    w = jnp.asarray(gen.standard_normal((6, 20)), jnp.float32)
    run = jax.jit(linear_native.linear)
    # A zero input vector and a zero weight give exact zeros.
    np.testing.assert_array_equal(run(jnp.zeros((2, 20)), w), np.zeros((2, 6)))
    np.testing.assert_array_equal(run(jnp.ones((1, 20)), jnp.zeros((6, 20))), np.zeros((1, 6)))
    # Empty axes: no rows, no outputs, no inputs (a sum of nothing is 0).
    assert run(jnp.zeros((0, 20)), w).shape == (0, 6)
    assert run(jnp.ones((3, 20)), jnp.zeros((0, 20))).shape == (3, 0)
    np.testing.assert_array_equal(run(jnp.ones((2, 0)), jnp.zeros((4, 0))), np.zeros((2, 4)))
    # Huge and tiny magnitudes: no overflow at 1e18 * 1e18 / 20 terms in float32 range, and
    # subnormal-scale products are not flushed in a way that changes the sign.
    for magnitude in (1e18, 1e-18):
        x = gen.standard_normal((2, 20)).astype(np.float32) * magnitude
        want, scale = _linear_oracle(x, np.asarray(w, np.float64))
        _assert_matches(run(jnp.asarray(x), w), want, scale)
    # Equal inputs in every row give equal outputs in every row.
    same = run(jnp.ones((5, 20)), w)
    np.testing.assert_array_equal(same, np.broadcast_to(same[0], same.shape))


@needs_native
def test_linear_under_vmap_jit_and_grad():
    gen = base.rng(2)
    x = jnp.asarray(gen.standard_normal((3, 2, 24)), jnp.float32)
    w = jnp.asarray(gen.standard_normal((10, 24)), jnp.float32)
    mapped = jax.jit(jax.vmap(linear_native.linear, in_axes=(0, None)))(x, w)
    base.assert_close(mapped, linear_reference.linear(x, w), jnp.float32)
    # Leading axes are rows: [3, 2, 24] at once equals the mapped result bit for bit.
    np.testing.assert_array_equal(mapped, jax.jit(linear_native.linear)(x, w))

    def loss(fn, x_, w_):
        return jnp.sum(jnp.sin(fn(x_, w_)))

    got = jax.jit(jax.grad(lambda a, b: loss(linear_native.linear, a, b), argnums=(0, 1)))(x, w)
    want = jax.grad(lambda a, b: loss(linear_reference.linear, a, b), argnums=(0, 1))(x, w)
    for g, e in zip(got, want, strict=True):
        base.assert_close(g, e, jnp.float32)


@needs_native
def test_linear_is_deterministic_and_matches_the_models_xla_products():
    gen = base.rng(3)
    x = jnp.asarray(gen.standard_normal((4, 2304)), jnp.float32)
    w = jnp.asarray(gen.standard_normal((2304, 2304)), jnp.bfloat16)  # split over threads
    first = jax.jit(linear_native.linear)(x, w)
    for _ in range(3):
        np.testing.assert_array_equal(jax.jit(linear_native.linear)(x, w), first)
    want, scale = _linear_oracle(x, np.asarray(w.astype(jnp.float32), np.float64))
    _assert_matches(first, want, scale)
    # The model's own products: native where the policy says so, XLA's forms otherwise.
    for native in (True, False):
        got = jax.jit(lambda a, b, n=native: products.linear(a, b, native=n))(x, w)
        _assert_matches(got, want, scale)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        linear_native.linear(x, w.astype(jnp.float16))
    with pytest.raises(ValueError, match="with one I"):
        linear_native.linear(x, w[:, :10])


def _ffn_oracle(h, idx, x_rest, k2_64, v64):
    h64, x64 = np.asarray(h, np.float64), np.asarray(x_rest, np.float64)
    idx = np.asarray(idx)
    value = np.einsum("bad,bd->ba", k2_64[idx], x64)
    terms = np.abs(h64 * value)[..., None] * np.abs(v64[idx])
    coef_scale = np.einsum("bad,bd->ba", np.abs(k2_64[idx]), np.abs(x64)) * np.abs(h64)
    scale = terms.sum(axis=1) + (coef_scale[..., None] * np.abs(v64[idx])).sum(axis=1)
    return np.einsum("ba,bad->bd", h64 * value, v64[idx]), scale


def _ffn_case(gen, batch, slots, rows, rest, width, dtype):
    h = gen.standard_normal((batch, slots)).astype(np.float32)
    idx = gen.integers(0, rows, (batch, slots)).astype(np.int32)
    x_rest = gen.standard_normal((batch, rest)).astype(np.float32)
    k2, k2_64 = _as_stored(gen.standard_normal((rows, rest)), dtype)
    v, v64 = _as_stored(gen.standard_normal((rows, width)), dtype)
    return (h, idx, x_rest, k2, v), (k2_64, v64)


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_sparse_ffn_matches_the_float64_formula_on_every_isa(dtype):
    gen = base.rng(4)
    # Widths off the 16-lane vectors and the 128-column blocks; batch 1 and 8.
    for shape in (
        (1, 5, 30, 19, 33),
        (8, 40, 300, 64, 200),
        (2, 1, 3, 1, 1),
        (1, 300, 90, 129, 257),
    ):
        (h, idx, x_rest, k2, v), (k2_64, v64) = _ffn_case(gen, *shape, dtype)
        want, scale = _ffn_oracle(h, idx, x_rest, k2_64, v64)
        for isa in _native.supported_isas():
            with base.using_isa(isa):
                got = jax.block_until_ready(jax.jit(ffn_native.sparse_ffn)(h, idx, x_rest, k2, v))
            _assert_matches(got, want, scale)


@needs_native
def test_sparse_ffn_degenerate_selections():
    gen = base.rng(5)
    (h, idx, x_rest, k2, v), (k2_64, v64) = _ffn_case(gen, 3, 6, 20, 8, 24, jnp.float32)
    run = jax.jit(ffn_native.sparse_ffn)
    # No slots, and only padding slots (h = 0): zeros, whatever the indices.
    np.testing.assert_array_equal(
        run(h[:, :0], idx[:, :0], x_rest, k2, v), np.zeros((3, 24), np.float32)
    )
    np.testing.assert_array_equal(run(np.zeros_like(h), idx, x_rest, k2, v), np.zeros((3, 24)))
    # A zero input vector gives zeros; the same neuron twice counts twice.
    np.testing.assert_array_equal(run(h, idx, np.zeros_like(x_rest), k2, v), np.zeros((3, 24)))
    twice = np.repeat(idx[:, :1], 2, axis=1)
    once = run(h[:, :1] * 2, idx[:, :1], x_rest, k2, v)
    np.testing.assert_allclose(run(np.repeat(h[:, :1], 2, axis=1), twice, x_rest, k2, v), once,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    # Out-of-range indices read the edge rows (clamped), never outside the tables.
    wild = np.array([[-5, 99, 19, 0, 1, 2]] * 3, np.int32)
    clamped = np.clip(wild, 0, 19)
    np.testing.assert_array_equal(run(h, wild, x_rest, k2, v), run(h, clamped, x_rest, k2, v))
    # Huge and tiny activations: the float64 result, where it is in float32 range.
    for magnitude in (1e15, 1e-15):
        scaled = h * np.float32(magnitude)
        want, scale = _ffn_oracle(scaled, idx, x_rest, k2_64, v64)
        _assert_matches(run(scaled, idx, x_rest, k2, v), want, scale)


@needs_native
def test_sparse_ffn_under_vmap_and_mismatched_dtypes():
    gen = base.rng(6)
    (h, idx, x_rest, k2, v), _ = _ffn_case(gen, 2, 7, 40, 12, 20, jnp.float32)
    stack = [np.stack([a, a[::-1]]) for a in (h, idx, x_rest)]
    mapped = jax.jit(jax.vmap(ffn_native.sparse_ffn, in_axes=(0, 0, 0, None, None)))(*stack, k2, v)
    for i in range(2):
        one = jax.jit(ffn_native.sparse_ffn)(*(a[i] for a in stack), k2, v)
        np.testing.assert_array_equal(mapped[i], one)
    with pytest.raises(ValueError, match="one dtype"):
        ffn_native.sparse_ffn(h, idx, x_rest, k2, v.astype(jnp.bfloat16))


def _block_oracle(act, x_rest, k2_64, v64):
    """float64 y [M, D] of the block form and its rounding scale (sums of |terms|)."""
    a64, x64 = np.asarray(act, np.float64), np.asarray(x_rest, np.float64)
    coef = a64 * (x64 @ k2_64.T)
    coef_scale = np.abs(a64) * (np.abs(x64) @ np.abs(k2_64).T)
    return coef @ v64, (np.abs(coef) + coef_scale) @ np.abs(v64)


def _block_case(gen, tokens, neurons, rest, width, dtype, active=0.1):
    act = gen.standard_normal((tokens, neurons)).astype(np.float32)
    act *= gen.random((tokens, neurons)) < active
    x_rest = gen.standard_normal((tokens, rest)).astype(np.float32)
    k2, k2_64 = _as_stored(gen.standard_normal((neurons, rest)), dtype)
    v, v64 = _as_stored(gen.standard_normal((neurons, width)), dtype)
    return (act, x_rest, k2, v), (k2_64, v64)


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_sparse_ffn_block_matches_the_float64_formula_on_every_isa(dtype):
    gen = base.rng(12)
    # Several neuron chunks (128) and column slices (32, with a partial last one), widths off
    # the vectors; one token; every neuron active; very sparse.
    for shape, active in (
        ((37, 300, 19, 70), 0.1),
        ((1, 129, 33, 32), 0.5),
        ((9, 40, 16, 100), 1.0),
        ((64, 500, 64, 257), 0.02),
    ):
        (act, x_rest, k2, v), (k2_64, v64) = _block_case(gen, *shape, dtype, active)
        want, scale = _block_oracle(act, x_rest, k2_64, v64)
        for isa in _native.supported_isas():
            with base.using_isa(isa):
                # Finished inside the block: dispatch is asynchronous, the ISA is global.
                got, again = jax.block_until_ready(
                    [jax.jit(ffn_native.sparse_ffn_block)(act, x_rest, k2, v) for _ in range(2)]
                )
            _assert_matches(got, want, scale)
            np.testing.assert_array_equal(got, again)  # the same bits run to run


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_a_token_gets_the_same_bits_in_any_block(dtype):
    # Up to 16 tokens take one pass per block of neurons, more the column-sliced path: a
    # token's output is the same, bit for bit, alone, among 5, 16, 17 and 40 tokens, on every
    # instruction set. Over several 512-neuron blocks (one of them empty for some tokens) and
    # widths off the slices.
    gen = base.rng(16)
    for neurons, rest, width in ((1100, 19, 70), (600, 33, 257), (130, 8, 8)):
        (act, x_rest, k2, v), _ = _block_case(gen, 40, neurons, rest, width, dtype, 0.05)
        act[3, 512:1024] = 0.0
        run = jax.jit(ffn_native.sparse_ffn_block)
        for isa in _native.supported_isas():
            with base.using_isa(isa):
                many = np.asarray(run(act, x_rest, k2, v))
                few = {n: np.asarray(run(act[:n], x_rest[:n], k2, v)) for n in (5, 16, 17)}
                alone = [np.asarray(run(act[i : i + 1], x_rest[i : i + 1], k2, v)) for i in (0, 3)]
            for n, got in few.items():
                np.testing.assert_array_equal(got, many[:n])
            np.testing.assert_array_equal(alone[0][0], many[0])
            np.testing.assert_array_equal(alone[1][0], many[3])


@needs_native
def test_sparse_ffn_block_degenerate_inputs_and_the_model_product():
    gen = base.rng(13)
    (act, x_rest, k2, v), (k2_64, v64) = _block_case(gen, 6, 150, 12, 40, jnp.float32)
    run = jax.jit(ffn_native.sparse_ffn_block)
    # No active neuron, a zero input, no tokens, no neurons: zeros of the right shapes.
    np.testing.assert_array_equal(run(np.zeros_like(act), x_rest, k2, v), np.zeros((6, 40)))
    np.testing.assert_array_equal(run(act, np.zeros_like(x_rest), k2, v), np.zeros((6, 40)))
    for a, x in ((np.zeros_like(act[:1]), x_rest[:1]), (act[:1], np.zeros_like(x_rest[:1]))):
        np.testing.assert_array_equal(run(a, x, k2, v), np.zeros((1, 40)))  # one token
    assert run(act[:0], x_rest[:0], k2, v).shape == (0, 40)
    np.testing.assert_array_equal(
        run(act[:, :0], x_rest, k2[:0], v[:0]), np.zeros((6, 40), np.float32)
    )
    # Huge and tiny activations: the float64 result where it is in float32 range.
    for magnitude in (1e15, 1e-15):
        scaled = act * np.float32(magnitude)
        want, scale = _block_oracle(scaled, x_rest, k2_64, v64)
        _assert_matches(run(scaled, x_rest, k2, v), want, scale)
        _assert_matches(run(scaled[:1], x_rest[:1], k2, v), want[:1], scale[:1])  # one token
    # The masked form's product (XLA) over the same activations, within float32 reordering.
    masked = (act * (x_rest @ np.asarray(k2).T)) @ np.asarray(v)
    np.testing.assert_allclose(run(act, x_rest, k2, v), masked, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="one dtype"):
        ffn_native.sparse_ffn_block(act, x_rest, k2, v.astype(jnp.bfloat16))


def _spark_block_oracle(pre, keep_count):
    """float64 activations gelu(max(pre - theta, 0)) of the statistical soft threshold, theta
    = min(mean + z std, max) per token, and the smallest |pre - theta| of a token."""
    p64 = np.asarray(pre, np.float64)
    z = ndtri(1.0 - keep_count / p64.shape[-1])
    theta = np.minimum(p64.mean(-1) + z * p64.std(-1), p64.max(-1))[:, None]
    u = np.maximum(p64 - theta, 0.0)
    act = 0.5 * u * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u**3)))
    return act, np.min(np.abs(p64 - theta))


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_spark_ffn_block_thresholds_in_the_kernel_like_the_float64_method(dtype):
    # The fused form: the statistical soft threshold and the gelu per token in the kernel, then
    # the block product; against float64 over every instruction set, and against the act form.
    gen = base.rng(14)
    for tokens, neurons, rest, width, keep in ((37, 300, 19, 70, 24), (1, 129, 33, 32, 10)):
        (_, x_rest, k2, v), (k2_64, v64) = _block_case(gen, tokens, neurons, rest, width, dtype)
        pre = (gen.standard_normal((tokens, neurons)) * 2 + 1).astype(np.float32)
        act, margin = _spark_block_oracle(pre, keep)
        assert margin > 1e-5  # no neuron at theta within float32 rounding
        want, scale = _block_oracle(act, x_rest, k2_64, v64)
        run = jax.jit(functools.partial(ffn_native.spark_ffn_block, keep_count=keep))
        for isa in _native.supported_isas():
            with base.using_isa(isa):
                (got, active), (again, _) = jax.block_until_ready(
                    [run(pre, x_rest, k2, v) for _ in range(2)]
                )
            _assert_matches(got, want, scale)
            np.testing.assert_array_equal(got, again)
            np.testing.assert_array_equal(active, (act > 0).sum(-1))
        by_act = jax.jit(ffn_native.sparse_ffn_block)(act.astype(np.float32), x_rest, k2, v)
        np.testing.assert_allclose(got, by_act, rtol=1e-5, atol=1e-5 * np.abs(by_act).max())


@needs_native
def test_spark_ffn_block_degenerate_inputs():
    gen = base.rng(15)
    (_, x_rest, k2, v), (k2_64, v64) = _block_case(gen, 5, 150, 12, 40, jnp.float32)
    run = jax.jit(functools.partial(ffn_native.spark_ffn_block, keep_count=12))
    # Equal pre-activations (a zero row, a constant row): theta is the row's value, nothing is
    # above it, y is 0. No tokens: empty outputs.
    for value in (0.0, 3.0):
        y, active = run(np.full((5, 150), value, np.float32), x_rest, k2, v)
        np.testing.assert_array_equal(y, np.zeros((5, 40)))
        np.testing.assert_array_equal(active, np.zeros(5))
        y, active = run(np.full((1, 150), value, np.float32), x_rest[:1], k2, v)  # one token
        np.testing.assert_array_equal(y, np.zeros((1, 40)))
        np.testing.assert_array_equal(active, np.zeros(1))
    y, active = run(np.zeros((0, 150), np.float32), x_rest[:0], k2, v)
    assert y.shape == (0, 40) and active.shape == (0,)
    # Huge and tiny pre-activations (the squared deviations of 1e-30 underflow in float32:
    # the kernel sums them in float64): the float64 result where it is in float32 range.
    for magnitude in (1e15, 1e-30):
        pre = (gen.standard_normal((5, 150)) * magnitude).astype(np.float32)
        act, _ = _spark_block_oracle(pre, 12)
        want, scale = _block_oracle(act, x_rest, k2_64, v64)
        y, active = run(pre, x_rest, k2, v)
        _assert_matches(y, want, scale)
        np.testing.assert_array_equal(active, (act > 0).sum(-1))
        for i in range(5):  # one token alone (its own path): the same bits
            np.testing.assert_array_equal(run(pre[i : i + 1], x_rest[i : i + 1], k2, v)[0][0], y[i])
    for keep in (0, 150):
        with pytest.raises(ValueError, match="keep_count"):
            ffn_native.spark_ffn_block(
                np.zeros((5, 150), np.float32), x_rest, k2, v, keep_count=keep
            )


def _attention_case(gen, batch, heads, kv_heads, seq, slots, rest, width, dtype):
    q = gen.standard_normal((batch, heads, rest)).astype(np.float32)
    p = gen.random((batch, heads, slots)).astype(np.float32)
    idx = gen.integers(0, seq, (batch, heads, slots)).astype(np.int32)
    k, k64 = _as_stored(gen.standard_normal((batch, kv_heads, seq, rest)), dtype)
    v, v64 = _as_stored(gen.standard_normal((batch, kv_heads, seq, width)), dtype)
    return (q, p, idx, k, v), (k64, v64)


def _attention_oracle(q, p, idx, k64, v64):
    """float64 result and the sum of |terms| (the scale of float32 rounding) per output."""
    batch, heads, _ = q.shape
    group = heads // k64.shape[1]
    out = np.zeros((batch, heads, v64.shape[-1]))
    scale = np.zeros_like(out)
    for b in range(batch):
        for n in range(heads):
            k_sel, v_sel = k64[b, n // group, idx[b, n]], v64[b, n // group, idx[b, n]]
            dot = k_sel @ np.asarray(q[b, n], np.float64)
            weight = np.asarray(p[b, n], np.float64) * np.logaddexp(dot, 0.0)
            out[b, n] = weight @ v_sel
            gate_scale = np.abs(k_sel) @ np.abs(np.asarray(q[b, n], np.float64))
            scale[b, n] = (np.abs(weight) + p[b, n] * gate_scale) @ np.abs(v_sel)
    return out, scale


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_topk_attention_matches_the_float64_formula_on_every_isa(dtype):
    gen = base.rng(7)
    # MHA and GQA, widths off the 16 lanes (H 40, H-R 24) and Gemma's (256, 128).
    for shape in ((1, 2, 2, 30, 5, 24, 40), (2, 8, 4, 300, 33, 128, 256), (1, 4, 1, 3, 1, 1, 1)):
        (q, p, idx, k, v), (k64, v64) = _attention_case(gen, *shape, dtype)
        want, scale = _attention_oracle(q, p, idx, k64, v64)
        for isa in _native.supported_isas():
            with base.using_isa(isa):
                got = jax.block_until_ready(
                    jax.jit(attention_native.topk_attention)(q, p, idx, k, v)
                )
            _assert_matches(got, want, scale)


@needs_native
def test_topk_attention_degenerate_selections():
    gen = base.rng(8)
    (q, p, idx, k, v), (k64, v64) = _attention_case(gen, 2, 4, 2, 20, 6, 8, 16, jnp.float32)
    run = jax.jit(attention_native.topk_attention)
    zeros = np.zeros((2, 4, 16), np.float32)
    # No slots, and only padding slots (p = 0): zeros.
    np.testing.assert_array_equal(run(q, p[..., :0], idx[..., :0], k, v), zeros)
    np.testing.assert_array_equal(run(q, np.zeros_like(p), idx, k, v), zeros)
    # A zero query gates every key by softplus(0) = log 2.
    want, scale = _attention_oracle(np.zeros_like(q), p, idx, k64, v64)
    _assert_matches(run(np.zeros_like(q), p, idx, k, v), want, scale)
    # Huge gate logits (softplus(x) = x, no overflow) and huge negative ones (gate -> 0).
    for magnitude in (1e4, -1e4):
        big = q * np.float32(magnitude)
        want, scale = _attention_oracle(big, p, idx, k64, v64)
        got = run(big, p, idx, k, v)
        assert np.all(np.isfinite(np.asarray(got)))
        _assert_matches(got, want, scale)
    # Out-of-range slots read the edge slots (clamped), never outside the cache.
    wild = idx.copy()
    wild[:, :, 0], wild[:, :, 1] = -3, 50
    np.testing.assert_array_equal(run(q, p, wild, k, v), run(q, p, np.clip(wild, 0, 19), k, v))
    # Mapped over a leading axis: each slice as computed alone.
    stack = [np.stack([a, a[::-1]]) for a in (q, p, idx, np.asarray(k), np.asarray(v))]
    mapped = jax.jit(jax.vmap(attention_native.topk_attention))(*stack)
    for i in range(2):
        np.testing.assert_array_equal(mapped[i], run(*(a[i] for a in stack)))
    with pytest.raises(ValueError, match="one dtype"):
        attention_native.topk_attention(q, p, idx, k, jnp.asarray(v, jnp.bfloat16))


def test_a_missing_library_falls_back_under_auto_and_fails_when_asked_for(
    monkeypatch, tmp_path, caplog
):
    state = (_native._library, _native._reason, _native._loaded)
    monkeypatch.setattr(build, "library_path", lambda: tmp_path / "libsparse_jax_cpu-x.so")
    monkeypatch.setattr(_native, "_loaded", False)
    _native.warn_unavailable.cache_clear()
    try:
        assert not _native.available()
        assert "python -m pallas_kernels._native" in _native.unavailable_reason()
        if jax.default_backend() == "cpu":
            with caplog.at_level(logging.WARNING, logger="pallas_kernels._native"):
                assert dispatch.resolve_implementation("auto", False) == "xla"
                assert dispatch.resolve_implementation("auto", False) == "xla"
            warnings = [r for r in caplog.records if "running XLA's kernels" in r.message]
            assert len(warnings) == 1  # one line, once per process
        with pytest.raises(ImplementationUnavailableError, match="not built"):
            dispatch.resolve_implementation("native", False)
    finally:
        _native._library, _native._reason, _native._loaded = state
        _native.warn_unavailable.cache_clear()


def test_the_build_without_a_compiler_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)
    with pytest.raises(build.BuildError, match=r"no C\+\+ compiler found .*apt install g\+\+"):
        build.build(force=True)
    assert build.main() == 1  # setup goes on: the CPU path then runs XLA's kernels
    assert list(tmp_path.iterdir()) == []


@needs_native
def test_the_library_is_named_by_its_sources_and_the_isa_can_be_chosen():
    assert build.library_path().exists()
    assert build.build() == build.library_path()  # up to date: a no-op
    assert _native.isa() == _native.supported_isas()[-1]  # the widest by default
    with pytest.raises(ValueError, match="isa must be one of"):
        _native.use_isa("sse9")
    with base.using_isa("generic"):
        assert _native.isa() == "generic"
    assert _native.isa() == _native.supported_isas()[-1]
