"""Training configuration: optimizer, schedule, data, checkpointing and logging settings.

A frozen dataclass validated at construction, like :class:`sparse_jax.model.config.ModelConfig`.
Presets pair a model config with one of these (``configs.get_train_config``).
:func:`check_resume` says which settings a resumed run may not change from its checkpoint's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any

from sparse_jax.data.pipeline import DataConfig
from sparse_jax.kernels import IMPLEMENTATIONS
from sparse_jax.parallel.sharding import parse_mesh
from sparse_jax.train.checkpoint import CheckpointError

log = logging.getLogger(__name__)

# Fields that fix the learning-rate schedule: changed on resume, the rate jumps mid-run.
SCHEDULE_FIELDS = ("steps", "learning_rate", "warmup_steps", "min_lr_ratio")
# Other optimizer settings: a change on resume is allowed, with a warning.
OPTIMIZER_FIELDS = ("weight_decay", "beta1", "beta2", "clip_norm")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"TrainConfig.{field}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
      steps: optimizer steps in the run (a resumed run stops at the same total).
      grad_accum: micro-batches per step; must divide ``data.batch_size`` (the global batch
        of one optimizer step, in sequences).
      learning_rate: peak AdamW learning rate.
      warmup_steps: linear warm-up steps from 0 to the peak.
      min_lr_ratio: cosine decay ends at ``learning_rate * min_lr_ratio``.
      weight_decay: AdamW decay; never applied to norms or embeddings.
      beta1, beta2: Adam moments.
      clip_norm: global gradient-norm clip.
      seed: parameter init, the held-out split, the tokenizer's line sample and the batch
        order.
      data: the corpus, tokenizer, sequence length, global batch size and held-out share
        (:class:`sparse_jax.data.pipeline.DataConfig`); with ``eval_fraction=0`` nothing is
        evaluated or logged as eval.
      eval_every, log_every, checkpoint_every: intervals in steps.
      keep_checkpoints: how many recent checkpoints to keep.
      peak_flops: peak FLOP/s of the whole machine, for MFU.
      kernels: implementation of the model's sparse ops in training and evaluation: "auto"
        (Pallas on TPU and GPU; on CPU the native kernels when built, which take only
        products of a few rows, so training runs XLA's), "xla", "native", "pallas_tpu" or
        "pallas_gpu" (:class:`sparse_jax.kernels.Kernels`).
      mesh: device mesh as ``data=2,fsdp=2,tensor=2`` (see
        :func:`sparse_jax.parallel.sharding.parse_mesh`; unnamed axes are 1 and ``data`` takes
        the remaining devices). Empty: one device when
        there is one process (the unsharded program), ``data`` over every device otherwise.
    """

    steps: int = 400
    grad_accum: int = 1
    learning_rate: float = 3e-3
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    peak_flops: float = 2e11
    mesh: str = ""
    kernels: str = "auto"

    def __post_init__(self) -> None:
        for field in (
            "steps",
            "grad_accum",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                _fail(field, value, "must be an integer >= 1")
        if not isinstance(self.data, DataConfig):
            _fail("data", self.data, "must be a sparse_jax.data.pipeline.DataConfig")
        if self.data.batch_size % self.grad_accum:
            _fail(
                "grad_accum",
                self.grad_accum,
                f"must divide data.batch_size={self.data.batch_size}",
            )
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            _fail("warmup_steps", self.warmup_steps, "must be an integer >= 0")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            _fail("seed", self.seed, "must be an integer in [0, 2**32)")
        for field in (
            "learning_rate",
            "min_lr_ratio",
            "weight_decay",
            "beta1",
            "beta2",
            "clip_norm",
            "peak_flops",
        ):
            if not _is_real(getattr(self, field)):
                _fail(field, getattr(self, field), "must be a finite number")
        if not self.learning_rate > 0:
            _fail("learning_rate", self.learning_rate, "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not self.weight_decay >= 0:
            _fail("weight_decay", self.weight_decay, "must be >= 0")
        for field in ("beta1", "beta2"):
            if not 0 <= getattr(self, field) < 1:
                _fail(field, getattr(self, field), "must be in [0, 1)")
        if not self.clip_norm > 0:
            _fail("clip_norm", self.clip_norm, "must be > 0")
        if not self.peak_flops > 0:
            _fail("peak_flops", self.peak_flops, "must be > 0")
        if self.kernels not in IMPLEMENTATIONS:
            _fail("kernels", self.kernels, f"must be one of {IMPLEMENTATIONS}")
        if not isinstance(self.mesh, str):
            _fail("mesh", self.mesh, "must be a string like 'data=2,fsdp=2,tensor=2'")
        try:
            parse_mesh(self.mesh)
        except ValueError as err:
            _fail("mesh", self.mesh, str(err))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields, ``data`` as a nested dict."""
        return {**dataclasses.asdict(self), "data": self.data.to_dict()}


def resume_changes(saved: dict[str, Any], tc: TrainConfig, fields: tuple[str, ...]) -> list[str]:
    """``field: old -> new`` for each of ``fields`` where ``tc`` differs from a saved config."""
    return [
        f"{field} {saved[field]!r} -> {getattr(tc, field)!r}"
        for field in fields
        if field in saved and saved[field] != getattr(tc, field)
    ]


def check_resume(
    saved: dict[str, Any], tc: TrainConfig, step: int, where: pathlib.Path, allow: bool
) -> None:
    """Checks the settings of a run resuming at ``step`` against its checkpoint's (``saved``).

    Args:
      saved: the checkpoint's ``TrainConfig.to_dict()``.
      tc: the resuming run's settings.
      step: the checkpoint's step.
      where: the checkpoint directory, for the messages.
      allow: continue on a changed schedule, with a warning.

    Raises:
      CheckpointError: the seed changed (it fixes the initialization, the split and the batch
        order), or the schedule changed (:data:`SCHEDULE_FIELDS`) without ``allow``, unless
        the only change is more ``steps`` for a run that had finished. Changed
        :data:`OPTIMIZER_FIELDS` only warn.
    """
    if "seed" in saved and saved["seed"] != tc.seed:
        raise CheckpointError(
            f"TrainConfig.seed={tc.seed} but the checkpoint at step {step} in {where} was "
            f"trained with seed={saved['seed']}; the seed fixes the initialization, the "
            f"held-out split and the batch order, so it cannot change mid-run: resume with "
            f"seed={saved['seed']} or use a new workdir"
        )
    changed = resume_changes(saved, tc, SCHEDULE_FIELDS)
    only_steps = bool(changed) and changed == resume_changes(saved, tc, ("steps",))
    extends_finished = only_steps and step >= saved["steps"]
    if changed and not (allow or extends_finished):
        raise CheckpointError(
            f"resuming step {step} in {where} with a different learning-rate schedule "
            f"({'; '.join(changed)}) would change the learning rate mid-run; resume with the "
            "checkpoint's values, use a new workdir, or pass --allow-schedule-change "
            "(train(allow_schedule_change=True)) to continue on the new schedule"
        )
    if changed:
        log.warning("resuming step %d on a changed schedule: %s", step, "; ".join(changed))
    changed = resume_changes(saved, tc, OPTIMIZER_FIELDS)
    if changed:
        log.warning(
            "resuming step %d with changed optimizer settings: %s", step, "; ".join(changed)
        )
