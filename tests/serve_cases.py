"""Shared by the serving tests: the served micro model, its training, prompts, a live server."""

import contextlib
import pathlib
import subprocess
import sys
import threading
import time

import portpicker
import uvicorn
from micro_configs import MICRO_MODEL, MICRO_TRAIN

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "micro"
# A longer context than training saw, so that a request can run long enough to be cut off.
SERVE_MODEL = [*(m for m in MICRO_MODEL if not m.startswith("max_seq_len")), "max_seq_len=64"]
SERVE_TRAIN = [
    *(t for t in MICRO_TRAIN if t.split("=")[0] not in ("steps", "checkpoint_every")),
    "steps=60",
    "checkpoint_every=60",
]
PROMPTS = [
    "In the beginning",
    "And the LORD said",
    "Blessed are the meek",
    "And God saw the light",
    "Thou shalt not",
    "Let there be",
]


def train_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    """Trains the serving tests' micro model with ``train.py``; returns the workdir."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", str(workdir)]
    out = subprocess.run(
        [*cmd, "--set", *SERVE_MODEL, *SERVE_TRAIN], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return workdir


@contextlib.contextmanager
def serving(app):
    """Runs ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    port = portpicker.pick_unused_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
