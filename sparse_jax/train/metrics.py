"""Metric sinks: a JSONL file, TensorBoard event files and a terminal progress bar.

A run that resumes from step ``S`` replays the steps after ``S`` that it had logged before it
was killed, so :class:`MetricsWriter` first drops what was logged past ``S`` (and the previous
``run`` record of ``S``): every ``(step, kind)`` appears once in ``metrics.jsonl`` and
TensorBoard hides the replaced events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
from typing import Any

import numpy as np
import tqdm


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """Flattens per-layer arrays into ``name/layer_i`` scalars."""
    out: dict[str, float] = {}
    for key, value in record.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            out[key] = float(arr)
        else:
            for i, v in enumerate(arr.reshape(-1)):
                out[f"{key}/layer_{i}"] = float(v)
    return out


log = logging.getLogger(__name__)


def _summary_writer(logdir: pathlib.Path, purge_step: int):
    """A tensorboardX ``SummaryWriter``, its module imported on first use and without torch.

    tensorboardX imports torch whenever torch is installed, only to accept torch tensors, which
    this module never logs: that import took 2.5 s of every ``train.py`` start. Unless torch is
    imported already, ``import torch`` is made to fail while tensorboardX is imported.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # an ImportError for `import torch`
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir), purge_step=purge_step)


def _kept(line: str, start_step: int) -> bool:
    try:
        row = json.loads(line)
        step, kind = int(row["step"]), row["kind"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return False
    return step < start_step or (step == start_step and kind != "run")


def truncate_metrics(path: pathlib.Path, start_step: int) -> int:
    """Drops the rows of ``path`` a run resuming at ``start_step`` writes again; returns how many.

    Kept: every row of an earlier step and the ``train``/``eval`` rows of ``start_step`` itself
    (logged before its checkpoint was saved). The file is replaced atomically.
    """
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and _kept(line, start_step)]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        partial = path.with_name(path.name + ".tmp")
        partial.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(partial, path)
    return dropped


class MetricsWriter:
    """Writes each record to ``metrics.jsonl`` and TensorBoard under ``workdir``.

    Args:
      workdir: the run's directory.
      total_steps: the run's length, for the progress bar.
      start_step: the step the run starts or resumes from; rows past it are dropped first.
      enabled: write anything at all (process 0 of a run, when verbose).
    """

    def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            dropped = truncate_metrics(workdir / "metrics.jsonl", start_step)
            if dropped:
                log.info("dropped %d metric rows logged past step %d", dropped, start_step)
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            self._tb = _summary_writer(workdir / "tensorboard", start_step + 1)
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (enabled and sys.stderr.isatty()),
            dynamic_ncols=True,
        )

    def write(self, step: int, kind: str, record: dict[str, Any]) -> None:
        """Logs ``record`` (scalars or per-layer arrays) for ``step`` under ``kind``."""
        if not self.enabled:
            return
        flat = {"step": step, "kind": kind}
        for key, value in record.items():
            arr = np.asarray(value)
            flat[key] = arr.tolist() if arr.ndim else float(arr)
        self._jsonl.write(json.dumps(flat) + "\n")
        self._jsonl.flush()
        for key, value in _scalars(record).items():
            if math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        self._tb.flush()

    def progress(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self._bar.disable:
            print(f"step {step}: {text}", flush=True)
        else:
            self._bar.n = step
            self._bar.set_postfix_str(text)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
