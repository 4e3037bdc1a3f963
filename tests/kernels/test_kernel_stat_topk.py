"""Statistical top-k: every implementation against the reference, plus the oracle's own laws."""

import functools

import jax
import jax.numpy as jnp
import kernel_test_base as base
import numpy as np
import pytest

from pallas_kernels.stat_topk import BlockSizes, pallas_gpu, pallas_tpu, reference, statistical_topk

# Small blocks so the interpreted kernels run several grid steps and column chunks.
SMALL_BLOCKS = BlockSizes(rows=8, columns=64)


def _valid_mask(shape, seed) -> jax.Array:
    """Random mask with the edge rows a causal mask produces: empty, one entry, few entries."""
    valid = base.rng(seed).random(shape).reshape(-1, shape[-1]) < 0.6
    valid[0] = False
    valid[1] = np.arange(shape[-1]) < 1
    valid[2] = np.arange(shape[-1]) < 3
    return jnp.asarray(valid.reshape(shape))


def _both_forms(topk, x, valid, **kwargs):
    # One compiled case covers both forms: [2, ...] = (soft, mask).
    return jnp.stack([topk(x, valid=valid, form=form, **kwargs) for form in reference.FORMS])


def _topk(x, valid, **kwargs):
    return _both_forms(statistical_topk, x, valid, **kwargs)


def _reference_topk(x, valid, **kwargs):
    return _both_forms(reference.statistical_topk, x, valid, **kwargs)


class TestStatisticalTopk(base.KernelTestBase, base.VjpTests):
    # (shape, k, masked); each case runs both forms.
    CASES = (((2, 3, 200), 20, False), ((20, 64), 8, True))
    VJP_CASES = (((6, 64), 8, False), ((6, 64), 8, True))
    BLOCK_SIZES = SMALL_BLOCKS
    OP = staticmethod(_topk)
    REFERENCE = staticmethod(_reference_topk)

    def make_case(self, case, dtype):
        shape, k, masked = case
        x = base.to_device(base.rng(sum(shape) + k).standard_normal(shape), dtype)
        valid = _valid_mask(shape, k) if masked else None
        return (x, valid), {"k": k}

    def compare(self, actual, expected, args, kwargs, dtype):
        x, valid = args
        base.assert_close(actual[0], expected[0], dtype)
        # The mask form is discontinuous at theta: entries within tolerance of the reference
        # threshold may fall either side (the moments are summed in a different order).
        theta, _ = jax.jit(reference.row_threshold, static_argnums=1)(x, kwargs["k"], valid)
        tol = base.tolerance(jnp.float32)
        near = jnp.abs(x.astype(jnp.float32) - theta) <= tol["atol"] + tol["rtol"] * jnp.abs(theta)
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(
            np.asarray(jnp.where(near, expected[1], actual[1])), np.asarray(expected[1])
        )

    def lowering_case(self, implementation):
        # Gemma-2 2B FFN row: F = 13824, keep 8% (k = 1106), bf16 activations.
        module = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[implementation]
        fn = functools.partial(
            module.statistical_topk,
            k=1106,
            form="soft",
            z=reference.quantile_z(1106, 13824),
            block_sizes=BlockSizes(),
        )
        return (
            lambda x, valid: fn(x, valid=valid),
            (jax.ShapeDtypeStruct((32, 13824), jnp.bfloat16), None),
        )

    @pytest.mark.parametrize(
        ("implementation", "platform"), [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")]
    )
    def test_masked_mask_form_lowers(self, implementation, platform):
        # Attention scores of 8 heads over an 8192-token cache, causal mask, k = 256.
        module = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[implementation]
        fn = functools.partial(
            module.statistical_topk, k=256, form="mask", z=None, block_sizes=BlockSizes()
        )
        args = (
            jax.ShapeDtypeStruct((64, 8192), jnp.float32),
            jax.ShapeDtypeStruct((64, 8192), jnp.bool_),
        )
        text = base.lowered_text(lambda x, v: fn(x, valid=v), args, platform)
        assert base.LOWERING_MARKERS[platform] in text


def test_reference_keeps_about_k_of_gaussian_entries():
    x = base.to_device(base.rng(0).standard_normal((64, 4096)), jnp.float32)
    kept = jnp.sum(jax.jit(reference.statistical_topk, static_argnums=1)(x, 256) > 0, axis=-1)
    assert abs(float(jnp.mean(kept)) - 256) < 0.1 * 256


def test_reference_masked_rows_follow_the_spec():
    x = base.to_device(base.rng(1).standard_normal((4, 32)) + 3.0, jnp.float32)
    valid = _valid_mask((4, 32), 2)
    soft, mask = jax.jit(_reference_topk, static_argnames="k")(x, valid, k=4)
    # Rows 1 and 2 have 1 and 3 <= k valid entries: every valid entry is kept unchanged.
    x, valid, soft, mask = (np.asarray(a) for a in (x, valid, soft, mask))
    assert np.all(soft[~valid] == 0)
    assert np.all(mask[~valid] == -np.inf)
    np.testing.assert_array_equal(soft[1:3], np.where(valid[1:3], x[1:3], 0.0))
    np.testing.assert_array_equal(mask[1:3], np.where(valid[1:3], x[1:3], -np.inf))
    # Row 3 has ~19 valid entries and is thresholded: fewer survive.
    assert np.sum(mask[3] > -np.inf) < np.sum(valid[3])


def test_unmasked_k_at_least_d_keeps_everything():
    x = base.to_device(base.rng(3).standard_normal((3, 16)), jnp.float32)
    for form in reference.FORMS:
        np.testing.assert_array_equal(statistical_topk(x, 16, form=form), x)
        np.testing.assert_array_equal(reference.statistical_topk(x, 20, form=form), x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 2.0}, "k must be"),
        ({"k": 2, "form": "hard"}, "form must be"),
        ({"k": 2, "valid": jnp.ones((3, 15), bool)}, "valid must have"),
    ],
)
def test_api_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        statistical_topk(jnp.zeros((3, 16)), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rows": 12}, "BlockSizes.rows"), ({"rows": 4}, "BlockSizes.rows"),
     ({"columns": 8}, "BlockSizes.columns"), ({"columns": True}, "BlockSizes.columns")],
)  # fmt: skip
def test_block_sizes_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**kwargs)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu"])
def test_runs_per_shard_under_a_mesh(implementation):
    mesh = base.make_mesh("data")
    x = base.to_device(base.rng(4).standard_normal((4, 64)), jnp.float32)
    valid = _valid_mask((4, 64), 5)
    out = jax.jit(
        lambda x, v: statistical_topk(
            x, 8, valid=v, implementation=implementation,
            interpret=implementation != "xla", mesh=mesh, block_sizes=SMALL_BLOCKS,
        )
    )(x, valid)  # fmt: skip
    base.assert_close(out, reference.statistical_topk(x, 8, valid=valid), jnp.float32)
