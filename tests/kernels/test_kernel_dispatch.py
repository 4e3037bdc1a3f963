"""Implementation dispatch fails fast, and the lowering check rejects what Mosaic rejects."""

import jax
import jax.numpy as jnp
import kernel_test_base as base
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import ImplementationUnavailableError, _native, statistical_topk
from pallas_kernels._common import dispatch


def test_auto_picks_the_backends_implementation():
    cpu = "native" if _native.available() else "xla"
    expected = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cpu": cpu}.get(
        jax.default_backend(), "xla"
    )
    assert dispatch.resolve_implementation("auto", interpret=False) == expected


def test_native_off_cpu_or_interpreted_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="interpret=True applies"):
        dispatch.resolve_implementation("native", True)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ImplementationUnavailableError, match="runs on the 'cpu' backend"):
        dispatch.resolve_implementation("native", False)


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_pallas_on_the_wrong_backend_fails_fast(implementation):
    if {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}[implementation] == jax.default_backend():
        pytest.skip("this backend runs the implementation")
    with pytest.raises(ImplementationUnavailableError, match="interpret=True"):
        statistical_topk(jnp.zeros((2, 16)), 2, implementation=implementation)


@pytest.mark.parametrize(
    ("implementation", "interpret", "message"),
    [("triton", False, "implementation must be"), ("xla", True, "interpret=True applies")],
)
def test_bad_implementation_requests_are_rejected(implementation, interpret, message):
    with pytest.raises(ValueError, match=message):
        dispatch.resolve_implementation(implementation, interpret)


def test_tpu_lowering_rejects_a_misaligned_block():
    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def bad(x):
        block = pl.BlockSpec((4, 100), lambda i: (i, 0))
        return pl.pallas_call(copy, grid=(4,), in_specs=[block], out_specs=block, out_shape=x)(x)

    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        base.lowered_text(bad, (jax.ShapeDtypeStruct((16, 200), jnp.float32),), "tpu")
