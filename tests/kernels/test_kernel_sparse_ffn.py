"""Sparse FFN over gathered neurons: every implementation against the reference."""

import functools

import jax
import jax.numpy as jnp
import kernel_test_base as base
import numpy as np
import pytest

from pallas_kernels.sparse_ffn import BlockSizes, pallas_gpu, pallas_tpu, reference, sparse_ffn


def make_inputs(batch, selected, ffn_dim, rest_dim, model_dim, dtype, seed=0):
    """(h, idx, x_rest, k2, v) with unit-scale outputs; the last slot of row 0 is padding."""
    gen = base.rng(seed)
    h = gen.standard_normal((batch, selected))
    idx = gen.integers(0, ffn_dim, (batch, selected), dtype=np.int32)
    # A padding slot repeats a valid index with h = 0.
    h[0, -1], idx[0, -1] = 0.0, idx[0, 0]
    x_rest = gen.standard_normal((batch, rest_dim))
    k2 = gen.standard_normal((ffn_dim, rest_dim)) / np.sqrt(rest_dim)
    v = gen.standard_normal((ffn_dim, model_dim)) / np.sqrt(selected)
    h, x_rest, k2, v = (base.to_device(a, dtype) for a in (h, x_rest, k2, v))
    return h, jnp.asarray(idx), x_rest, k2, v


class TestSparseFfn(base.KernelTestBase):
    # (B, A, F, D-R, D): A not a multiple of the block, widths not multiples of the chunk.
    CASES = ((1, 16, 64, 64, 128), (3, 21, 50, 40, 72))
    BLOCK_SIZES = BlockSizes(selected=8, columns=32)
    IMPLEMENTATIONS = (*base.IMPLEMENTATIONS, *base.NATIVE)
    OP = staticmethod(sparse_ffn)
    REFERENCE = staticmethod(reference.sparse_ffn)

    def make_case(self, case, dtype):
        return make_inputs(*case, dtype), {}

    def lowering_case(self, implementation):
        # Gemma-2 2B at 8% of F = 13824 neurons: A = 1106, D = 2304, R = 1024, bf16 weights.
        module = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[implementation]
        bf16 = jnp.bfloat16
        args = (
            jax.ShapeDtypeStruct((4, 1106), bf16),
            jax.ShapeDtypeStruct((4, 1106), jnp.int32),
            jax.ShapeDtypeStruct((4, 1280), bf16),
            jax.ShapeDtypeStruct((13824, 1280), bf16),
            jax.ShapeDtypeStruct((13824, 2304), bf16),
        )
        return functools.partial(module.sparse_ffn, block_sizes=BlockSizes()), args


def test_reference_matches_the_dense_formula():
    args = make_inputs(2, 5, 12, 6, 8, jnp.float32)
    h, idx, x_rest, k2, v = (np.asarray(a, np.float64) for a in args)
    dense_h = np.zeros((2, 12))
    np.add.at(dense_h, (np.arange(2)[:, None], idx.astype(int)), h)
    expected = ((x_rest @ k2.T) * dense_h) @ v
    actual = jax.jit(reference.sparse_ffn)(*args)
    base.assert_close(actual, jnp.asarray(expected, jnp.float32), jnp.float32)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 4), (2, 5), (2, 6), (9, 6), (9, 8)), "h and idx"),
        (((2, 4), (2, 4), (3, 6), (9, 6), (9, 8)), "x_rest"),
        (((2, 4), (2, 4), (2, 6), (9, 7), (9, 8)), "k2"),
        (((2, 4), (2, 4), (2, 6), (9, 6), (8, 8)), "v must"),
    ],
)
def test_api_rejects_inconsistent_shapes(shapes, message):
    h, idx, x_rest, k2, v = (jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    idx = jax.ShapeDtypeStruct(idx.shape, jnp.int32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(sparse_ffn, h, idx, x_rest, k2, v)


def test_api_rejects_float_indices():
    h, _, x_rest, k2, v = make_inputs(1, 4, 8, 4, 8, jnp.float32)
    with pytest.raises(ValueError, match="idx must be an integer"):
        sparse_ffn(h, h, x_rest, k2, v)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"selected": 4}, "BlockSizes.selected"), ({"selected": 24}, "BlockSizes.selected"),
     ({"columns": 0}, "BlockSizes.columns"), ({"columns": 32.0}, "BlockSizes.columns")],
)  # fmt: skip
def test_block_sizes_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**kwargs)


def test_runs_per_shard_under_a_mesh():
    mesh = base.make_mesh("data")
    args = make_inputs(2, 16, 32, 16, 32, jnp.float32)
    out = jax.jit(
        lambda *a: sparse_ffn(
            *a, implementation="pallas_gpu", interpret=True, mesh=mesh,
            block_sizes=BlockSizes(selected=8, columns=16),
        )
    )(*args)  # fmt: skip
    base.assert_close(out, reference.sparse_ffn(*args), jnp.float32)
