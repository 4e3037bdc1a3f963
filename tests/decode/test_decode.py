"""KV-cached decoding (masked path) against the uncached forward; cache, layout and errors."""

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_cases import BASE, CACHED, MASKED, VARIANTS, T, full_forward

from pallas_kernels import _native
from pallas_kernels.sparse_ffn import native as ffn_native
from sparse_jax.decode import step
from sparse_jax.decode.cache import init_cache
from sparse_jax.decode.step import (
    DecodeOptions,
    decode_params,
    decode_step,
    decode_step_jit,
    prefill,
)
from sparse_jax.model import attention as A
from sparse_jax.model import attention_native
from sparse_jax.model.transformer import abstract_params, init_params, unstack_layers
from sparse_jax.model.weights import random_params


def _setup(name, seed=0, b=2):
    cfg = VARIANTS[name]
    params = init_params(cfg, jax.random.key(seed))
    tokens = np.asarray(jax.random.randint(jax.random.key(seed + 1), (b, T), 0, cfg.vocab_size))
    return cfg, params, tokens


def _cached_logits(cfg, dparams, tokens, prompt_len, options):
    """Logits at positions prompt_len-1 .. T-2 from prefill then one decode step per token."""
    b = tokens.shape[0]
    cache = init_cache(cfg, b, T)
    logits, cache, _ = prefill(cfg, dparams, cache, tokens[:, :prompt_len], None, options)
    out = [logits]
    for t in range(prompt_len, T - 1):
        logits, cache, _ = decode_step(cfg, dparams, cache, tokens[:, t], options)
        out.append(logits)
    return np.stack(out, axis=1)


# "mixed" also decodes in test_native_kernels_decode_like_xla (default run).
@pytest.mark.parametrize("name", ["spark", "dense", pytest.param("mixed", marks=pytest.mark.slow)])
def test_cached_decode_equals_uncached_forward_past_the_window(name):
    cfg, params, tokens = _setup(name)
    want, _ = full_forward(cfg, params, jnp.asarray(tokens))
    got = _cached_logits(cfg, decode_params(cfg, params), tokens, 8, MASKED)
    np.testing.assert_allclose(got, np.asarray(want)[:, 7 : T - 1], **CACHED)


@pytest.mark.parametrize(
    ("name", "batch", "options"),
    [
        ("spark", 1, DecodeOptions("sparse", prefill_chunk=4)),
        ("spark", 8, DecodeOptions("sparse", batch_mode="union", prefill_chunk=4)),
        pytest.param(
            "spark",
            8,
            DecodeOptions("sparse", batch_mode="per_token", prefill_chunk=4),
            marks=pytest.mark.slow,
        ),
        pytest.param("dense", 8, MASKED, marks=pytest.mark.slow),
        # Capacity 1 overflows every FFN selection (and, on XLA's path, every attention one):
        # each such step takes the masked fallback.
        ("spark", 8, DecodeOptions("sparse", ffn_capacity=1, attn_capacity=1, prefill_chunk=4)),
    ],
    ids=["spark-b1-sparse", "spark-b8-union", "spark-b8-per-token", "dense-b8", "overflow-b8"],
)
def test_decode_steps_equal_the_full_forward(name, batch, options):
    cfg, params, tokens = _setup(name, seed=9, b=batch)
    want, _ = full_forward(cfg, params, jnp.asarray(tokens))
    got = _cached_logits(cfg, decode_params(cfg, params), tokens, 8, options)
    np.testing.assert_allclose(got, np.asarray(want)[:, 7 : T - 1], **CACHED)


def test_prefill_chunk_size_does_not_change_logits():
    cfg, params, tokens = _setup("spark", seed=2)
    dparams = decode_params(cfg, params)
    whole, _, _ = prefill(cfg, dparams, init_cache(cfg, 2, T), tokens, None, MASKED)
    chunked, _, _ = prefill(
        cfg, dparams, init_cache(cfg, 2, T), tokens, None, DecodeOptions("masked", prefill_chunk=T)
    )
    np.testing.assert_allclose(chunked, whole, **CACHED)


def test_only_the_last_prefill_chunk_computes_logits():
    # The chunked prefill's logits are the whole prefill's (above); the program of an earlier
    # chunk returns none, and XLA drops the unembedding from it: its FLOPs fall by at least
    # the [B, D] x [D, V] product.
    cfg, params, tokens = _setup("spark", seed=2)
    dparams = decode_params(cfg, params)
    cache = init_cache(cfg, 2, T)
    pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    args = (cfg, MASKED, dparams, dparams["embedder"]["embedding"], cache, tokens[:, :8], pos)
    flops = {}
    for last in (True, False):
        compiled = step._prefill_chunk.lower(*args, last=last).compile()
        flops[last] = compiled.cost_analysis()["flops"]
    assert flops[True] - flops[False] >= 2 * 2 * cfg.model_dim * cfg.vocab_size
    logits, _, _ = step._prefill_chunk(*args, last=False)
    assert logits is None


def test_left_padded_rows_equal_rows_prefilled_alone():
    cfg, params, tokens = _setup("spark", seed=3)
    dparams = decode_params(cfg, params)
    lengths = np.array([8, 4])
    cache = init_cache(cfg, 2, T)
    logits, cache, _ = prefill(cfg, dparams, cache, tokens[:, :8], lengths, MASKED)
    logits2, _, _ = decode_step(cfg, dparams, cache, tokens[:, 0], MASKED)
    for row, n in enumerate(lengths):
        alone = init_cache(cfg, 1, T)
        want, alone, _ = prefill(
            cfg, dparams, alone, tokens[row : row + 1, 8 - n : 8], None, MASKED
        )
        want2, _, _ = decode_step(cfg, dparams, alone, tokens[row : row + 1, 0], MASKED)
        np.testing.assert_allclose(logits[row], want[0], **CACHED)
        np.testing.assert_allclose(logits2[row], want2[0], **CACHED)


def _shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def test_decode_params_of_scanned_and_unscanned_params_agree():
    cfg, params, _ = _setup("spark")
    scanned = decode_params(cfg, params)
    unscanned = decode_params(cfg, unstack_layers(params, cfg.num_layers))
    jax.tree.map(np.testing.assert_array_equal, scanned, unscanned)
    # The same weights, one layer per entry: no re-layout.
    unstacked_cfg = dataclasses.replace(cfg, scan_layers=False)
    assert _shapes(scanned) == _shapes(abstract_params(unstacked_cfg))
    cast = decode_params(cfg, params, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(cast)} == {jnp.dtype("bfloat16")}
    assert _shapes(cast) == _shapes(
        abstract_params(dataclasses.replace(unstacked_cfg, param_dtype="bfloat16"))
    )


@pytest.mark.parametrize("name", ["spark", "dense"])
def test_random_params_have_the_model_layout_and_init_scale(name):
    cfg = dataclasses.replace(VARIANTS[name], param_dtype="bfloat16", scan_layers=False)
    params = random_params(cfg, seed=1)
    assert _shapes(params) == _shapes(abstract_params(cfg))
    # Every weight's spread matches the model's initialiser (truncated normal, or normal for
    # the embedding; norm scales are zero).
    init = init_params(cfg, jax.random.key(0))
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(init), strict=True):
        g, w = (float(jnp.std(a.astype(jnp.float32))) for a in (got, want))
        assert abs(g - w) <= 0.2 * w + 1e-9, (g, w)


def test_bfloat16_weights_match_the_forward_with_the_same_weights():
    cfg = dataclasses.replace(BASE, param_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(5))
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (1, T), 0, cfg.vocab_size))
    want, _ = full_forward(cfg, params, jnp.asarray(tokens))
    sparse = DecodeOptions("sparse", prefill_chunk=16)
    got = _cached_logits(cfg, decode_params(cfg, params), tokens, 16, sparse)
    np.testing.assert_allclose(got, np.asarray(want)[:, 15 : T - 1], rtol=1e-3, atol=1e-3)


def test_bad_input_raises_clear_errors():
    cfg, params, tokens = _setup("spark")
    dparams = decode_params(cfg, params)
    cache = init_cache(cfg, 2, T)
    with pytest.raises(ValueError, match="unstacked layers"):
        prefill(cfg, params, cache, tokens[:, :4])
    with pytest.raises(ValueError, match="out of range"):
        prefill(cfg, dparams, cache, np.full((2, 4), cfg.vocab_size))
    with pytest.raises(ValueError, match="does not fit"):
        prefill(cfg, dparams, init_cache(cfg, 2, 4), tokens[:, :8])
    with pytest.raises(ValueError, match="max_len"):
        init_cache(cfg, 2, cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="lengths"):
        prefill(cfg, dparams, cache, tokens[:, :4], np.array([0, 4]))
    for bad in (dict(path="fast"), dict(prefill_chunk=0), dict(attn_capacity=0)):
        with pytest.raises(ValueError, match="DecodeOptions"):
            DecodeOptions(**bad)
    _, cache, _ = prefill(cfg, dparams, cache, tokens, None, MASKED)
    with pytest.raises(ValueError, match="full"):
        decode_step(cfg, dparams, cache, tokens[:, 0], MASKED)
    with pytest.raises(ValueError, match="tokens must be"):
        decode_step(cfg, dparams, cache, tokens[:, :2], MASKED)


@pytest.mark.skipif(not _native.available(), reason="native kernels not built")
@pytest.mark.parametrize(
    ("name", "dtype", "batch", "path"),
    [
        pytest.param("spark", "float32", 1, "sparse", marks=pytest.mark.slow),
        ("spark", "bfloat16", 8, "sparse"),
        pytest.param("spark", "float32", 1, "masked", marks=pytest.mark.slow),
        pytest.param("spark", "bfloat16", 1, "sparse", marks=pytest.mark.slow),
        ("dense", "float32", 2, "masked"),
        ("mixed", "float32", 2, "sparse"),
    ],
    ids=[
        "f32-b1-sparse", "bf16-b8-sparse", "f32-b1-masked", "bf16-b1-sparse", "dense-f32-b2",
        "mixed-f32-b2-sparse",
    ],
)  # fmt: skip
def test_native_kernels_decode_like_xla(name, dtype, batch, path):
    # The whole decode with the native products, gathered FFN, fused decode attention and
    # scored prefill attention against XLA's: the same logits within float32 reordering, and
    # the same greedy token at every step.
    cfg, params, tokens = _setup(name, seed=11, b=batch)
    dparams = decode_params(cfg, params, dtype=dtype)
    options = {
        impl: DecodeOptions(path, prefill_chunk=4, implementation=impl)
        for impl in ("native", "xla")
    }
    got, want = (_cached_logits(cfg, dparams, tokens, 8, opts) for opts in options.values())
    np.testing.assert_allclose(got, want, **CACHED)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    # A decode step really runs the fused attention kernel where it applies: every dense
    # layer, and Spark layers on the sparse path.
    # Spark's prefill chunks attend through the native scored kernel (retraced to see it).
    jax.clear_caches()
    cache = init_cache(cfg, batch, T)
    fused = ffn_native.spark_ffn_block
    with (
        mock.patch.object(A, "attend_scored_native", wraps=A.attend_scored_native) as scored,
        mock.patch.object(ffn_native, "spark_ffn_block", wraps=fused) as block,
    ):
        _, cache, _ = prefill(cfg, dparams, cache, tokens[:, :8], None, options["native"])
    assert scored.called == (cfg.attn_kind == "spark")
    # Sparse Spark FFN layers take the block kernel with the threshold inside (not on the
    # masked path).
    assert block.called == (
        cfg.ffn_kind == "spark" and path == "sparse" and any(cfg.ffn_sparse_layers)
    )
    native_step = functools.partial(decode_step_jit, cfg, options["native"])
    step = str(jax.make_jaxpr(native_step)(dparams, cache, jnp.asarray(tokens[:, 8])))
    fused = cfg.attn_kind == "dense" or (path == "sparse" and any(cfg.attn_sparse_layers))
    kernel = f"sparse_jax_{cfg.attn_kind}_decode_attention"
    assert (kernel in step) == fused


@pytest.mark.skipif(not _native.available(), reason="native kernels not built")
def test_native_prefill_attention_respects_attn_impl_and_its_memory_bound():
    # The scored kernel serves Spark prefill chunks under attn_impl="auto" only, and only while
    # the chunk's raw scores fit SCORED_MAX_BYTES; otherwise the chunk attends as configured.
    cfg, params, tokens = _setup("spark", seed=5)
    dparams = decode_params(cfg, params)
    opts = DecodeOptions(prefill_chunk=4, implementation="native")
    for impl, bound, used in (
        ("auto", attention_native.SCORED_MAX_BYTES, True),
        ("blockwise", attention_native.SCORED_MAX_BYTES, False),
        ("materialized", attention_native.SCORED_MAX_BYTES, False),
        ("auto", 0, False),
    ):
        c = dataclasses.replace(cfg, attn_impl=impl)
        jax.clear_caches()
        with (
            mock.patch.object(A, "attend_scored_native", wraps=A.attend_scored_native) as scored,
            mock.patch.object(attention_native, "SCORED_MAX_BYTES", bound),
        ):
            prefill(c, dparams, init_cache(c, 2, T), tokens[:, :8], None, opts)
        assert scored.called == used, (impl, bound)


@pytest.mark.parametrize("name", ["spark", pytest.param("dense", marks=pytest.mark.slow)])
def test_blockwise_prefill_equals_the_materialized_prefill(name):
    """Chunks attending blockwise to the cache and themselves (local rings that wrap, a
    left-padded row) give the materialized prefill's logits, statistics and next step."""
    cfg, params, tokens = _setup(name, seed=4)
    dparams = decode_params(cfg, params)
    lengths = np.array([T - 1, T - 6])
    runs = {}
    for impl in ("materialized", "blockwise"):
        c = dataclasses.replace(cfg, attn_impl=impl, attn_block_size=4, attn_key_block_size=4)
        with mock.patch.object(A, "attend_blockwise", wraps=A.attend_blockwise) as traced:
            logits, cache, stats = prefill(
                c, dparams, init_cache(c, 2, T), tokens[:, : T - 1], lengths, MASKED
            )
        assert traced.called == (impl == "blockwise")  # traced per layer and chunk shape
        with mock.patch.object(A, "attend_blockwise", wraps=A.attend_blockwise) as traced:
            after, _, _ = decode_step(c, dparams, cache, tokens[:, T - 1], MASKED)
        assert not traced.called  # a one-token step never attends blockwise
        runs[impl] = logits, stats, after
    (want, want_stats, want_after), (got, got_stats, got_after) = runs.values()
    np.testing.assert_allclose(got, want, **CACHED)
    np.testing.assert_allclose(got_after, want_after, **CACHED)
    for key in want_stats:
        np.testing.assert_allclose(got_stats[key], want_stats[key], rtol=1e-5, err_msg=key)
