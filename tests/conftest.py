"""Test session set-up and the fixtures several test modules share.

8 host CPU devices for the sharding tests are asked for before jax is imported (unless
XLA_FLAGS names a device count), beside any other XLA flags.
"""

import logging
import os

import pytest
from xla_env import xla_flags

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """The serving tests' micro model, trained once per session by ``train.py`` (read only)."""
    from serve_cases import train_checkpoint

    return train_checkpoint(tmp_path_factory.mktemp("served"))


@pytest.fixture
def restore_logging():
    """The scripts' ``main`` configures the root logger: a test that calls one in this process
    gets the logger's handlers and level back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
