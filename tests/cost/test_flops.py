"""Cost accounting against the instantiated model and XLA's cost analysis."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from configs import get_model_config
from sparse_jax.cost import flops
from sparse_jax.model.transformer import abstract_params, count_params, forward, init_params


@pytest.mark.parametrize("name", ["tiny", "tiny_dense", "small", "small_dense"])
def test_param_count_equals_instantiated_tree(name):
    cfg = get_model_config(name)
    assert flops.param_count(cfg) == count_params(init_params(cfg, jax.random.key(0)))


@pytest.mark.parametrize("name", ["gemma2_2b", "spark_gemma2_2b"])
def test_param_count_equals_abstract_tree_for_2b(name):
    cfg = get_model_config(name)
    assert flops.param_count(cfg) == count_params(abstract_params(cfg))


def test_2b_presets_have_equal_parameters_and_spark_ffn_costs_3_5x_less():
    dense, spark = get_model_config("gemma2_2b"), get_model_config("spark_gemma2_2b")
    assert abs(flops.param_count(spark) / flops.param_count(dense) - 1) < 0.01
    d = flops.decode_flops(dense, 8192, sparse=False)
    s = flops.decode_flops(spark, 8192, sparse=True)
    assert 3.4 < d.ffn / s.ffn < 3.6  # docs/method.md: about 3.5x fewer FFN FLOPs
    ratio = flops.flops_ratio(dense, spark, 8192)
    assert 2.0 < ratio["with_unembed"] < ratio["without_unembed"] < 2.7


@pytest.mark.parametrize("name", ["small_dense", "small", "tiny"])
def test_forward_flops_agree_with_xla_cost_analysis(name):
    # XLA counts a scan body once, so compare against the unrolled layer loop.
    cfg = dataclasses.replace(get_model_config(name), scan_layers=False)
    tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    compiled = (
        jax.jit(lambda p, t: forward(cfg, p, t)[0]).lower(abstract_params(cfg), tokens).compile()
    )
    xla = compiled.cost_analysis()["flops"]
    assert abs(xla / flops.forward_flops(cfg, 2, 128) - 1) < 0.10


def test_dense_model_sparse_flops_equal_dense_equivalent():
    cfg = get_model_config("small_dense")
    assert flops.decode_flops(cfg, 300, True) == flops.decode_flops(cfg, 300, False)
    with pytest.raises(ValueError, match="context"):
        flops.decode_flops(cfg, 0, True)
    per_token = flops.train_flops_per_token(get_model_config("tiny"), 64)
    assert per_token["sparse"] < per_token["dense_equivalent"]
