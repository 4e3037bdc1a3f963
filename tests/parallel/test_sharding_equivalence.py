"""Sharded == single device on 8 CPU devices, data parallel and fully sharded data parallel:
the forward pass and one training step (with gradient accumulation) agree."""

import pytest
import sharding_cases as cases


@pytest.fixture(scope="module")
def start_and_reference():
    state = cases.initial_state()
    return state, cases.single_device_result(state)


@pytest.mark.parametrize("mesh", ["data=8", "fsdp=8"])
def test_data_parallel_equals_single_device(mesh, start_and_reference):
    cases.check_sharded_equals_single_device(mesh, 8, *start_and_reference)
