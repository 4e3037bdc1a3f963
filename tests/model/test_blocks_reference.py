"""Spark FFN and attention against straight-line float64 numpy transcriptions of the method.

The formulas are those of docs/method.md, sections 2 and 3.
"""

import dataclasses
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_VS_F64

from sparse_jax.model.attention import Attention, attention_mask
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.ffn import GatedFFN, SparkFFN

CFG = ModelConfig(
    vocab_size=64,
    model_dim=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    ffn_dim=48,
    attn_top_k=3,
    sliding_window=5,
    max_seq_len=32,
    ffn_keep_fraction=0.25,
    attn_logit_softcap=5.0,
)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def rope_np(x, pos, base=10000.0):
    """x [W] at integer position pos, split-half rotation."""
    w = x.shape[-1]
    half = w // 2
    freq = base ** (-np.arange(half) * 2.0 / w)
    a = pos * freq
    x1, x2 = x[:half], x[half:]
    return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)])


def test_spark_ffn_matches_transcription():
    x = jax.random.normal(jax.random.key(0), (2, 5, CFG.model_dim))
    module = SparkFFN(CFG)
    params = module.init(jax.random.key(1), x, True)
    got, active, _ = module.apply(params, x, True)
    p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
    r, k = CFG.ffn_predictor_dim, CFG.ffn_keep_count
    z = NormalDist().inv_cdf(1 - k / CFG.ffn_dim)
    want = np.zeros(x.shape)
    for b in range(2):
        for t in range(5):
            xt = np.asarray(x[b, t], np.float64)
            pre = p["k1"] @ xt[:r]  # K1 [F, R]: [F]
            theta = pre.mean() + z * pre.std()
            act = gelu_tanh(np.maximum(pre - theta, 0))
            value = p["k2"] @ xt[r:]  # [F]
            want[b, t] = (act * value) @ p["v"]
            assert active[b, t] == np.count_nonzero(act)
    np.testing.assert_allclose(np.asarray(got), want, **F32_VS_F64)


def test_gated_ffn_matches_transcription():
    cfg = dataclasses.replace(CFG, ffn_kind="gated", ffn_dim=32)
    x = jax.random.normal(jax.random.key(2), (1, 3, cfg.model_dim))
    module = GatedFFN(cfg)
    params = module.init(jax.random.key(3), x, True)
    got, *_ = module.apply(params, x, True)
    p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
    xs = np.asarray(x, np.float64)
    # W_gate, W_up [F, D] and W_down [D, F]: each weight's inputs on its last axis.
    want = (gelu_tanh(xs @ p["w_gate"].T) * (xs @ p["w_up"].T)) @ p["w_down"].T
    np.testing.assert_allclose(np.asarray(got), want, **F32_VS_F64)


def _attention_transcription(cfg, p, x, window, sparse):
    """Loops over batch, query head and query position; float64."""
    b_sz, t_sz, _ = x.shape
    n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    r = cfg.attn_predictor_dim
    g = n // kv
    out = np.zeros((b_sz, t_sz, n, h))
    for b in range(b_sz):
        xs = x[b]
        q = np.einsum("td,nhd->tnh", xs, p["wq"])
        k = np.einsum("td,khd->tkh", xs, p["wk"])
        v = np.einsum("td,khd->tkh", xs, p["wv"])
        for head in range(n):
            kvh = head // g  # GQA: query heads [kvh*g, (kvh+1)*g) share kv head kvh
            for t in range(t_sz):
                keys = [j for j in range(t_sz) if j <= t and t - j < window]
                if sparse:
                    qp = rope_np(q[t, head, :r], t)
                    qg = rope_np(q[t, head, r:], t)
                    s = np.array([qp @ rope_np(k[j, kvh, :r], j) for j in keys]) / np.sqrt(r)
                    s = cfg.attn_logit_softcap * np.tanh(s / cfg.attn_logit_softcap)
                    if len(keys) <= cfg.attn_top_k:
                        keep = np.ones(len(keys), bool)
                    else:
                        z = NormalDist().inv_cdf(1 - cfg.attn_top_k / len(keys))
                        keep = s >= s.mean() + z * s.std()
                    e = np.where(keep, np.exp(s - s[keep].max()), 0)
                    soft = e / e.sum()
                    gate = np.array([qg @ rope_np(k[j, kvh, r:], j) for j in keys]) / np.sqrt(h - r)
                    w = soft * softplus(gate)
                else:
                    qt = rope_np(q[t, head], t)
                    s = np.array([qt @ rope_np(k[j, kvh], j) for j in keys]) / np.sqrt(h)
                    s = cfg.attn_logit_softcap * np.tanh(s / cfg.attn_logit_softcap)
                    e = np.exp(s - s.max())
                    w = e / e.sum()
                out[b, t, head] = sum(w[i] * v[j, kvh] for i, j in enumerate(keys))
    return np.einsum("btnh,dnh->btd", out, p["wo"])


# Windowed Spark and global dense by default (the float64 loops are slow); the rest is slow.
@pytest.mark.parametrize(
    ("kind", "window"),
    [
        ("spark", 5),
        ("dense", 1000),
        pytest.param("spark", 1000, marks=pytest.mark.slow),
        pytest.param("dense", 5, marks=pytest.mark.slow),
    ],
)
def test_attention_matches_transcription(kind, window):
    cfg = dataclasses.replace(CFG, attn_kind=kind)
    t = 11
    x = jax.random.normal(jax.random.key(4), (2, t, cfg.model_dim))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    module = Attention(cfg)
    params = module.init(jax.random.key(5), x, pos, jnp.int32(window), jnp.bool_(True))
    got, *_ = module.apply(params, x, pos, jnp.int32(window), jnp.bool_(True))
    p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
    want = _attention_transcription(cfg, p, np.asarray(x, np.float64), window, kind == "spark")
    np.testing.assert_allclose(np.asarray(got), want, **F32_VS_F64)


def test_spark_attention_keeps_about_top_k_keys():
    cfg = dataclasses.replace(CFG, attn_top_k=8, max_seq_len=128)
    t = 128
    x = jax.random.normal(jax.random.key(6), (1, t, cfg.model_dim))
    pos = jnp.arange(t)[None]
    module = Attention(cfg)
    params = module.init(jax.random.key(7), x, pos, jnp.int32(1000), jnp.bool_(True))
    _, _, keys, _ = module.apply(params, x, pos, jnp.int32(1000), jnp.bool_(True))
    # Rows with <= 8 valid keys keep them all; the rest keep about 8.
    assert keys.shape == (1, cfg.num_heads, t)
    assert 5 < float(jnp.mean(keys)) < 12


def test_attention_mask_is_causal_and_windowed():
    pos = jnp.arange(6)[None]
    m = np.asarray(attention_mask(pos, pos, jnp.int32(3)))[0]
    for i in range(6):
        for j in range(6):
            assert m[i, j] == (j <= i and i - j < 3)
