"""Training configuration: optimizer, schedule, data, checkpointing and logging settings.

A frozen dataclass validated at construction, like :class:`sparse_jax.config.ModelConfig`.
Presets pair a model config with one of these (``configs.get_train_config``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_jax.data import DataConfig
from sparse_jax.sharding import parse_mesh


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"TrainConfig.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
      steps: optimizer steps in the run (a resumed run stops at the same total).
      batch_size: global batch in sequences per optimizer step (all micro-batches).
      grad_accum: micro-batches per step; must divide ``batch_size``.
      seq_len: tokens per sequence; at most the model's ``max_seq_len``.
      learning_rate: peak AdamW learning rate.
      warmup_steps: linear warm-up steps from 0 to the peak.
      min_lr_ratio: cosine decay ends at ``learning_rate * min_lr_ratio``.
      weight_decay: AdamW decay; never applied to norms or embeddings.
      beta1, beta2: Adam moments.
      clip_norm: global gradient-norm clip.
      seed: parameter init and data order.
      data_paths: text/JSONL files or directories; empty means the bundled KJV corpus.
      text_field: JSONL field holding the text.
      tokenizer_path: a SentencePiece ``.model`` to use instead of training one.
      eval_fraction: share of documents held out for eval.
      eval_batches: held-out batches per evaluation.
      eval_every, log_every, checkpoint_every: intervals in steps.
      keep_checkpoints: how many recent checkpoints to keep.
      peak_flops: peak FLOP/s of the whole machine, for MFU.
      mesh: device mesh as ``data=2,fsdp=2,tensor=2`` (see :func:`sparse_jax.sharding.parse_mesh`;
        unnamed axes are 1 and ``data`` takes the remaining devices). Empty: one device when
        there is one process (the unsharded program), ``data`` over every device otherwise.
    """

    steps: int = 400
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    data_paths: tuple[str, ...] = ()
    text_field: str = "text"
    tokenizer_path: str | None = None
    eval_fraction: float = 0.05
    eval_batches: int = 8
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    peak_flops: float = 2e11
    mesh: str = ""

    def __post_init__(self) -> None:
        for field in (
            "steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_batches",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(field, value, "must be an integer >= 1")
        if self.batch_size % self.grad_accum:
            _fail("grad_accum", self.grad_accum, f"must divide batch_size={self.batch_size}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail("warmup_steps", self.warmup_steps, "must be an integer >= 0")
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
        if not isinstance(self.mesh, str):
            _fail("mesh", self.mesh, "must be a string like 'data=2,fsdp=2,tensor=2'")
        try:
            parse_mesh(self.mesh)
        except ValueError as err:
            _fail("mesh", self.mesh, str(err))
        object.__setattr__(self, "data_paths", tuple(self.data_paths))

    def data_config(self, vocab_size: int) -> DataConfig:
        """The data pipeline's config for a model with ``vocab_size`` tokens."""
        return DataConfig(
            paths=self.data_paths,
            text_field=self.text_field,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            eval_fraction=self.eval_fraction,
            eval_batches=self.eval_batches,
            seed=self.seed,
            vocab_size=vocab_size,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data_paths"] = list(self.data_paths)
        return out
