"""The model and the decode path reach the Pallas kernels through ``sparse_jax.kernels``.

On CPU the Pallas implementations run in interpret mode; they must give the XLA path's logits
(and gradients) for the whole model, and the XLA path's logits for sparse decode steps.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_cases import BASE, VARIANTS
from tolerances import F32_VS_F64

from pallas_kernels import _native
from pallas_kernels._common.dispatch import ImplementationUnavailableError
from sparse_jax.decode.cache import init_cache
from sparse_jax.decode.step import (
    DecodeOptions,
    _decode_compute,
    decode_params,
    decode_step,
    prefill,
)
from sparse_jax.kernels import Kernels
from sparse_jax.model.transformer import forward, init_params
from sparse_jax.parallel.sharding import ShardingPlan, ShardingRules, make_mesh

XLA = Kernels("xla")
T = 12


def _inputs(cfg, seed=0, b=2):
    params = init_params(cfg, jax.random.key(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (b, T), 0, cfg.vocab_size)
    return params, tokens


def _logits(cfg, params, tokens, kernels, plan=None):
    fn = jax.jit(lambda p, t: forward(cfg, p, t, plan=plan, kernels=kernels))
    # The Pallas runs really call kernels; the XLA ones none.
    calls = str(jax.make_jaxpr(fn)(params, tokens)).count("pallas_call")
    assert (calls > 0) == (kernels.resolved() != "xla"), calls
    logits, stats = fn(params, tokens)
    return np.asarray(logits), jax.tree.map(np.asarray, stats)


@pytest.mark.parametrize(
    "implementation", ["pallas_tpu", pytest.param("pallas_gpu", marks=pytest.mark.slow)]
)
def test_model_logits_with_pallas_kernels_equal_xla(implementation):
    cfg = VARIANTS["mixed"]  # sparse and dense layers of both kinds: the enabled switch
    params, tokens = _inputs(cfg)
    want, want_stats = _logits(cfg, params, tokens, XLA)
    got, got_stats = _logits(cfg, params, tokens, Kernels(implementation, interpret=True))
    np.testing.assert_allclose(got, want, **F32_VS_F64)
    for name in want_stats:
        np.testing.assert_allclose(got_stats[name], want_stats[name], **F32_VS_F64)


# Long; each Pallas kernel's VJP is checked against the reference in the kernel test base.
@pytest.mark.slow
def test_training_gradients_with_the_tpu_kernels_equal_xla():
    cfg = BASE
    params, tokens = _inputs(cfg, seed=3)

    def loss(p, kernels):
        logits, _ = forward(cfg, p, tokens, kernels=kernels)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    want = jax.jit(jax.grad(lambda p: loss(p, XLA)))(params)
    got = jax.jit(jax.grad(lambda p: loss(p, Kernels("pallas_tpu", interpret=True))))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)


# Long (interpreted kernels in every decode step); the kernel test base checks each kernel.
@pytest.mark.slow
def test_sparse_decode_steps_with_the_tpu_kernels_equal_xla():
    cfg = BASE
    params, tokens = _inputs(cfg, seed=5)
    dparams = decode_params(cfg, params)
    tokens = np.asarray(tokens)
    results = {}
    for implementation, interpret in (("xla", False), ("pallas_tpu", True)):
        options = DecodeOptions(
            "sparse", batch_mode="per_token", implementation=implementation, interpret=interpret
        )
        cache = init_cache(cfg, 2, T)
        _, cache, _ = prefill(cfg, dparams, cache, tokens[:, :6], None, options)
        step = functools.partial(_decode_compute, cfg, options)
        lookup = dparams["embedder"]["embedding"]
        kernel_names = re.findall(
            r"name=(\w+_tpu)", str(jax.make_jaxpr(step)(dparams, lookup, cache, tokens[:, 6]))
        )
        assert sorted(set(kernel_names)) == (
            ["sparse_ffn_tpu", "topk_attention_tpu"] if interpret else []
        )
        steps = []
        for t in range(6, 9):
            logits, cache, stats = decode_step(cfg, dparams, cache, tokens[:, t], options)
            assert int(np.sum(stats["ffn_overflow"]) + np.sum(stats["attn_overflow"])) == 0
            steps.append(np.asarray(logits))
        results[implementation] = np.stack(steps)
    np.testing.assert_allclose(results["pallas_tpu"], results["xla"], **F32_VS_F64)


def test_kernel_calls_run_per_shard_on_a_mesh():
    cfg = BASE
    params, tokens = _inputs(cfg, seed=7, b=4)
    plan = ShardingPlan(make_mesh("data=2,fsdp=2,tensor=2"), ShardingRules())
    want, _ = _logits(cfg, params, tokens, XLA)
    got, _ = _logits(cfg, params, tokens, Kernels("pallas_tpu", interpret=True), plan)
    np.testing.assert_allclose(got, want, **F32_VS_F64)


def test_auto_on_cpu_trains_with_xla_products_and_decodes_with_the_native_kernels():
    assert jax.default_backend() == "cpu"
    assert Kernels().resolved() == ("native" if _native.available() else "xla")
    cfg = VARIANTS["mixed"]
    params, tokens = _inputs(cfg)

    def program(kernels, t):
        return str(jax.make_jaxpr(lambda p, x: forward(cfg, p, x, kernels=kernels))(params, t))

    # A full sequence has more rows than the native products take: XLA's products. Its Spark
    # attention is the native blockwise kernels (when built), with XLA's logits.
    full = program(Kernels(), tokens)
    assert "sparse_jax_linear" not in full and "pallas_call" not in full
    assert ("sparse_jax_spark_train_attention" in full) == _native.available()
    if _native.available():
        got, got_stats = jax.jit(lambda p, t: forward(cfg, p, t, kernels=Kernels()))(params, tokens)
        want, want_stats = jax.jit(lambda p, t: forward(cfg, p, t, kernels=XLA))(params, tokens)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        for name in want_stats:
            np.testing.assert_allclose(got_stats[name], want_stats[name], rtol=1e-5, atol=1e-6)
    else:
        assert full == program(XLA, tokens)
    # One token per row runs every weight product natively (when the kernels are built).
    one = program(Kernels(), tokens[:1, :1])
    assert ("sparse_jax_linear" in one) == _native.available()
    assert "sparse_jax_linear" not in program(XLA, tokens[:1, :1])


def test_bad_kernel_requests_fail_fast():
    with pytest.raises(ValueError, match="implementation must be one of"):
        Kernels("triton")
    with pytest.raises(ValueError, match="interpret=True applies only"):
        Kernels("xla", interpret=True)
    with pytest.raises(ValueError, match="interpret=True applies only"):
        DecodeOptions(implementation="auto", interpret=True)
    cfg = BASE
    params, tokens = _inputs(cfg)
    # An explicit Pallas implementation without its backend: an error, not a silent fallback.
    with pytest.raises(ImplementationUnavailableError, match="needs the 'tpu' backend"):
        forward(cfg, params, tokens, kernels=Kernels("pallas_tpu"))
    baseline = dataclasses.replace(cfg, topk_method="lax_top_k")
    with pytest.raises(ValueError, match="no Pallas kernel"):
        forward(baseline, params, tokens, kernels=Kernels("pallas_tpu", interpret=True))
