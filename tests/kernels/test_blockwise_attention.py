"""Blockwise dense and Spark attention against the materialized form: outputs, attended-key
counts and gradients, over GQA, local and global windows, rows with n_valid <= k, padding,
lengths that are not a multiple of the block, and both dtypes; its memory grows linearly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.blockwise_attention import blockwise_attention
from sparse_jax.model import attention as A
from sparse_jax.model.config import ModelConfig

B, K, G, H = 2, 2, 3, 16


def config(kind: str, top_k: int = 5, softcap: float | None = 5.0) -> ModelConfig:
    return ModelConfig(
        num_heads=K * G,
        num_kv_heads=K,
        head_dim=H,
        attn_kind=kind,
        ffn_kind="gated" if kind == "dense" else "spark",
        attn_top_k=top_k,
        attn_logit_softcap=softcap,
        max_seq_len=128,
    )


def inputs(t: int, dtype=jnp.float32, seed: int = 0, pad: int = 3):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, t, K * G, H)) * 2, dtype)
    k = jnp.asarray(rng.standard_normal((B, t, K, H)) * 2, dtype)
    v = jnp.asarray(rng.standard_normal((B, t, K, H)), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    if pad:
        pos = pos.at[1, -pad:].set(-1)  # a padded row: its queries attend nothing
    weights = jnp.asarray(rng.standard_normal((B, t, K * G, H)), jnp.float32)
    return q, k, v, pos, weights


def materialized(cfg, pos, window):
    def run(q, k, v):
        seg = A.key_entries(cfg, k, v, pos)
        return A.attend_masked(cfg, q, [seg], pos, window, guarded=True)

    return run


def blockwise(cfg, pos, window, block_q, block_k, enabled=True):
    def run(q, k, v):
        seg = A.key_entries(cfg, k, v, pos)
        qg = A._grouped(cfg, q)
        if cfg.attn_kind == "spark":
            r = cfg.attn_predictor_dim
            scales = cfg.resolved_predictor_query_scale, cfg.resolved_gate_query_scale
            parts = (qg[..., :r] * scales[0], qg[..., r:] * scales[1])
            keys = (seg["k_pred"], seg["k_rest"])
        else:
            parts, keys = (qg * cfg.resolved_query_scale,), (seg["k"],)
        out, count = blockwise_attention(
            parts,
            keys,
            seg["v"],
            pos,
            pos,
            window,
            enabled=enabled,
            softcap=cfg.attn_logit_softcap,
            top_k=cfg.attn_top_k if cfg.attn_kind == "spark" else 0,
            block_q=block_q,
            block_k=block_k,
        )
        return A._ungroup(out), count.reshape(B, K * G, -1)

    return run


SLOW = pytest.mark.slow
CASES = [
    # kind, length, window, block_q, block_k, top_k, softcap
    ("dense", 37, 10, 8, 16, 5, 5.0),  # local window, ragged blocks
    pytest.param("dense", 32, 1000, 16, 8, 5, None, marks=SLOW),  # global, no cap
    ("spark", 37, 10, 8, 16, 5, 5.0),  # a window of 10 > k: the threshold decides
    pytest.param("spark", 40, 1000, 8, 8, 3, 5.0, marks=SLOW),  # the first 3 keep every key
    ("spark", 33, 6, 16, 4, 8, None),  # window 6 <= k: every row keeps all its keys
]


@pytest.mark.parametrize("kind, t, window, bq, bk, top_k, cap", CASES)
def test_forward_and_gradients_equal_the_materialized_form(kind, t, window, bq, bk, top_k, cap):
    cfg = config(kind, top_k, cap)
    q, k, v, pos, w = inputs(t)
    ref, mine = (
        jax.jit(materialized(cfg, pos, window)),
        jax.jit(blockwise(cfg, pos, window, bq, bk)),
    )
    (out_ref, n_ref), (out, n) = ref(q, k, v), mine(q, k, v)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n, n_ref)
    assert float(jnp.abs(out[1, -3:]).max()) == 0.0  # padding queries
    loss = lambda f: lambda *a: jnp.sum(f(*a)[0] * w)  # noqa: E731
    grads_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    grads = jax.jit(jax.grad(loss(mine), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", grads, grads_ref, strict=True):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * scale, err_msg=name)


def test_spark_disabled_keeps_every_valid_key():
    cfg = config("spark", top_k=2)
    q, k, v, pos, _ = inputs(24, pad=0)
    out, n = blockwise(cfg, pos, 1000, 8, 8, enabled=False)(q, k, v)
    want = np.broadcast_to(np.arange(1, 25, dtype=np.float32), n.shape)
    np.testing.assert_array_equal(n, want)
    seg = A.key_entries(cfg, k, v, pos)
    ref, _ = A.attend_masked(cfg, q, [seg], pos, 1000, enabled=False)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs():
    cfg = config("spark")
    q, k, v, pos, _ = inputs(32, jnp.bfloat16)
    (ref, n_ref), (out, n) = (
        materialized(cfg, pos, 12)(q, k, v),
        blockwise(cfg, pos, 12, 8, 8)(q, k, v),
    )
    # Same bf16 operands; the sums differ only in order (and in the bf16 rounding of weights).
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)
    assert float(jnp.mean(jnp.abs(n - n_ref))) < 0.05


@SLOW  # every implementation has its degenerate test in test_kernel_blockwise_attention.py
def test_degenerate_inputs():
    """Equal scores (all keys tie), zero queries, huge values under the cap."""
    cfg = config("spark", top_k=4)
    t = 20
    _, _, v, pos, _ = inputs(t, pad=0)
    for q, k in [
        (jnp.zeros((B, t, K * G, H)), jnp.zeros((B, t, K, H))),
        (jnp.full((B, t, K * G, H), 1e4), jnp.full((B, t, K, H), 1e4)),
    ]:
        (ref, n_ref), (out, n) = (
            jax.jit(materialized(cfg, pos, 1000))(q, k, v),
            jax.jit(blockwise(cfg, pos, 1000, 8, 8))(q, k, v),
        )
        # The huge case's outputs reach 4e8 (softplus of a huge gate): relative error.
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(n, n_ref)
        assert np.all(np.isfinite(out))


def test_block_sizes_are_validated():
    cfg = config("dense")
    q, k, v, pos, _ = inputs(8)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="block_q"):
            blockwise(cfg, pos, 8, bad, 8)(q, k, v)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", [pytest.param("dense", marks=SLOW), "spark"])
def test_memory_grows_linearly_with_the_context(kind):
    """The compiled gradient's temporaries: 4x the context costs the blockwise form about 4x,
    the materialized form about 16x."""
    cfg = config(kind)
    sizes = {}
    for t in (256, 1024):
        q, k, v, pos, w = inputs(t, pad=0)
        for name, make in (("mat", materialized), ("blk", None)):
            f = make(cfg, pos, 1 << 20) if make else blockwise(cfg, pos, 1 << 20, 64, 64)
            grad = jax.grad(lambda q, k, v, f=f, w=w: jnp.sum(f(q, k, v)[0] * w), argnums=(0, 1, 2))
            sizes[name, t] = _temp_bytes(grad, q, k, v)
    assert sizes["blk", 1024] / sizes["blk", 256] < 6
    assert sizes["mat", 1024] / sizes["mat", 256] > 10
    assert sizes["blk", 1024] < sizes["mat", 1024] / 4
