"""Training: exact resume after kill -9 and SIGTERM, damaged and unreadable checkpoints, refused
resumes, metrics after a resume, NaN stop, accumulation, and the CLI's errors."""

import dataclasses
import errno
import functools
import importlib.util
import json
import os
import pathlib
import random
import shutil
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
from micro_configs import micro_train_configs as micro_configs
from tolerances import ACCUMULATED_GRADIENT, REORDER

from sparse_jax.data.pipeline import DataConfig
from sparse_jax.kernels import Kernels
from sparse_jax.model.config import override
from sparse_jax.serve.loading import load
from sparse_jax.train.checkpoint import Checkpointer, CheckpointError
from sparse_jax.train.config import TrainConfig
from sparse_jax.train.loop import TrainingDiverged, train
from sparse_jax.train.metrics import MetricsWriter
from sparse_jax.train.optim import make_optimizer
from sparse_jax.train.step import accumulate_gradients, init_train_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _copy_run(reference_run, tmp_path, steps=None):
    """A copy of the reference workdir, keeping only checkpoint ``steps`` (default: all)."""
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if steps is not None and int(step_dir.name) not in steps:
            shutil.rmtree(step_dir)
    return workdir


def _metric_rows(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(row["step"], row["kind"]) for row in map(json.loads, lines)]


# The SIGTERM test below covers an interrupted run resuming identically in the default run.
@pytest.mark.slow
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
    # The steps replayed after the last checkpoint are logged once, as in one run.
    rows = [row for row in _metric_rows(tmp_path) if row[1] != "run"]
    assert rows == [row for row in _metric_rows(reference_run) if row[1] != "run"]


def test_sigterm_saves_exits_zero_and_resumes_identically(reference_run, tmp_path):
    proc = _run_cli(tmp_path)
    _wait_for_step(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()
    stopped_at = load(tmp_path).step
    assert 5 <= stopped_at < 12  # saved the step it was on, not only the last multiple of 2
    (summary,) = [x for x in out.decode().splitlines() if x.startswith(f"step {stopped_at} of")]
    assert summary.startswith(f"step {stopped_at} of 12 (stopped by a signal; checkpoint saved")
    assert ("nan" not in summary and "eval loss" in summary) or "not evaluated yet" in summary
    rerun = _run_cli(tmp_path)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out.decode()
    assert f"resumed from step {stopped_at}" in out.decode()
    _assert_bitwise_equal(_params(tmp_path), _params(reference_run))


def _truncate_arrays(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_truncated_latest_checkpoint_is_skipped(reference_run, tmp_path, caplog):
    workdir = _copy_run(reference_run, tmp_path)
    _truncate_arrays(workdir / "checkpoints" / "12")
    model, tc = micro_configs()
    caplog.set_level("INFO")
    summary = train(model, tc, workdir, verbose=False)
    assert "step 12 is damaged (train state: OUT_OF_RANGE reading state/d/" in caplog.text
    assert "resumed from step 10" in caplog.text
    assert len(list((workdir / "checkpoints_unreadable").iterdir())) == 1  # kept, not deleted
    assert summary["step"] == 12
    _assert_bitwise_equal(_params(workdir), _params(reference_run))


def test_when_no_checkpoint_restores_the_run_stops_unless_asked_to_restart(reference_run, tmp_path):
    workdir = _copy_run(reference_run, tmp_path)
    for step_dir in (workdir / "checkpoints").iterdir():
        _truncate_arrays(step_dir)
    model, tc = micro_configs()
    for _ in range(2):  # the second run finds the checkpoints moved aside by the first
        with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores") as err:
            train(model, tc, workdir, verbose=False)
        for step in (8, 10, 12):
            assert f"checkpoints_unreadable/{step}-" in str(err.value)
    moved = (workdir / "checkpoints_unreadable").iterdir()
    assert sorted(int(p.name.split("-")[0]) for p in moved) == [8, 10, 12]
    summary = train(model, tc, workdir, stop_after=1, restart_if_unreadable=True)
    assert summary["step"] == 1 and load(workdir).step == 1
    assert [row for row in _metric_rows(workdir) if row[0] > 1] == []  # the old run's rows


def test_a_failing_read_is_retried_and_never_moves_the_checkpoint(
    reference_run, tmp_path, monkeypatch, caplog
):
    workdir = _copy_run(reference_run, tmp_path, steps=(12,))
    model, tc = micro_configs()
    target = init_train_state(model, make_optimizer(tc), tc.seed)
    real_restore = Checkpointer.restore
    failures = {"left": 2}

    def flaky_restore(self, step, state):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_restore(self, step, state)

    monkeypatch.setattr(Checkpointer, "restore", flaky_restore)
    with Checkpointer(workdir / "checkpoints", retry_delay_s=0.0) as ckpt:
        assert ckpt.restore_latest(target, model).step == 12  # third attempt
        assert caplog.text.count("retrying") == 2
        failures["left"] = 3
        with pytest.raises(CheckpointError, match=r"could not be read in 3 attempts \(OSError"):
            ckpt.restore_latest(target, model)
    assert (workdir / "checkpoints" / "12" / "state").is_dir()
    assert not (workdir / "checkpoints_unreadable").exists()


def test_metrics_past_the_restored_step_are_dropped(tmp_path):
    rows = [(0, "run"), (1, "train"), (2, "train"), (2, "eval"), (2, "run"), (3, "train")]
    lines = [json.dumps({"step": step, "kind": kind}) for step, kind in rows]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "ki')  # cut short
    with MetricsWriter(tmp_path, total_steps=6, start_step=2, enabled=True) as writer:
        writer.write(2, "run", {"unigram_entropy": 1.0})
        writer.write(3, "train", {"loss": 2.0})
    assert _metric_rows(tmp_path) == [*rows[:4], (2, "run"), (3, "train")]


def test_a_run_without_eval_set_reports_none(tmp_path):
    model, tc = micro_configs(steps=1, data=dict(eval_fraction=0.0))
    summary = train(model, tc, tmp_path)
    assert summary["has_eval_set"] is False and summary["eval_step"] is None
    assert [kind for _, kind in _metric_rows(tmp_path)] == ["run", "train"]
    cli = _train_script()
    assert "no eval set (eval_fraction=0)" in cli.summary_line(summary)
    assert "eval loss" not in cli.summary_line(summary)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(learning_rate=1e-2), "learning_rate 0.003 -> 0.01"),
        (dict(steps=20), "steps 12 -> 20"),
        (dict(warmup_steps=0), "warmup_steps 30 -> 0"),
        (dict(seed=1), "TrainConfig.seed=1 but the checkpoint at step 8 .* seed=0"),
    ],
)
def test_resuming_mid_run_refuses_a_changed_schedule_or_seed(
    reference_run, tmp_path, change, named
):
    workdir = _copy_run(reference_run, tmp_path, steps=(8,))
    model, tc = micro_configs(**change)
    with pytest.raises(CheckpointError, match=named):
        train(model, tc, workdir, verbose=False)
    assert (workdir / "checkpoints" / "8").is_dir()


def test_mismatched_config_is_rejected(reference_run, tmp_path):
    model, tc = micro_configs()
    workdir = _copy_run(reference_run, tmp_path)
    with pytest.raises(CheckpointError, match="num_layers: checkpoint 2 != run 3"):
        train(override(model, ["num_layers=3"]), tc, workdir)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(reference_run, tmp_path):
    model, tc = micro_configs()
    workdir = _copy_run(reference_run, tmp_path)
    before = _params(workdir)
    bad = dataclasses.replace(tc, steps=20, learning_rate=1e30, warmup_steps=0)
    # Soft-capped logits keep the loss finite one step after the parameters overflow.
    with pytest.raises(TrainingDiverged, match=r"loss is nan|parameters NaN or Inf"):
        train(model, bad, workdir, verbose=False, allow_schedule_change=True)
    assert load(workdir).step < 20
    if load(workdir).step == 12:
        _assert_bitwise_equal(_params(workdir), before)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(_params(workdir)))


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
    opt = make_optimizer(TrainConfig(data=DataConfig(batch_size=8, seq_len=16), warmup_steps=0))
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
    # The tolerance still separates the bugs accumulation can have. A micro-batch of masked
    # rows adds nothing: the mean over the other three, as if the fourth had been dropped.
    three_of_four = {**batch, "mask": batch["mask"].at[6:].set(0.0)}
    dropped, dropped_loss, _, _ = grads(model, state.params, three_of_four, 4)
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
    tc = TrainConfig(
        data=DataConfig(batch_size=2, seq_len=16), learning_rate=1e-2, warmup_steps=5, steps=150
    )
    opt = make_optimizer(tc)
    state = init_train_state(model, opt, 0)
    step = make_train_step(model, opt, 1)
    batch = _random_batch(jax.random.key(2), 2, model)
    for _ in range(tc.steps):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.1


def test_the_train_step_runs_the_chosen_kernels():
    model, tc = micro_configs()
    opt = make_optimizer(tc)
    state = jax.eval_shape(lambda: init_train_state(model, opt, 0))
    batch = jax.eval_shape(lambda: _random_batch(jax.random.key(2), 2, model))

    def traced(kernels):
        step = make_train_step(model, opt, 1, kernels=kernels)
        return str(jax.make_jaxpr(lambda s, b: step(s, b))(state, batch))

    assert "stat_topk_tpu" in traced(Kernels("pallas_tpu", interpret=True))
    assert "stat_topk_tpu" not in traced(Kernels("xla"))


def test_bad_data_path_is_a_clear_error(tmp_path):
    model, tc = micro_configs(data=dict(paths=(str(tmp_path / "missing.txt"),)))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        train(model, tc, tmp_path / "run", verbose=False)


CLI_ERRORS = [
    (["--set", "depth=3"], "no such field"),
    (["--set", "tokenizer_path=123"], "DataConfig.tokenizer_path=123 is invalid"),
    (["--set", "data_paths=a.txt"], "--set data_paths: no such field"),
    (["--set", "data=a.txt"], "TrainConfig.data is a group of fields"),
    (["--set", "seed"], "--set 'seed' must look like field=value"),
    (["--set", "tokenizer_path={not_a_model}"], "not a SentencePiece model"),
    (["--set", "steps=1.5"], "steps='1.5': expected a int"),
    (["--workdir", "{a_file}"], "is a file; the workdir must be a directory"),
    (["--stop-after", "0"], "--stop-after: 0 is invalid: must be >= 1"),
    (["--stop-after", "-1"], "--stop-after: -1 is invalid: must be >= 1"),
    (["--set", "kernels=triton"], "TrainConfig.kernels='triton' is invalid"),
    (["--set", "kernels=pallas_gpu"], "needs the 'gpu' backend"),
]


def _cli_args(tmp_path, args):
    """train.py's arguments for one bad case: the micro run plus the case's own."""
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "not_a.model").write_bytes(b"garbage")
    paths = {"a_file": tmp_path / "a_file", "not_a_model": tmp_path / "not_a.model"}
    args = [a.format(**paths) for a in args]
    sets = [*MICRO_MODEL, *MICRO_TRAIN, *(args[1:] if args[0] == "--set" else [])]
    options = [] if args[0] == "--set" else args
    return ["--workdir", str(tmp_path / "run"), *options, "--set", *sets]


@pytest.mark.parametrize(("args", "says"), CLI_ERRORS)
def test_cli_errors_are_one_line_with_status_2(tmp_path, args, says, capsys, restore_logging):
    # In this process (argparse's own errors leave by SystemExit); the next test runs the
    # script for real.
    try:
        status = _train_script().main(_cli_args(tmp_path, args))
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert says in err


@pytest.mark.parametrize(("args", "says"), [CLI_ERRORS[5], CLI_ERRORS[8]])
def test_the_script_exits_with_status_2_and_one_line(tmp_path, args, says):
    # The bad tokenizer fails after the checkpointer starts: closing it must leave no traceback
    # at exit. An argparse error exits by its own path.
    cmd = [sys.executable, str(ROOT / "train.py"), *_cli_args(tmp_path, args)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert says in out.stderr


def test_train_config_rejects_wrong_types_naming_the_field():
    cases = {
        "data": {"paths": ("corpus.txt",)},
        "seed": -1,
        "learning_rate": float("nan"),
        "steps": True,
    }
    for field, value in cases.items():
        with pytest.raises(ValueError, match=rf"TrainConfig\.{field}=.* is invalid: "):
            TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=r"TrainConfig\.grad_accum=3 is invalid: must divide data"):
        TrainConfig(grad_accum=3, data=DataConfig(batch_size=16))
    model, tc = micro_configs()
    with pytest.raises(ValueError, match="stop_after=0 is invalid: must be an integer >= 1"):
        train(model, tc, "unused", stop_after=0)
