"""The decode bandwidth bound reproduces the ratios the project's targets quote (2B presets)."""

import dataclasses

import pytest

from configs import get_model_config
from sparse_jax.cost.decode_bytes import attention_op_bytes, ffn_block_bytes, step_bytes

DENSE = get_model_config("gemma2_2b")
SPARK = get_model_config("spark_gemma2_2b")


def _long(cfg, context):
    return dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, context))


@pytest.mark.parametrize(
    ("context", "ratio"), [(128, 1.82), (2048, 1.84), (8192, 1.92), (32768, 2.12)]
)
def test_batch_one_bound_ratio(context, ratio):
    dense = step_bytes(_long(DENSE, context), 1, context)["total"]
    spark = step_bytes(_long(SPARK, context), 1, context)["total"]
    assert dense / spark == pytest.approx(ratio, abs=0.01)


def test_ffn_attention_and_batch_eight_ratios():
    assert ffn_block_bytes(DENSE) / ffn_block_bytes(SPARK) == pytest.approx(3.5, abs=0.05)
    long_dense, long_spark = _long(DENSE, 32768), _long(SPARK, 32768)
    ratio = attention_op_bytes(long_dense, 32768) / attention_op_bytes(long_spark, 32768)
    assert ratio == pytest.approx(3.8, abs=0.05)
    weights = step_bytes(DENSE, 8, 128)["weights"] / step_bytes(SPARK, 8, 128)["weights"]
    assert weights == pytest.approx(1.34, abs=0.01)


def test_float32_dense_step_reads_the_whole_model():
    # About 2.6B parameters in float32, all read once per batch-1 step (plus a small cache).
    assert step_bytes(DENSE, 1, 128)["weights"] == pytest.approx(10.5e9, rel=0.01)
    half = dataclasses.replace(DENSE, param_dtype="bfloat16")
    assert step_bytes(half, 1, 128)["weights"] * 2 == step_bytes(DENSE, 1, 128)["weights"]


def test_sparsity_switched_off_counts_as_dense():
    off = dataclasses.replace(SPARK, ffn_sparse_layers=(False,) * SPARK.num_layers)
    assert step_bytes(off, 1, 128)["ffn"] == pytest.approx(step_bytes(DENSE, 1, 128)["ffn"])
