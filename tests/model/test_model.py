"""Model properties: causality through gradients, jit == eager, remat and scan invariance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro_configs import model_variants
from tolerances import REORDER

from sparse_jax.model.transformer import (
    Transformer,
    forward,
    init_params,
    stack_layers,
    unstack_layers,
)

VARIANTS = model_variants((True, False, True), (False, True, True))
BASE = VARIANTS["spark"]
T = 16


def _tokens(seed=0, b=2):
    return jax.random.randint(jax.random.key(seed), (b, T), 0, BASE.vocab_size)


@pytest.mark.parametrize("name", ["spark", "dense"])
def test_causality_through_gradients(name):
    cfg = VARIANTS[name]
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens()
    emb = Transformer(cfg).apply(
        {"params": params}, tokens, method=lambda m, t: m.embedder.encode(t)
    )

    def loss_at(e, t):
        logits, _ = Transformer(cfg).apply({"params": params}, tokens, embeddings=e)
        row = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
        return jnp.sum(jax.nn.log_softmax(row)[..., 3])

    grad_fn = jax.jit(jax.grad(loss_at))
    for t in (0, 5, T - 2):
        grad = np.asarray(grad_fn(emb, t))
        per_position = np.abs(grad).sum(axis=(0, 2))
        assert np.all(per_position[t + 1 :] == 0), f"future leaks into position {t}"
        assert per_position[t] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spark", "dense"])
def test_jit_equals_eager(name):
    cfg = VARIANTS[name]
    params = init_params(cfg, jax.random.key(1))
    tokens = _tokens(1)
    eager, eager_stats = forward(cfg, params, tokens)
    jitted, jit_stats = jax.jit(lambda p, t: forward(cfg, p, t))(params, tokens)
    np.testing.assert_allclose(jitted, eager, **REORDER)
    np.testing.assert_allclose(
        jit_stats["ffn_active_fraction"], eager_stats["ffn_active_fraction"], **REORDER
    )


def _loss_and_grad(cfg, params, tokens):
    def loss(p):
        logits, _ = forward(cfg, p, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
    ("name", "policy"),
    [
        pytest.param("spark", "full", marks=pytest.mark.slow),
        pytest.param("spark", "dots", marks=pytest.mark.slow),
        pytest.param("spark", "names", marks=pytest.mark.slow),
        pytest.param("dense", "full", marks=pytest.mark.slow),
    ],
)
def test_remat_equals_no_remat(name, policy):
    cfg = VARIANTS[name]
    params = init_params(cfg, jax.random.key(2))
    tokens = _tokens(2)
    base_loss, base_grad = _loss_and_grad(cfg, params, tokens)
    loss, grad = _loss_and_grad(dataclasses.replace(cfg, remat_policy=policy), params, tokens)
    np.testing.assert_allclose(loss, base_loss, **REORDER)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **REORDER), grad, base_grad)


# "mixed" has Spark and dense layers of both kinds; the pure variants run with the slow tests.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n != "mixed" else n for n in VARIANTS]
)
def test_scanned_equals_unscanned(name):
    cfg = VARIANTS[name]
    loop_cfg = dataclasses.replace(cfg, scan_layers=False)
    loop_params = init_params(loop_cfg, jax.random.key(3))
    scan_params = stack_layers(loop_params, cfg.num_layers)
    assert jax.tree.structure(scan_params) == jax.tree.structure(
        init_params(cfg, jax.random.key(3))
    )
    tokens = _tokens(3)
    scanned, scan_stats = jax.jit(lambda p: forward(cfg, p, tokens))(scan_params)
    looped, loop_stats = jax.jit(lambda p: forward(loop_cfg, p, tokens))(loop_params)
    np.testing.assert_allclose(scanned, looped, **REORDER)
    np.testing.assert_allclose(
        scan_stats["attn_keys_per_query"], loop_stats["attn_keys_per_query"], **REORDER
    )
    back = unstack_layers(scan_params, cfg.num_layers)
    jax.tree.map(np.testing.assert_array_equal, back, loop_params)


def test_stats_report_sparsity_per_layer():
    cfg = VARIANTS["mixed"]
    params = init_params(cfg, jax.random.key(4))
    logits, stats = jax.jit(lambda p: forward(cfg, p, _tokens(4)))(params)
    assert logits.shape == (2, T, cfg.vocab_size) and logits.dtype == jnp.float32
    ffn = np.asarray(stats["ffn_active_fraction"])
    keys = np.asarray(stats["attn_keys_per_query"])
    assert ffn.shape == keys.shape == (cfg.num_layers,)
    assert ffn[0] > 0.9  # FFN sparsity off in layer 0: every neuron active
    assert np.all(ffn[1:] < 0.3)
    # Layer 1 attends densely in a global window: mean of 1..T keys.
    np.testing.assert_allclose(keys[1], (T + 1) / 2)
    assert keys[2] < (T + 1) / 2
    # Final logit soft-cap bounds every logit.
    assert float(jnp.max(jnp.abs(logits))) <= cfg.final_logit_softcap


def test_bf16_compute_runs_close_to_f32():
    cfg = VARIANTS["dense"]
    params = init_params(cfg, jax.random.key(5))
    tokens = _tokens(5)
    bf16_cfg = dataclasses.replace(cfg, dtype="bfloat16")
    f32, _ = jax.jit(lambda p: forward(cfg, p, tokens))(params)
    bf16, _ = jax.jit(lambda p: forward(bf16_cfg, p, tokens))(params)
    assert bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.25
