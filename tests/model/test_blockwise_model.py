"""The model with blockwise attention equals the materialized model: logits, attended-key
statistics and gradients, dense and Spark, local and global layers, under ``nn.scan``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro_configs import MICRO_MODEL, MICRO_MODEL_GQA

from configs import get_model_config
from sparse_jax.kernels import DEFAULT_KERNELS, XLA_KERNELS, Kernels
from sparse_jax.model.attention import uses_blockwise
from sparse_jax.model.attention_native import native_blockwise
from sparse_jax.model.config import ModelConfig, override
from sparse_jax.model.transformer import forward, init_params
from sparse_jax.parallel.sharding import ShardingPlan, make_mesh
from sparse_jax.policy import policy_for


# Slow: the default run checks the XLA form's gradients per op (tests/kernels), and the model's
# gradients with the Pallas kernels under a mesh (below).
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_dense"])
def test_blockwise_model_equals_materialized(preset):
    base = override(get_model_config(preset), MICRO_MODEL)
    # 40 tokens: windows of 16 cut blocks of 8; the first tokens keep all keys (k = 8).
    base = dataclasses.replace(base, max_seq_len=40, attn_block_size=8, attn_key_block_size=8)
    cfgs = {
        impl: dataclasses.replace(base, attn_impl=impl) for impl in ("materialized", "blockwise")
    }
    params = init_params(cfgs["materialized"], jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, base.vocab_size)

    def loss(p, cfg):
        logits, stats = forward(cfg, p, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), (logits, stats)

    results = {
        impl: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, cfg)
        for impl, cfg in cfgs.items()
    }
    (loss_m, (logits_m, stats_m)), grads_m = results["materialized"]
    (loss_b, (logits_b, stats_b)), grads_b = results["blockwise"]
    assert float(loss_b) == pytest.approx(float(loss_m), rel=1e-5)
    np.testing.assert_allclose(logits_b, logits_m, rtol=2e-5, atol=2e-5)
    for key in stats_m:
        np.testing.assert_allclose(stats_b[key], stats_m[key], rtol=1e-5, atol=1e-6, err_msg=key)
    leaves_m, leaves_b = jax.tree.leaves(grads_m), jax.tree.leaves(grads_b)
    for a, b in zip(leaves_b, leaves_m, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()) + 1e-9)


def test_auto_chooses_by_length_and_validates():
    cfg = ModelConfig()
    threshold = policy_for().blockwise_min_len
    assert not uses_blockwise(cfg, threshold - 1) and uses_blockwise(cfg, threshold)
    # A prefill chunk: its length times the keys it reads (cache slots and its own).
    assert uses_blockwise(cfg, threshold // 4, threshold * 4)
    assert not uses_blockwise(cfg, threshold // 4, threshold * 4 - 1)
    assert uses_blockwise(dataclasses.replace(cfg, attn_impl="blockwise"), 8)
    assert not uses_blockwise(dataclasses.replace(cfg, attn_impl="materialized"), 1 << 20)
    assert not uses_blockwise(dataclasses.replace(cfg, topk_method="lax_top_k"), 1 << 20)
    # The native Spark kernels attend blockwise at any length (a sequence's own keys, one
    # device, "auto"); dense keeps the threshold.
    native = Kernels("native")
    assert native_blockwise(cfg, native, None)
    assert not native_blockwise(cfg, native, {"pos": jnp.zeros((1, 4), jnp.int32)})
    assert not native_blockwise(dataclasses.replace(cfg, attn_kind="dense"), native, None)
    assert not native_blockwise(dataclasses.replace(cfg, attn_impl="materialized"), native, None)
    assert not native_blockwise(cfg, XLA_KERNELS, None)
    mesh = make_mesh("data=8")
    assert not native_blockwise(cfg, dataclasses.replace(native, mesh=mesh), None)
    with pytest.raises(ValueError, match="attn_impl"):
        ModelConfig(attn_impl="flash")
    with pytest.raises(ValueError, match="topk_method='statistical'"):
        ModelConfig(attn_impl="blockwise", topk_method="lax_top_k")
    with pytest.raises(ValueError, match="attn_block_size"):
        ModelConfig(attn_block_size=0)
    with pytest.raises(ValueError, match="attn_key_block_size"):
        ModelConfig(attn_key_block_size=1.5)


def _logits_and_grads(cfg, params, tokens, plan=None, kernels=DEFAULT_KERNELS):
    def loss(p):
        logits, _ = forward(cfg, p, tokens, plan=plan, kernels=kernels)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_pallas_blockwise_model_under_a_mesh_equals_the_materialized_model():
    """The Pallas GPU kernels (interpret mode) in the whole model, per shard over a
    data x tensor mesh (batch and kv heads split), against the one-device materialized
    model: logits and gradients."""
    base = override(get_model_config("tiny"), MICRO_MODEL_GQA)
    base = dataclasses.replace(base, max_seq_len=24, attn_block_size=16, attn_key_block_size=16)
    params = init_params(base, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 24), 0, base.vocab_size)
    (_, want), want_grads = _logits_and_grads(
        dataclasses.replace(base, attn_impl="materialized"), params, tokens
    )
    cfg = dataclasses.replace(base, attn_impl="blockwise")
    plan = ShardingPlan(make_mesh("data=4,tensor=2"))
    kernels = Kernels("pallas_gpu", interpret=True)
    program = str(
        jax.make_jaxpr(lambda p: forward(cfg, p, tokens, plan=plan, kernels=kernels))(params)
    )
    assert "blockwise_attention_gpu" in program and "shard_map" in program
    sharded = jax.device_put(params, plan.tree_shardings(params))
    (_, got), grads = _logits_and_grads(cfg, sharded, tokens, plan, kernels)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()) + 1e-9)


def test_native_kernels_attend_spark_blockwise_on_one_device_and_leave_a_mesh_to_xla():
    """With the native kernels a Spark model's blockwise attention is the C++ custom call on
    one device (logits as the materialized model's); under a mesh, where a custom call is not
    partitioned, it is XLA's scan."""
    base = override(get_model_config("tiny"), MICRO_MODEL_GQA)
    base = dataclasses.replace(base, max_seq_len=40, attn_block_size=8, attn_key_block_size=8)
    cfg = dataclasses.replace(base, attn_impl="blockwise")
    params = init_params(base, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 40), 0, base.vocab_size)
    native = Kernels("native")
    call = "sparse_jax_spark_train_attention"
    one = jax.jit(lambda p: forward(cfg, p, tokens, kernels=native)[0])
    assert call in one.lower(params).as_text()
    want, _ = jax.jit(
        lambda p: forward(dataclasses.replace(base, attn_impl="materialized"), p, tokens)
    )(params)
    np.testing.assert_allclose(one(params), want, rtol=2e-5, atol=2e-5)
    plan = ShardingPlan(make_mesh("data=4,tensor=2"))
    program = jax.jit(lambda p: forward(cfg, p, tokens, plan=plan, kernels=native)[0])
    assert call not in program.lower(params).as_text()
