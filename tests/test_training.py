"""Training: exact resume after kill -9 and SIGTERM, bad checkpoints, NaN stop, accumulation."""

import dataclasses
import functools
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from micro_configs import MICRO_MODEL, MICRO_TRAIN
from tolerances import ACCUMULATED_GRADIENT, REORDER

from configs import get_model_config, get_train_config
from sparse_jax.checkpoint import CheckpointError
from sparse_jax.config import override
from sparse_jax.loading import load
from sparse_jax.optim import make_optimizer
from sparse_jax.train_config import TrainConfig
from sparse_jax.train_step import accumulate_gradients, init_train_state, make_train_step
from sparse_jax.trainer import TrainingDiverged, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def micro_configs(**train_changes):
    model = override(get_model_config("tiny"), MICRO_MODEL)
    tc = override(get_train_config("tiny"), MICRO_TRAIN)
    return model, dataclasses.replace(tc, **train_changes)


def _run_cli(workdir, extra=(), **popen):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", str(workdir)]
    cmd += ["--set", *MICRO_MODEL, *MICRO_TRAIN, *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
    )


def _wait_for_step(workdir, target, proc, timeout=180):
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        if metrics.exists():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x]
            if steps and max(steps) >= target:
                return
        time.sleep(0.05)
    raise TimeoutError(f"step {target} not reached")


def _params(workdir):
    return load(workdir).params


def _assert_bitwise_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run_cli(workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    return workdir


def test_kill_9_then_rerun_is_bitwise_identical(reference_run, tmp_path):
    proc = _run_cli(tmp_path)
    _wait_for_step(tmp_path, random.Random(0).randint(3, 9), proc)
    proc.kill()  # SIGKILL: no chance to save; an async save may be cut short
    proc.wait()
    rerun = _run_cli(tmp_path)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out.decode()
    assert load(tmp_path).step == 12
    _assert_bitwise_equal(_params(tmp_path), _params(reference_run))


def test_sigterm_saves_exits_zero_and_resumes_identically(reference_run, tmp_path):
    proc = _run_cli(tmp_path)
    _wait_for_step(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()
    stopped_at = load(tmp_path).step
    assert 5 <= stopped_at < 12  # saved the step it was on, not only the last multiple of 2
    rerun = _run_cli(tmp_path)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out.decode()
    assert f"resumed from step {stopped_at}" in out.decode()
    _assert_bitwise_equal(_params(tmp_path), _params(reference_run))


def test_truncated_latest_checkpoint_is_skipped(tmp_path, caplog):
    model, tc = micro_configs(steps=4)
    train(model, tc, tmp_path, verbose=False)
    latest = tmp_path / "checkpoints" / "4" / "state"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate array data
    summary = train(model, dataclasses.replace(tc, steps=6), tmp_path, verbose=False)
    assert "step 4 failed to restore" in caplog.text
    assert len(list((tmp_path / "checkpoints_unreadable").iterdir())) == 1  # kept, not deleted
    assert summary["step"] == 6
    reference = tmp_path / "ref"
    train(model, dataclasses.replace(tc, steps=6), reference, verbose=False)
    _assert_bitwise_equal(_params(tmp_path), _params(reference))


def test_mismatched_config_is_rejected(tmp_path):
    model, tc = micro_configs(steps=2)
    train(model, tc, tmp_path, verbose=False)
    with pytest.raises(CheckpointError, match="num_layers: checkpoint 2 != run 3"):
        train(override(model, ["num_layers=3"]), tc, tmp_path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, tc = micro_configs(steps=2)
    train(model, tc, tmp_path, verbose=False)
    before = _params(tmp_path)
    bad = dataclasses.replace(tc, steps=8, learning_rate=1e30, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        train(model, bad, tmp_path, verbose=False)
    assert load(tmp_path).step < 8
    if load(tmp_path).step == 2:
        _assert_bitwise_equal(_params(tmp_path), before)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(_params(tmp_path)))


def _random_batch(key, rows, cfg, seq=16):
    tokens = jax.random.randint(key, (rows, seq + 1), 0, cfg.vocab_size)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "mask": jnp.ones((rows, seq), jnp.float32),
    }


def _allclose(a, b, tolerance):
    return all(
        np.allclose(np.asarray(x), np.asarray(y), **tolerance)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_gradient_accumulation_equals_one_big_batch():
    # Gradients, not updated parameters: Adam's 1/sqrt(v) magnifies the summation-order noise of
    # near-zero gradients past any tolerance that would still catch a real accumulation bug.
    model, _ = micro_configs()
    opt = make_optimizer(TrainConfig(batch_size=8, seq_len=16, warmup_steps=0))
    state = init_train_state(model, opt, 0)
    batch = _random_batch(jax.random.key(1), 8, model)
    grads = jax.jit(accumulate_gradients, static_argnums=(0, 3))
    whole, whole_loss, whole_count, _ = grads(model, state.params, batch, 1)
    micro, micro_loss, micro_count, _ = grads(model, state.params, batch, 4)
    assert float(whole_count) == float(micro_count) == 8 * 16
    np.testing.assert_allclose(micro_loss, whole_loss, **REORDER)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **ACCUMULATED_GRADIENT), micro, whole
    )
    # The tolerance still separates the bugs accumulation can have.
    three_of_four = jax.tree.map(lambda a: a[:6], batch)
    dropped, dropped_loss, _, _ = grads(model, state.params, three_of_four, 3)
    assert not _allclose(dropped, whole, ACCUMULATED_GRADIENT)
    assert not np.allclose(dropped_loss, whole_loss, **REORDER)
    for scale in (3 / 4, 2.0, 4.0, 1 / 4):  # a dropped sum term, or a wrong 1/n
        scaled = jax.tree.map(functools.partial(jnp.multiply, scale), micro)
        assert not _allclose(scaled, whole, ACCUMULATED_GRADIENT)
    # The step applies exactly this gradient: its reported norm and loss are the big batch's.
    _, metrics = make_train_step(model, opt, 4)(state, batch)
    np.testing.assert_allclose(metrics["loss"], whole_loss, **REORDER)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(whole), **REORDER)


def test_overfitting_one_batch_drives_loss_near_zero():
    model, _ = micro_configs()
    tc = TrainConfig(batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=5, steps=150)
    opt = make_optimizer(tc)
    state = init_train_state(model, opt, 0)
    step = make_train_step(model, opt, 1)
    batch = _random_batch(jax.random.key(2), 2, model)
    for _ in range(tc.steps):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.1


def test_bad_data_path_is_a_clear_error(tmp_path):
    model, tc = micro_configs(data_paths=(str(tmp_path / "missing.txt"),))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        train(model, tc, tmp_path / "run", verbose=False)


def test_cli_rejects_unknown_override(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path), "--set", "depth=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert out.returncode == 2 and "no such field" in out.stderr
