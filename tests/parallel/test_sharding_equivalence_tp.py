"""Sharded == single device on CPU devices, tensor parallel (4 devices) and data x tensor
parallel (8): the forward pass and one training step (with gradient accumulation) agree."""

import pytest
import sharding_cases as cases


@pytest.fixture(scope="module")
def start_and_reference():
    state = cases.initial_state()
    return state, cases.single_device_result(state)


@pytest.mark.parametrize(("mesh", "devices"), [("tensor=4", 4), ("data=4,tensor=2", 8)])
def test_tensor_parallel_equals_single_device(mesh, devices, start_and_reference):
    cases.check_sharded_equals_single_device(mesh, devices, *start_and_reference)
