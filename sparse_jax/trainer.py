"""The training loop: data, resume, jitted steps, evaluation, checkpoints, metrics, signals.

:func:`train` runs to ``TrainConfig.steps`` total steps. It resumes from the newest complete
checkpoint in ``workdir/checkpoints`` without being asked (tokenizer, parameters, optimizer,
RNG and data position all come back, so a resumed run is bitwise identical to an uninterrupted
one on the same machine). SIGTERM or SIGINT finish the current step, save and return. A
non-finite loss raises :class:`TrainingDiverged` before anything from that step is saved.

On a mesh (``TrainConfig.mesh``, or several processes) the state is created and restored
sharded, each process reads only its rows of every global batch, process 0 alone writes the
tokenizer, logs and metrics, and every process takes part in writing one checkpoint. With one
device the loop runs the unsharded program, unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import data as data_lib
from sparse_jax import distributed, flops
from sparse_jax.checkpoint import Checkpointer, tokenizer_from_json, tokenizer_to_json
from sparse_jax.config import ModelConfig
from sparse_jax.corpus import split_documents
from sparse_jax.metrics import MetricsWriter
from sparse_jax.optim import learning_rate_schedule, make_optimizer
from sparse_jax.sharding import ShardingPlan, make_mesh
from sparse_jax.tokenizer import Tokenizer
from sparse_jax.train_config import TrainConfig
from sparse_jax.train_step import (
    batch_sharding,
    init_train_state,
    make_eval_step,
    make_train_step,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""
    flag = {"stop": False}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("received signal %d: finishing this step, saving, exiting", signum)
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _tokenizer_for_run(
    ckpt: Checkpointer, tc: TrainConfig, data_cfg: data_lib.DataConfig, train_docs: list[str]
) -> Tokenizer:
    """The checkpoint's tokenizer when resuming, else the given file, else a new one.

    With several processes, process 0 trains or loads a new one and sends it to the others, so
    that every process cuts the text into the same tokens.
    """
    for step in reversed(ckpt.steps()):
        try:
            return tokenizer_from_json(ckpt.read_meta(step)["tokenizer"])
        except Exception as err:
            log.warning("checkpoint step %d: metadata unreadable (%s)", step, err)
    if jax.process_count() == 1:
        return data_lib.build_tokenizer(data_cfg, train_docs, tokenizer_path=tc.tokenizer_path)
    mine = None
    if distributed.is_primary():
        mine = data_lib.build_tokenizer(data_cfg, train_docs, tokenizer_path=tc.tokenizer_path)
    return Tokenizer(distributed.broadcast_bytes(mine and mine.model_proto))


def _to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def sharding_plan(tc: TrainConfig) -> ShardingPlan | None:
    """The run's mesh and rules; None for the single-device (unsharded) program."""
    if not tc.mesh and jax.process_count() == 1:
        return None
    mesh = make_mesh(tc.mesh)
    return None if mesh.size == 1 else ShardingPlan(mesh)


class _Feeder:
    """This process's rows of each global batch, and their assembly into global arrays."""

    def __init__(self, plan: ShardingPlan | None, tc: TrainConfig):
        self.plan, self.batch_size = plan, tc.batch_size
        self.shard_index, self.shard_count = 0, 1
        if plan is not None:
            batch_sharding(plan, tc.batch_size // tc.grad_accum, tc.seq_len)  # checks the split
            self.sharding = batch_sharding(plan, tc.batch_size, tc.seq_len)
            shape = (tc.batch_size, tc.seq_len)
            self.shard_index, self.shard_count = distributed.process_rows(self.sharding, shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.plan is None:
            return _to_device(batch)
        return distributed.global_batch(batch, self.sharding, self.batch_size)


def evaluate(
    eval_step: Any,
    params: Any,
    batches: list[dict[str, np.ndarray]],
    feed: Any = _to_device,
) -> float:
    """Mean token loss over the held-out batches (``feed`` puts a batch on the devices)."""
    total = count = 0.0
    for batch in batches:
        loss, n = eval_step(params, feed(batch))
        total += float(loss)
        count += float(n)
    return total / max(count, 1.0)


def train(
    model_cfg: ModelConfig,
    tc: TrainConfig,
    workdir: str | pathlib.Path,
    *,
    stop_after: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Trains (or resumes) in ``workdir``; returns a summary of the run.

    Args:
      model_cfg: the model to train.
      tc: training settings.
      workdir: output directory (checkpoints, tokenizer, metrics).
      stop_after: stop (with a checkpoint) after this many steps of this invocation; for tests
        and time-boxed runs.
      verbose: log to the terminal and write metrics files.

    Returns:
      dict with the final step, last train loss, last eval loss, the unigram entropy of the
      training tokens, and whether the run reached ``tc.steps``.
    """
    if tc.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"TrainConfig.seq_len={tc.seq_len} exceeds ModelConfig.max_seq_len="
            f"{model_cfg.max_seq_len}"
        )
    workdir = pathlib.Path(workdir).absolute()
    plan = sharding_plan(tc)
    feed = _Feeder(plan, tc)
    if plan is not None:
        log.info("mesh %s, %s", dict(plan.mesh.shape), distributed.describe())
    data_cfg = tc.data_config(model_cfg.vocab_size)
    docs = data_lib.load_documents(data_cfg)
    train_docs, eval_docs = split_documents(docs, data_cfg.eval_fraction, data_cfg.seed)
    ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints)
    tokenizer = _tokenizer_for_run(ckpt, tc, data_cfg, train_docs)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces but ModelConfig.vocab_size="
            f"{model_cfg.vocab_size}"
        )
    if distributed.is_primary():
        tokenizer.save(workdir)
    shard = dict(shard_index=feed.shard_index, shard_count=feed.shard_count)
    iterator = data_lib.train_iterator(data_cfg, tokenizer, train_docs, **shard)
    held_out = data_lib.eval_batches(data_cfg, tokenizer, eval_docs, **shard)
    entropy = data_lib.unigram_entropy(
        data_lib.tokenize_documents(tokenizer, train_docs), tokenizer.vocab_size
    )

    optimizer = make_optimizer(tc)
    state = init_train_state(model_cfg, optimizer, tc.seed, plan)
    restored = ckpt.restore_latest(state, model_cfg)
    if restored is not None:
        state, data_state, _ = restored
        iterator.set_state(data_state)
        log.info("resumed from step %d", int(state.step))
    start = int(state.step)
    meta = {
        "model_config": model_cfg.to_dict(),
        "train_config": tc.to_dict(),
        "tokenizer": tokenizer_to_json(tokenizer),
    }
    train_step = make_train_step(model_cfg, optimizer, tc.grad_accum, plan)
    eval_step = make_eval_step(model_cfg, plan)
    schedule = learning_rate_schedule(tc)
    per_token = flops.train_flops_per_token(model_cfg, tc.seq_len)
    writer = MetricsWriter(workdir, tc.steps, start, enabled=verbose and distributed.is_primary())
    writer.write(start, "run", {"unigram_entropy": entropy, **per_token})

    step, loss, eval_loss = start, math.nan, math.nan
    if start >= tc.steps:  # already trained: report where it stands instead of NaNs
        log.info("checkpoint is at step %d of %d: nothing to train", start, tc.steps)
        eval_loss = evaluate(eval_step, state.params, held_out, feed)
    window_start, window_tokens = time.perf_counter(), 0.0
    try:
        with _stop_on_signals() as signals:
            while step < tc.steps:
                state, metrics = train_step(state, feed(next(iterator)))
                loss = float(metrics["loss"])
                step += 1
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at step {step}; stopping without saving this step "
                        f"(last good checkpoint: {ckpt.steps()[-1] if ckpt.steps() else 'none'})"
                    )
                window_tokens += float(metrics["tokens"])
                last = step == tc.steps
                stopping = signals["stop"] or (
                    stop_after is not None and step - start >= stop_after
                )
                if step % tc.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    record = {
                        "loss": loss,
                        "learning_rate": float(schedule(step - 1)),
                        "grad_norm": float(metrics["grad_norm"]),
                        "tokens_per_s": tokens_per_s,
                        "step_time_s": elapsed / max(1, step % tc.log_every or tc.log_every),
                        "flops_per_token_dense_equivalent": per_token["dense_equivalent"],
                        "flops_per_token_sparse": per_token["sparse"],
                        "mfu": tokens_per_s * per_token["dense_equivalent"] / tc.peak_flops,
                        "ffn_active_fraction": np.asarray(metrics["ffn_active_fraction"]),
                        "attn_keys_per_query": np.asarray(metrics["attn_keys_per_query"]),
                    }
                    writer.write(step, "train", record)
                    writer.progress(step, f"loss {loss:.3f} tok/s {tokens_per_s:,.0f}")
                    window_start, window_tokens = time.perf_counter(), 0.0
                if step % tc.eval_every == 0 or last:
                    eval_loss = evaluate(eval_step, state.params, held_out, feed)
                    writer.write(step, "eval", {"loss": eval_loss})
                    writer.progress(step, f"loss {loss:.3f} eval {eval_loss:.3f}")
                if step % tc.checkpoint_every == 0 or last or stopping:
                    ckpt.save(step, state, iterator.get_state(), meta)
                if stopping:
                    break
    finally:
        ckpt.close()
        writer.close()
    return {
        "step": step,
        "loss": loss,
        "eval_loss": eval_loss,
        "unigram_entropy": entropy,
        "finished": step >= tc.steps,
        "workdir": str(workdir),
    }
