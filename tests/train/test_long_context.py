"""Long contexts in training: a step that cannot fit is a clear error naming the context and
XLA's estimate, and the blockwise form trains where the materialized one cannot fit."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["model_dim=64", "num_layers=1", "ffn_dim=128", "steps=1", "data.batch_size=1"]
TINY += ["eval_every=100", "data.eval_fraction=0"]


def _train(tmp_path, *overrides):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny_dense"]
    cmd += ["--workdir", str(tmp_path), "--set", *TINY, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_context_that_cannot_fit_is_a_clear_error(tmp_path):
    # Materialized, 32768 tokens hold several [32768, 32768] float32 score tensors (4 GiB
    # each): more than the 24 GiB these machines have.
    out = _train(tmp_path, "data.seq_len=32768", "max_seq_len=32768", "attn_impl=materialized")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "error: the train step at data.seq_len=32768" in out.stderr
    assert "GiB by XLA's estimate" in out.stderr and "attn_impl=blockwise" in out.stderr
    assert "Traceback" not in out.stderr
