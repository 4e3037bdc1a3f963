"""Metric sinks: a JSONL file, TensorBoard event files and a terminal progress bar."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import numpy as np
import tqdm
from tensorboardX import SummaryWriter


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


class MetricsWriter:
    """Writes each record to ``metrics.jsonl`` and TensorBoard under ``workdir``."""

    def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
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

    def close(self) -> None:
        self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
