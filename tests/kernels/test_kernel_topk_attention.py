"""Top-k decode attention (GQA): every implementation against the reference."""

import functools

import jax
import jax.numpy as jnp
import kernel_test_base as base
import numpy as np
import pytest

from pallas_kernels.topk_attention import (
    BlockSizes,
    pallas_gpu,
    pallas_tpu,
    reference,
    topk_attention,
)


def make_inputs(batch, heads, kv_heads, seq, selected, rest_dim, head_dim, dtype, seed=0):
    """(q_rest, p, idx, k_rest, v); the last slot of (0, 0) is padding (p = 0)."""
    gen = base.rng(seed)
    q_rest = gen.standard_normal((batch, heads, rest_dim)) / np.sqrt(rest_dim)
    logits = gen.standard_normal((batch, heads, selected))
    p = np.exp(logits) / np.sum(np.exp(logits), axis=-1, keepdims=True)
    idx = gen.integers(0, seq, (batch, heads, selected), dtype=np.int32)
    p[0, 0, -1], idx[0, 0, -1] = 0.0, idx[0, 0, 0]
    k_rest = gen.standard_normal((batch, kv_heads, seq, rest_dim))
    v = gen.standard_normal((batch, kv_heads, seq, head_dim))
    q_rest, p, k_rest, v = (base.to_device(a, dtype) for a in (q_rest, p, k_rest, v))
    return q_rest, p, jnp.asarray(idx), k_rest, v


class TestTopkAttention(base.KernelTestBase):
    # (B, N, K, S, A, H-R, H): MHA and GQA; A not a multiple of the block.
    CASES = ((1, 2, 2, 32, 16, 16, 32), (2, 4, 2, 24, 11, 24, 40))
    BLOCK_SIZES = BlockSizes(selected=8, columns=16)
    IMPLEMENTATIONS = (*base.IMPLEMENTATIONS, *base.NATIVE)
    OP = staticmethod(topk_attention)
    REFERENCE = staticmethod(reference.topk_attention)

    def make_case(self, case, dtype):
        return make_inputs(*case, dtype), {}

    def lowering_case(self, implementation):
        # Gemma-2 2B decode: N 8, K 4, H 256, R 128, 256 keys selected from an 8192 cache.
        module = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[implementation]
        bf16 = jnp.bfloat16
        args = (
            jax.ShapeDtypeStruct((2, 8, 128), bf16),
            jax.ShapeDtypeStruct((2, 8, 256), jnp.float32),
            jax.ShapeDtypeStruct((2, 8, 256), jnp.int32),
            jax.ShapeDtypeStruct((2, 4, 8192, 128), bf16),
            jax.ShapeDtypeStruct((2, 4, 8192, 256), bf16),
        )
        return functools.partial(module.topk_attention, block_sizes=BlockSizes()), args


def test_reference_matches_a_loop_over_heads():
    args = make_inputs(2, 4, 2, 10, 3, 4, 6, jnp.float32)
    q_rest, p, idx, k_rest, v = (np.asarray(a) for a in args)
    expected = np.zeros((2, 4, 6), np.float32)
    for b in range(2):
        for n in range(4):
            kv = n // 2
            scores = k_rest[b, kv, idx[b, n]] @ q_rest[b, n]
            expected[b, n] = (p[b, n] * np.logaddexp(scores, 0.0)) @ v[b, kv, idx[b, n]]
    actual = jax.jit(reference.topk_attention)(*args)
    base.assert_close(actual, jnp.asarray(expected), jnp.float32)


def test_api_rejects_heads_not_a_multiple_of_kv_heads():
    args = make_inputs(1, 3, 2, 8, 2, 4, 4, jnp.float32)
    with pytest.raises(ValueError, match="multiple of K"):
        jax.eval_shape(topk_attention, *args)


def test_api_rejects_mismatched_caches():
    q_rest, p, idx, k_rest, v = make_inputs(1, 2, 1, 8, 2, 4, 4, jnp.float32)
    short_v = jax.ShapeDtypeStruct((1, 1, 4, 4), jnp.float32)
    with pytest.raises(ValueError, match="v must be"):
        jax.eval_shape(topk_attention, q_rest, p, idx, k_rest, short_v)
    narrow_k = jax.ShapeDtypeStruct((1, 1, 8, 3), jnp.float32)
    with pytest.raises(ValueError, match="k_rest must be"):
        jax.eval_shape(topk_attention, q_rest, p, idx, narrow_k, v)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"selected": 2}, "BlockSizes.selected"), ({"columns": 48}, "BlockSizes.columns")],
)
def test_block_sizes_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**kwargs)


def test_runs_per_shard_under_a_mesh():
    mesh = base.make_mesh("data", "tensor")
    args = make_inputs(2, 4, 2, 16, 8, 16, 16, jnp.float32)
    out = jax.jit(
        lambda *a: topk_attention(
            *a, implementation="pallas_gpu", interpret=True, mesh=mesh,
            block_sizes=BlockSizes(selected=8, columns=16),
        )
    )(*args)  # fmt: skip
    base.assert_close(out, reference.topk_attention(*args), jnp.float32)
