"""Checkpoints move between meshes: a run saved on one device resumes on 8 devices, and a
checkpoint, whoever wrote it, loads whole on one device or sharded on 8 with the same values."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
import sharding_cases as cases
from micro_configs import MICRO_MODEL
from tolerances import SHARDED_LOGITS

from configs import get_model_config, get_train_config
from sparse_jax.model.config import override
from sparse_jax.model.transformer import forward
from sparse_jax.parallel.sharding import TOKENS, ShardingPlan, make_mesh
from sparse_jax.serve.loading import load
from sparse_jax.train.loop import train

MESH = "data=2,fsdp=2,tensor=2"


_forward = jax.jit(forward, static_argnums=0, static_argnames="plan")


def _logits(loaded, tokens, plan=None):
    return _forward(loaded.config, loaded.params, tokens, plan=plan)[0]


def _assert_same_values(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Slow: tests/serve/test_loading.py loads an 8-device checkpoint on one device, and
# tests/train/test_migrate.py loads a checkpoint sharded over 8 devices, in the default run.
@pytest.mark.slow
def test_checkpoints_move_between_one_and_eight_devices(tmp_path, caplog):
    model = override(get_model_config("tiny"), MICRO_MODEL)
    tc = override(get_train_config("tiny"), [*cases.MICRO_TRAIN, "steps=2"])
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    train(model, tc, single, verbose=False)
    shutil.copytree(single, sharded)
    caplog.set_level("INFO")
    summary = train(model, dataclasses.replace(tc, steps=3, mesh=MESH), sharded, verbose=False)
    assert "resumed from step 2" in caplog.text  # saved on one device, restored on 8
    assert np.isfinite(summary["loss"])

    plan = ShardingPlan(make_mesh(MESH))
    device = jax.local_devices()[0]
    tokens = jax.random.randint(jax.random.key(0), (8, 32), 0, model.vocab_size)
    for path in (single, sharded):  # saved by one device, and by 8
        whole = load(path)
        assert all(a.sharding.device_set == {device} for a in jax.tree.leaves(whole.params))
        split = load(path, shardings=plan.tree_shardings)
        _assert_same_values(split.params, whole.params)
        k1 = split.params["layers"]["ffn"]["k1"]
        assert k1.sharding == plan.tree_shardings(split.params)["layers"]["ffn"]["k1"]
        assert k1.addressable_shards[0].data.shape == (2, 48, 8)  # [L, F/tensor, R/fsdp]
        split_tokens = jax.device_put(tokens, plan.sharding(TOKENS, tokens.shape))
        np.testing.assert_allclose(
            _logits(split, split_tokens, plan), _logits(whole, tokens), **SHARDED_LOGITS
        )
