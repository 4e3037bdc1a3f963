"""Every implementation of blockwise attention (XLA, the native CPU kernels, and the Pallas
TPU and GPU kernels in interpret mode) against the materialized reference: outputs,
attended-key counts and gradients, dense and Spark, GQA, local and global windows, padded and
empty rows, rows with n_valid <= k, ties, huge values, both dtypes; the Pallas kernels lower
for TPU and CUDA."""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_base import NATIVE, lowered_text, using_isa

from pallas_kernels import _native
from pallas_kernels.blockwise_attention import api, pallas, reference
from sparse_jax.model import attention as A
from sparse_jax.model.config import ModelConfig

B, K, G, R, H = 2, 2, 2, 8, 16
IMPLEMENTATIONS = ("xla", *NATIVE, "pallas_tpu", "pallas_gpu")  # native where it is built
SLOW = pytest.mark.slow


def some_slow(*slow: str) -> list:
    """The implementations, those named marked slow (the XLA scan also has the model-level
    tests of test_blockwise_attention.py; TPU interpret mode is the slowest)."""
    return [pytest.param(i, marks=SLOW) if i in slow else i for i in IMPLEMENTATIONS]


# Small blocks so that every kernel takes several grid steps; TPU key blocks are 128-wide.
# The native Spark kernels take no blocks (its dense attention is the XLA scan's).
BLOCKS = {"xla": (8, 16), "native": (8, 16), "pallas_tpu": (32, 128), "pallas_gpu": (16, 16)}


def make(spark: bool, t: int, dtype=jnp.float32, seed: int = 0, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    arr = lambda *shape, s=1.0: jnp.asarray(rng.standard_normal(shape) * s, dtype)  # noqa: E731
    if spark:
        q = (arr(B, K, G, t, R, s=scale), arr(B, K, G, t, H - R))
        keys = (arr(B, K, t, R, s=scale), arr(B, K, t, H - R))
    else:
        q, keys = (arr(B, K, G, t, H, s=scale),), (arr(B, K, t, H, s=scale),)
    v = arr(B, K, t, H)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t)).copy()
    pos[1, -3:] = -1  # padding queries and empty key slots
    return q, keys, v, jnp.asarray(pos)


def options(impl: str, **kw) -> dict:
    bq, bk = BLOCKS[impl]
    interpret = impl.startswith("pallas")
    return dict(implementation=impl, interpret=interpret, block_q=bq, block_k=bk, **kw)


@functools.partial(jax.jit, static_argnames=("fn", "kw"))
def _value_and_grad(fn, q, keys, v, pos, window, cotangent, kw):
    def loss(q, keys, v):
        out, n = fn(q, keys, v, pos, pos, window, **dict(kw))
        return jnp.sum(out * cotangent), (out, n)

    (_, (out, n)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, keys, v)
    return out, n, grads


def run(fn, case, window, **kw):
    q, keys, v, pos = case
    cotangent = jax.random.normal(jax.random.key(3), (B, K, G, pos.shape[1], H))
    return _value_and_grad(fn, q, keys, v, pos, window, cotangent, tuple(sorted(kw.items())))


def assert_clear_of_ties(q_pred, k_pred, q_pos, k_pos, window, softcap, top_k, margin=1e-5):
    """The kept sets of a Spark case are sound to compare: in float64, no valid score of a
    thresholded row lies within ``margin`` of its theta unless it equals it exactly (scores
    of zero vectors, or saturated by the cap). A nearer score may fall on either side of
    theta by float32 rounding, which differs between programs, compilers and CPUs."""
    s = np.einsum("bkgtw,bksw->bkgts", np.asarray(q_pred, np.float64), np.asarray(k_pred))
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    qp = np.asarray(q_pos)[:, None, None, :, None]
    kp = np.asarray(k_pos)[:, None, None, None, :]
    valid = np.broadcast_to((kp >= 0) & (qp >= 0) & (kp <= qp) & (qp - kp < window), s.shape)
    n = valid.sum(-1, keepdims=True)
    mean = np.where(valid, s, 0.0).sum(-1, keepdims=True) / np.maximum(n, 1)
    std = np.sqrt(np.where(valid, (s - mean) ** 2, 0.0).sum(-1, keepdims=True) / np.maximum(n, 1))
    z = np.vectorize(statistics.NormalDist().inv_cdf)(
        np.clip(1 - top_k / np.maximum(n, 1), 1e-6, 1 - 1e-6)
    )
    theta = np.minimum(mean + z * std, np.where(valid, s, -np.inf).max(-1, keepdims=True))
    gap = np.abs(s - theta)[valid & (n > top_k) & (s != theta)]
    assert gap.size == 0 or gap.min() > margin, f"a score {gap.min():.1e} from theta"


def check(impl, case, window, rtol=1e-5, grad_rtol=1e-5, **kw):
    if kw.get("top_k") and kw.get("enabled", True):
        q, keys, _, pos = case
        assert_clear_of_ties(q[0], keys[0], pos, pos, window, kw.get("softcap"), kw["top_k"])
    out_r, n_r, grads_r = run(reference.blockwise_attention, case, window, **kw)
    out, n, grads = run(api.blockwise_attention, case, window, **options(impl, **kw))
    scale = float(jnp.abs(out_r).max())
    np.testing.assert_allclose(out, out_r, rtol=rtol, atol=rtol * scale + 1e-6)
    np.testing.assert_array_equal(n, n_r)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        assert a.dtype == b.dtype
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=grad_rtol, atol=grad_rtol * scale + 1e-7)
    return out, n


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_spark_local_window_with_padding(impl):
    # 136 tokens: two TPU key blocks; a window of 40 > k leaves the threshold to decide and
    # makes whole tiles dead; row 1 ends in padding (outputs 0, nothing attended).
    # Unit-scale inputs: at scale 2 the cap saturates many scores within float32 rounding of
    # theta (see assert_clear_of_ties).
    out, n = check(impl, make(True, 136, seed=3, scale=1.0), 40, softcap=5.0, top_k=5)
    assert float(jnp.abs(out[1, :, :, -3:]).max()) == 0.0
    assert float(n[1, :, :, -3:].max()) == 0.0
    assert float(n[0].max()) < 40  # the threshold dropped keys


# XLA's ring-cache geometry also runs in tests/decode (the blockwise prefill).
@pytest.mark.parametrize("impl", some_slow("xla"))
def test_spark_chunk_over_a_ring_cache(impl):
    """A prefill chunk's geometry: 20 queries at positions 150-169 over 170 keys, a ring of
    150 cached slots (positions out of order, 12 empty) then the chunk's own, window 37."""
    rng = np.random.default_rng(5)
    t, s = 20, 170
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 2, jnp.float32)  # noqa: E731
    q = (arr(B, K, G, t, R), arr(B, K, G, t, H - R))
    keys, v = (arr(B, K, s, R), arr(B, K, s, H - R)), arr(B, K, s, H)
    ring = np.roll(np.arange(150, dtype=np.int32), 61)
    ring[rng.choice(150, 12, replace=False)] = -1
    q_pos = np.broadcast_to(np.arange(150, 170, dtype=np.int32), (B, t)).copy()
    q_pos[1, :4] = -1  # a left-padded row
    k_pos = np.concatenate([np.broadcast_to(ring, (B, 150)), q_pos], axis=1)
    cotangent = jax.random.normal(jax.random.key(3), (B, K, G, t, H))
    kw = dict(softcap=5.0, top_k=5)
    assert_clear_of_ties(q[0], keys[0], q_pos, k_pos, 37, **kw)
    fns = {
        "ref": functools.partial(reference.blockwise_attention, **kw),
        "impl": functools.partial(api.blockwise_attention, **options(impl, **kw)),
    }
    results = {}
    for name, fn in fns.items():

        def loss(q, keys, v, fn=fn):
            out, n = fn(q, keys, v, jnp.asarray(q_pos), jnp.asarray(k_pos), 37)
            return jnp.sum(out * cotangent), (out, n)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        results[name] = step(q, keys, v)
    (_, (out_r, n_r)), grads_r = results["ref"]
    (_, (out, n)), grads = results["impl"]
    np.testing.assert_allclose(out, out_r, rtol=1e-5, atol=1e-5 * float(jnp.abs(out_r).max()))
    np.testing.assert_array_equal(n, n_r)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)


@pytest.mark.parametrize("impl", some_slow("xla", "pallas_tpu"))
def test_dense_global_with_and_without_cap(impl):
    case = make(False, 40)
    check(impl, case, 1 << 20, softcap=5.0)
    check(impl, case, 1 << 20)


# spark_local has such rows; the native kernels are quick enough to run by default.
@pytest.mark.parametrize("impl", some_slow("xla", "pallas_tpu", "pallas_gpu"))
def test_spark_rows_with_few_keys_keep_them_all(impl):
    # A window of 4 <= k = 5: every row keeps every valid key; so does enabled=False.
    case = make(True, 24)
    _, n = check(impl, case, 4, softcap=None, top_k=5)
    np.testing.assert_array_equal(n[0, 0, 0], np.minimum(np.arange(1, 25), 4))
    _, n = check(impl, case, 1 << 20, top_k=2, enabled=False)
    np.testing.assert_array_equal(n[0, 0, 0], np.arange(1, 25))


@pytest.mark.skipif(not NATIVE, reason="the native CPU kernels are not built")
def test_native_spark_on_every_instruction_set():
    """The native kernels' vector code per instruction set this CPU runs (AVX-512, AVX2,
    plain x86-64): forward, counts and gradients against the reference, local and global."""
    case = make(True, 136, seed=3, scale=1.0)
    for isa in _native.supported_isas():
        with using_isa(isa):
            check("native", case, 40, softcap=5.0, top_k=5)
            check("native", case, 1 << 20, softcap=5.0, top_k=9)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_degenerate_inputs(impl):
    """Ties (zero queries and keys), huge scores under the cap, and an all-padding row."""
    q, keys, v, pos = make(True, 24)
    zeros = tuple(jnp.zeros_like(x) for x in q), tuple(jnp.zeros_like(x) for x in keys)
    check(impl, (*zeros, v, pos), 1 << 20, softcap=5.0, top_k=4)
    huge = tuple(jnp.full_like(x, 1e4) for x in q), tuple(jnp.full_like(x, 1e4) for x in keys)
    # softplus of a huge gate reaches 1e9: relative error.
    check(impl, (*huge, v, pos), 1 << 20, rtol=1e-4, grad_rtol=1e-4, softcap=5.0, top_k=4)
    empty = pos.at[1].set(-1)
    out, n = check(impl, (q, keys, v, empty), 1 << 20, softcap=5.0, top_k=4)
    assert float(jnp.abs(out[1]).max()) == 0.0 and float(n[1].max()) == 0.0
    opts = options(impl, softcap=5.0, top_k=4)
    _, _, grads = run(api.blockwise_attention, (q, keys, v, empty), 1 << 20, **opts)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("impl", some_slow("xla", "pallas_tpu"))
def test_bfloat16_inputs(impl):
    case = make(True, 40, jnp.bfloat16)
    out_r, n_r, grads_r = run(reference.blockwise_attention, case, 12, softcap=5.0, top_k=5)
    out, n, grads = run(api.blockwise_attention, case, 12, **options(impl, softcap=5.0, top_k=5))
    # Same bf16 operands; sums differ in order and in the bf16 rounding of the weights, and a
    # score at the threshold may fall on the other side.
    np.testing.assert_allclose(out, out_r, rtol=3e-2, atol=3e-2)
    assert float(jnp.mean(jnp.abs(n - n_r))) < 0.05
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        assert a.dtype == jnp.bfloat16
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.abs(a - b).mean()) < 2e-2 * float(jnp.abs(b).mean()) + 1e-3


def test_reference_equals_the_model_attention():
    """The oracle against the model's own materialized attention (independent code)."""
    cfg = ModelConfig(
        num_heads=K * G, num_kv_heads=K, head_dim=H, attn_kind="spark", ffn_kind="spark",
        attn_top_k=5, attn_logit_softcap=5.0, max_seq_len=64,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((B, 30, K * G, H)) * 2, jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, 30, K, H)) * 2, jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, 30, K, H)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(30), (B, 30)).at[1, -4:].set(-1)
    seg = A.key_entries(cfg, k, v, pos)
    want, want_n = jax.jit(lambda q, seg: A.attend_masked(cfg, q, [seg], pos, 9, guarded=True))(
        q, seg
    )
    qg = A._grouped(cfg, q)
    parts = (qg[..., :R] * cfg.resolved_predictor_query_scale, A._gate_query(cfg, qg))
    oracle = jax.jit(functools.partial(reference.blockwise_attention, softcap=5.0, top_k=5))
    out, n = oracle(parts, (seg["k_pred"], seg["k_rest"]), seg["v"], pos, pos, 9)
    np.testing.assert_allclose(A._ungroup(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n.reshape(want_n.shape), want_n)


def test_block_sizes_are_validated_per_backend():
    q, keys, v, pos = make(False, 16)
    bad = [
        ("pallas_tpu", dict(block_q=12, block_k=128), "block_q=12 must be a multiple of 8"),
        ("pallas_tpu", dict(block_q=8, block_k=64), "block_k=64 must be a multiple of 128"),
        ("pallas_gpu", dict(block_q=24, block_k=16), "block_q=24 must be a power of two >= 16"),
        ("pallas_gpu", dict(block_q=16, block_k=8), "block_k=8 must be a power of two >= 16"),
        ("xla", dict(block_q=0, block_k=8), "block_q=0 must be an integer >= 1"),
    ]
    bf16 = tuple(x.astype(jnp.bfloat16) for x in q)
    for impl, blocks, message in bad:
        with pytest.raises(ValueError, match=message):
            api.blockwise_attention(
                q, keys, v, pos, pos, 8, implementation=impl, interpret=impl != "xla", **blocks
            )
    # 16-bit inputs on TPU: query blocks of 16 rows (Mosaic packs two rows per sublane).
    with pytest.raises(ValueError, match="block_q=8 must be a multiple of 16"):
        api.blockwise_attention(
            bf16, keys, v, pos, pos, 8, implementation="pallas_tpu", interpret=True, block_q=8,
            block_k=128,
        )  # fmt: skip


@pytest.mark.parametrize(("impl", "platform"), [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
@pytest.mark.parametrize("spark", [False, True], ids=["dense", "spark"])
def test_forward_and_backward_lower_to_platform_kernels(impl, platform, spark):
    """The 2B preset's head (H 256, R 128 predictor half) at 512 tokens, bfloat16: the
    forward and gradient kernels (moments, attention, dq, dk/dv) all lower."""
    bf16, t, h, r = jnp.bfloat16, 512, 256, 128
    widths = (r, h - r) if spark else (h,)
    q = tuple(jax.ShapeDtypeStruct((1, 1, 8, t, w), bf16) for w in widths)
    keys = tuple(jax.ShapeDtypeStruct((1, 1, t, w), bf16) for w in widths)
    v = jax.ShapeDtypeStruct((1, 1, t, h), bf16)
    settings = pallas.Settings(impl, 128, 128, 50.0, 128 if spark else 0, False)

    def train(q, keys, v):
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
        window, on = jnp.int32(4096), jnp.bool_(True)

        def loss(q, keys, v):
            return jnp.sum(pallas.attention(q, keys, v, pos, pos, window, on, settings)[0])

        return jax.grad(loss, argnums=(0, 1, 2))(q, keys, v)

    text = lowered_text(train, (q, keys, v), platform)
    marker = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
    assert text.count(marker) == (4 if spark else 3)  # (moments), attention, dq, dk/dv
