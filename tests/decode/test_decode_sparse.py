"""The sparse gather path equals the masked path: logits, greedy tokens, overflow fallback."""

import dataclasses

import jax
import numpy as np
import pytest
from decode_cases import BASE, MASKED, VARIANTS, T
from tolerances import F32_VS_F64

from pallas_kernels import _native
from pallas_kernels.sparse_ffn.xla import sparse_ffn as sparse_ffn_gathered
from pallas_kernels.topk_attention.xla import topk_attention as topk_attention_gathered
from sparse_jax.decode.cache import init_cache
from sparse_jax.decode.generate import generate
from sparse_jax.decode.step import DecodeOptions, decode_params, decode_step, ffn_mode, prefill
from sparse_jax.model.selection import capacity, compact, sparse_ffn_union, union_capacity
from sparse_jax.model.transformer import init_params

PROMPT = 8


def _decode_all(cfg, dparams, tokens, options):
    """Prefill (masked) then teacher-forced decode steps: logits [B, steps, V], stats."""
    cache = init_cache(cfg, tokens.shape[0], T)
    _, cache, _ = prefill(cfg, dparams, cache, tokens[:, :PROMPT], None, MASKED)
    logits, overflow = [], 0
    for t in range(PROMPT, T):
        out, cache, stats = decode_step(cfg, dparams, cache, tokens[:, t], options)
        logits.append(out)
        overflow += np.asarray(stats["attn_overflow"]) + np.asarray(stats["ffn_overflow"])
    return np.stack(logits, axis=1), overflow


def _model(name, batch, seed=0):
    cfg = VARIANTS[name]
    params = decode_params(cfg, init_params(cfg, jax.random.key(seed)))
    tokens = np.asarray(jax.random.randint(jax.random.key(seed + 7), (batch, T), 0, 97))
    return cfg, params, tokens


@pytest.mark.parametrize(
    ("name", "batch", "batch_modes"),
    [("mixed", 1, ("auto",)), ("spark", 2, ("per_token", "union"))],
)
def test_sparse_logits_equal_masked_logits(name, batch, batch_modes):
    cfg, params, tokens = _model(name, batch)
    want, _ = _decode_all(cfg, params, tokens, MASKED)
    for batch_mode in batch_modes:
        sparse = DecodeOptions("sparse", batch_mode=batch_mode, prefill_chunk=4)
        got, overflow = _decode_all(cfg, params, tokens, sparse)
        np.testing.assert_allclose(got, want, **F32_VS_F64)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        assert overflow.sum() == 0


def test_capacity_overflow_falls_back_to_the_masked_result_and_is_counted():
    cfg, params, tokens = _model("spark", 2)
    want, _ = _decode_all(cfg, params, tokens, MASKED)
    tight = DecodeOptions(
        "sparse", ffn_capacity=1, attn_capacity=1, prefill_chunk=4, implementation="xla"
    )
    got, overflow = _decode_all(cfg, params, tokens, tight)
    np.testing.assert_allclose(got, want, **F32_VS_F64)
    # Every sparse layer overflows at every step: attention and FFN of each layer.
    assert overflow.tolist() == [2 * (T - PROMPT)] * cfg.num_layers


@pytest.mark.skipif(not _native.available(), reason="native kernels not built")
def test_the_native_attention_has_no_capacity_to_overflow():
    cfg, params, tokens = _model("spark", 2)
    want, _ = _decode_all(cfg, params, tokens, MASKED)
    for batch_mode, overflows in (("per_token", T - PROMPT), ("auto", 0)):
        tight = DecodeOptions(
            "sparse",
            batch_mode=batch_mode,
            ffn_capacity=1,
            attn_capacity=1,
            prefill_chunk=4,
            implementation="native",
        )
        got, overflow = _decode_all(cfg, params, tokens, tight)
        np.testing.assert_allclose(got, want, **F32_VS_F64)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        # The per-token FFN overflows its capacity of one neuron at every step; "auto" takes
        # the block FFN, which has no capacity; attention gathers every kept key either way.
        assert overflow.tolist() == [overflows] * cfg.num_layers, batch_mode


def test_greedy_generations_are_identical_on_both_paths():
    cfg, params, tokens = _model("spark", 2, seed=2)
    prompts = [tokens[0, :PROMPT].tolist(), tokens[1, :4].tolist()]
    sparse = DecodeOptions("sparse", batch_mode="per_token", prefill_chunk=4)
    options = {"sparse": sparse, "masked": MASKED}
    runs = {
        path: generate(cfg, params, prompts, max_new_tokens=T - PROMPT + 1, options=opts)
        for path, opts in options.items()
    }
    assert runs["sparse"].tokens == runs["masked"].tokens
    assert runs["sparse"].stats["attn_overflow"].sum() == 0


def test_compact_lists_kept_indices_in_order():
    keep = np.random.default_rng(0).random((4, 5, 40)) < 0.3
    idx, count = jax.jit(compact, static_argnums=1)(keep, 24)
    rows, counts = np.asarray(idx).reshape(-1, 24), np.asarray(count).ravel()
    for row, n, k in zip(rows, counts, keep.reshape(-1, 40), strict=True):
        want = np.flatnonzero(k)
        assert n == want.size
        np.testing.assert_array_equal(row[: min(n, 24)], want[:24])
        assert (row[n:] == 0).all()


def test_capacity_grows_with_the_error_bound_and_is_clipped():
    assert capacity(1106, 13824, 2.0) == 1312
    assert capacity(256, 32768, 2.0) == 360
    assert capacity(256, 200, 2.0) == 200
    assert capacity(10, 96, 0.0) == 16
    assert union_capacity(1106, 13824, 8, 2.0) > 13824 * (1 - 0.92**8)
    assert union_capacity(1106, 13824, 64, 2.0) == 13824


def test_gathered_ffn_equals_the_dense_masked_product():
    f, d, r, a, b = 64, 24, 10, 32, 3
    rng = np.random.default_rng(3)
    k2, v = rng.normal(size=(f, d - r)), rng.normal(size=(f, d))
    x_rest = rng.normal(size=(b, d - r))
    act = np.where(rng.random((b, f)) < 0.15, rng.random((b, f)) + 0.1, 0.0)
    want = ((x_rest @ k2.T) * act) @ v
    k2, v, x_rest = (np.float32(t) for t in (k2, v, x_rest))
    idx = np.zeros((b, a), np.int32)
    h = np.zeros((b, a), np.float32)
    for row in range(b):
        on = np.flatnonzero(act[row])
        idx[row, : on.size], h[row, : on.size] = on, act[row, on]
    got = jax.jit(sparse_ffn_gathered)(h, idx, x_rest, k2, v)
    np.testing.assert_allclose(got, want, **F32_VS_F64)
    union = np.flatnonzero(act.any(0)).astype(np.int32)
    got = jax.jit(sparse_ffn_union)(np.float32(act[:, union]), union, x_rest, k2, v)
    np.testing.assert_allclose(got, want, **F32_VS_F64)


def test_gathered_attention_equals_a_loop_over_heads():
    b, kv, g, s, h, r, a = 2, 2, 3, 9, 8, 3, 4
    rng = np.random.default_rng(4)
    q_rest = rng.normal(size=(b, kv * g, h - r)).astype(np.float32)
    k_rest = rng.normal(size=(b, kv, s, h - r)).astype(np.float32)
    v = rng.normal(size=(b, kv, s, h)).astype(np.float32)
    idx = rng.integers(0, s, (b, kv * g, a)).astype(np.int32)
    p = rng.random((b, kv * g, a)).astype(np.float32)
    got = np.asarray(jax.jit(topk_attention_gathered)(q_rest, p, idx, k_rest, v))
    for bi in range(b):
        for n in range(kv * g):
            rows = idx[bi, n]
            gate = np.logaddexp(0.0, k_rest[bi, n // g, rows] @ q_rest[bi, n])  # softplus
            want = (p[bi, n] * gate) @ v[bi, n // g, rows]
            np.testing.assert_allclose(got[bi, n], want, **F32_VS_F64)


def test_auto_mode_gathers_at_batch_one_and_streams_large_batches():
    cfg = dataclasses.replace(BASE, ffn_dim=13824, model_dim=2304, ffn_predictor_dim=1024)
    caps = (capacity(1106, 13824, 2.0), union_capacity(1106, 13824, 64, 2.0))
    assert ffn_mode(cfg, 1, "auto", caps, "auto") == "per_token"
    assert ffn_mode(cfg, 64, "auto", caps, "auto") == "masked"
    assert ffn_mode(cfg, 64, "sparse", caps, "auto") != "masked"
    assert ffn_mode(cfg, 1, "masked", caps, "auto") == "masked"
    # The native kernel gathers rows at streaming cost: 8 tokens x 1312 rows < 13824.
    caps8 = (1312, 7240)
    assert ffn_mode(cfg, 8, "auto", caps8, "auto") == "masked"
    # ... and then runs the block kernel (each active neuron's rows once for the batch).
    assert ffn_mode(cfg, 8, "auto", caps8, "auto", native=True) == "block"
    assert ffn_mode(cfg, 1, "auto", caps, "auto", native=True) == "block"
    assert ffn_mode(cfg, 8, "auto", caps8, "per_token", native=True) == "per_token"
    assert ffn_mode(cfg, 16, "auto", (1312, 10808), "auto", native=True) == "masked"
