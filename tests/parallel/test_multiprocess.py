"""Two local processes train one model through JAX's multi-process runtime (gloo on CPU).

``train.py`` runs as 2 processes with 2 CPU devices each on a ``fsdp=2,tensor=2`` mesh: every
process reads its half of each global batch, parameters are split across the processes, and
both write one checkpoint (from which, in the slow variant, a second pair of processes resumes).
A single-process run on one device over the same global batches gives the same losses, and the
joint checkpoint restores in this process on one device with the single-process model's logits.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
import sharding_cases as cases
from micro_configs import MICRO_MODEL
from tolerances import SHARDED_LOGITS
from xla_env import xla_flags

from sparse_jax.model.transformer import forward
from sparse_jax.serve.loading import load

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 3


def _start(
    workdir: pathlib.Path, name: str, devices: int, steps: int, extra: list[str]
) -> subprocess.Popen:
    """Starts train.py with ``devices`` CPU devices; output goes to ``<workdir>/../<name>.log``."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(devices),
        # The resumed pair compiles what the first pair compiled: share it through the cache.
        "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", str(workdir)]
    cmd += [*extra, "--set", *MICRO_MODEL, *cases.MICRO_TRAIN, f"steps={steps}"]
    with open(workdir.parent / f"{name}.log", "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _start_pair(workdir: pathlib.Path, phase: str, steps: int) -> dict[str, subprocess.Popen]:
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    flags = ["--mesh", "fsdp=2,tensor=2", "--coordinator", coordinator, "--num-processes", "2"]
    return {
        f"{phase}_{i}": _start(workdir, f"{phase}_{i}", 2, steps, [*flags, "--process-id", str(i)])
        for i in range(2)
    }


def _wait_all(procs: dict[str, subprocess.Popen], tmp_path: pathlib.Path, timeout: float) -> None:
    """Waits for every process; on a failure or timeout kills the rest and shows the logs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        codes = [p.poll() for p in procs.values()]
        if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.2)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.wait()
    if any(p.returncode != 0 for p in procs.values()):
        logs = [
            f"--- {name}: exit {p.returncode}\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
            for name, p in procs.items()
        ]
        raise AssertionError("\n".join(logs))


def _losses(workdir: pathlib.Path, kind: str) -> dict[int, float]:
    """{step: loss} of the train or eval records in the run's metrics (the last one wins)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == kind}


def _check_two_processes_train_like_one(tmp_path: pathlib.Path, resume: bool) -> None:
    """Two processes train STEPS steps (in one go, or stopped after STEPS - 1 and resumed by
    a new pair of processes); a one-device run alongside must give the same results."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    procs = _start_pair(multi, "first", STEPS - 1 if resume else STEPS)
    procs["single"] = _start(single, "single", 1, STEPS, [])
    _wait_all(procs, tmp_path, timeout=240)
    last = "first"
    if resume:
        _wait_all(_start_pair(multi, "resumed", STEPS), tmp_path, timeout=240)
        last = "resumed"
    for i in range(2):
        log = (tmp_path / f"{last}_{i}.log").read_text()
        assert f"'process_index': {i}, 'process_count': 2, 'local_devices': 2" in log
        assert not resume or f"resumed from step {STEPS - 1}" in log

    train_losses, eval_losses = _losses(single, "train"), _losses(single, "eval")
    assert sorted(train_losses) == list(range(1, STEPS + 1)) and list(eval_losses) == [STEPS]
    got = _losses(multi, "train")
    np.testing.assert_allclose(
        [got[s] for s in train_losses], list(train_losses.values()), rtol=1e-5
    )
    np.testing.assert_allclose(_losses(multi, "eval")[STEPS], eval_losses[STEPS], rtol=1e-5)
    state = multi / "checkpoints" / str(STEPS) / "state"
    written = sorted(p.name for p in state.glob("ocdbt.process_*"))
    assert written == ["ocdbt.process_0", "ocdbt.process_1"]

    joint, reference = load(multi), load(single)  # on this process's first device
    assert joint.step == reference.step == STEPS
    device = jax.local_devices()[0]
    assert all(a.sharding.device_set == {device} for a in jax.tree.leaves(joint.params))
    tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, joint.config.vocab_size)
    logits = forward(joint.config, joint.params, tokens)[0]
    want = forward(reference.config, reference.params, tokens)[0]
    np.testing.assert_allclose(logits, want, **SHARDED_LOGITS)


def test_two_processes_train_like_one(tmp_path):
    _check_two_processes_train_like_one(tmp_path, resume=False)


@pytest.mark.slow
def test_two_processes_resume_from_their_joint_checkpoint(tmp_path):
    _check_two_processes_train_like_one(tmp_path, resume=True)
