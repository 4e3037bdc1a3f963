"""The training loop: data, resume, jitted steps, evaluation, checkpoints, metrics, signals.

:func:`train` runs to ``TrainConfig.steps`` total steps. It resumes from the newest complete
checkpoint in ``workdir/checkpoints`` without being asked (tokenizer, parameters, optimizer,
RNG and data position all come back, so a resumed run is bitwise identical to an uninterrupted
one on the same machine). SIGTERM or SIGINT finish the current step, save and return. A
non-finite loss or parameter raises :class:`TrainingDiverged` before anything from that step is
saved.

A resume never changes the run silently. A different seed is refused. So is a different
learning-rate schedule (``steps``, ``learning_rate``, ``warmup_steps``, ``min_lr_ratio``)
unless ``allow_schedule_change``; more ``steps`` for a run that had finished only warns. If
damaged checkpoints were moved aside and none restores, the run stops rather than starting
over from step 0, unless ``restart_if_unreadable``.

On a mesh (``TrainConfig.mesh``, or several processes) the state is created and restored
sharded, each process reads only its rows of every global batch, process 0 alone writes the
tokenizer, logs and metrics, and every process takes part in writing one checkpoint. With one
device the loop runs the unsharded program, unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.cost import flops
from sparse_jax.data import pipeline as data_lib
from sparse_jax.data.corpus import split_documents
from sparse_jax.data.prepared import PreparedData, is_prepared
from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.kernels import Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.parallel import distributed
from sparse_jax.parallel.sharding import ShardingPlan, make_mesh
from sparse_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    tokenizer_from_json,
    tokenizer_to_json,
)
from sparse_jax.train.config import TrainConfig, check_resume
from sparse_jax.train.metrics import MetricsWriter
from sparse_jax.train.optim import learning_rate_schedule, make_optimizer
from sparse_jax.train.step import (
    abstract_train_state,
    batch_sharding,
    init_train_state,
    make_eval_step,
    make_train_step,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or Inf; the last good checkpoint is left as it was."""


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


def _new_tokenizer(tc: TrainConfig, vocab_size: int, train_docs: list[str]) -> Tokenizer:
    """The given tokenizer file, else one trained on the training documents.

    With several processes, process 0 trains or loads it and sends it to the others, so that
    every process cuts the text into the same tokens.
    """
    if jax.process_count() == 1:
        return data_lib.build_tokenizer(tc.data, train_docs, vocab_size, tc.seed)
    mine = None
    if distributed.is_primary():
        mine = data_lib.build_tokenizer(tc.data, train_docs, vocab_size, tc.seed)
    return Tokenizer(distributed.broadcast_bytes(mine and mine.model_proto))


def _to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


class ContextTooLarge(MemoryError):
    """The train step does not fit the device's memory at this context and batch."""


def _out_of_memory(
    model_cfg: ModelConfig, tc: TrainConfig, optimizer: Any, train_step: Any, batch: Any
) -> str:
    """What ran out of memory, with XLA's estimate of what the step needs."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    try:
        compiled = train_step.lower(abstract_train_state(model_cfg, optimizer), shapes).compile()
        analysis = compiled.memory_analysis()
        need = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
        estimate = (
            f"about {need / 2**30:.1f} GiB by XLA's estimate "
            f"({analysis.temp_size_in_bytes / 2**30:.1f} GiB of temporaries)"
        )
    except Exception:  # the estimate is a courtesy: never hide the real error behind it
        estimate = "more than the device holds"
    hint = ""
    if model_cfg.attn_impl != "blockwise":
        hint = " or set attn_impl=blockwise (attention in O(T x block) memory)"
    return (
        f"the train step at data.seq_len={tc.data.seq_len}, data.batch_size={tc.data.batch_size} "
        f"(grad_accum={tc.grad_accum}) needs {estimate}, more than the device could allocate: "
        f"lower seq_len or batch_size, raise grad_accum{hint}"
    )


def sharding_plan(tc: TrainConfig) -> ShardingPlan | None:
    """The run's mesh and rules; None for the single-device (unsharded) program."""
    if not tc.mesh and jax.process_count() == 1:
        return None
    mesh = make_mesh(tc.mesh)
    return None if mesh.size == 1 else ShardingPlan(mesh)


class _Feeder:
    """This process's rows of each global batch, and their assembly into global arrays."""

    def __init__(self, plan: ShardingPlan | None, tc: TrainConfig):
        self.plan, self.batch_size = plan, tc.data.batch_size
        self.shard_index, self.shard_count = 0, 1
        if plan is not None:
            rows, seq_len = tc.data.batch_size, tc.data.seq_len
            batch_sharding(plan, rows // tc.grad_accum, seq_len)  # checks the split
            self.sharding = batch_sharding(plan, rows, seq_len)
            shape = (rows, seq_len)
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
    """Mean token loss over the held-out batches (``feed`` puts a batch on the devices).

    Raises:
      ValueError: ``batches`` is empty (a run without an eval set has no eval loss).
    """
    if not batches:
        raise ValueError("evaluate needs one or more held-out batches")
    total = count = 0.0
    for batch in batches:
        loss, n = eval_step(params, feed(batch))
        total += float(loss)
        count += float(n)
    return total / max(count, 1.0)


def _check_arguments(model_cfg: ModelConfig, tc: TrainConfig, stop_after: Any) -> None:
    if tc.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"TrainConfig.data.seq_len={tc.data.seq_len} exceeds ModelConfig.max_seq_len="
            f"{model_cfg.max_seq_len}"
        )
    if stop_after is not None and (
        not isinstance(stop_after, int) or isinstance(stop_after, bool) or stop_after < 1
    ):
        raise ValueError(
            f"stop_after={stop_after!r} is invalid: must be an integer >= 1, or None to run to "
            "TrainConfig.steps"
        )
    path = tc.data.tokenizer_path
    if path is not None and not pathlib.Path(path).exists():
        raise FileNotFoundError(
            f"TrainConfig.data.tokenizer_path={path!r} does not exist; give a "
            "SentencePiece .model file (or a directory holding tokenizer.model), or None to "
            "train one"
        )


def _prepare_workdir(workdir: str | os.PathLike[str]) -> pathlib.Path:
    path = pathlib.Path(workdir).absolute()
    for where in (path, *path.parents):
        if where.exists() and not where.is_dir():
            raise ValueError(
                f"workdir {path} is invalid: {where} is a file; the workdir must be a directory "
                "(created if missing)"
            )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_fresh_start(ckpt: Checkpointer, restart_if_unreadable: bool) -> None:
    """Refuses to start from step 0 where damaged checkpoints were moved aside, unless asked."""
    aside = ckpt.moved_aside()
    if not aside:
        return
    listed = ", ".join(str(p) for p in aside)
    if not restart_if_unreadable:
        raise CheckpointError(
            f"no checkpoint in {ckpt.directory} restores; the damaged steps were moved to "
            f"{listed}. Repair one and move it back to resume, or rerun with "
            "--restart-if-unreadable (train(restart_if_unreadable=True)) to start again "
            "from step 0"
        )
    log.warning("no checkpoint restores (damaged steps: %s); starting again from step 0", listed)


def _train_record(
    tc: TrainConfig,
    step: int,
    metrics: dict[str, Any],
    per_token: dict[str, float],
    tokens: float,
    elapsed: float,
    steps: int,
) -> dict[str, Any]:
    """The ``train`` metrics row of ``step``, over a window of ``steps`` steps."""
    tokens_per_s = tokens / max(elapsed, 1e-9)
    return {
        "loss": float(metrics["loss"]),
        "learning_rate": float(learning_rate_schedule(tc)(step - 1)),
        "grad_norm": float(metrics["grad_norm"]),
        "tokens_per_s": tokens_per_s,
        "step_time_s": elapsed / max(1, steps),
        "flops_per_token_dense_equivalent": per_token["dense_equivalent"],
        "flops_per_token_sparse": per_token["sparse"],
        "mfu": tokens_per_s * per_token["dense_equivalent"] / tc.peak_flops,
        "ffn_active_fraction": np.asarray(metrics["ffn_active_fraction"]),
        "attn_keys_per_query": np.asarray(metrics["attn_keys_per_query"]),
    }


def train(
    model_cfg: ModelConfig,
    tc: TrainConfig,
    workdir: str | os.PathLike[str],
    *,
    stop_after: int | None = None,
    verbose: bool = True,
    restart_if_unreadable: bool = False,
    allow_schedule_change: bool = False,
) -> dict[str, Any]:
    """Trains (or resumes) in ``workdir``; returns a summary of the run.

    Args:
      model_cfg: the model to train.
      tc: training settings.
      workdir: output directory (checkpoints, tokenizer, metrics); created if missing.
      stop_after: stop (with a checkpoint) after this many steps of this invocation, >= 1; for
        tests and time-boxed runs.
      verbose: log to the terminal and write metrics files.
      restart_if_unreadable: when no checkpoint restores and damaged ones were moved to
        ``checkpoints_unreadable/`` (by this or an earlier run), start again from step 0
        instead of raising. A readable checkpoint is still resumed.
      allow_schedule_change: resume even though ``steps``, ``learning_rate``,
        ``warmup_steps`` or ``min_lr_ratio`` differ from the checkpoint's (the learning rate
        then jumps to the new schedule's). Without it that is an error, except a longer
        ``steps`` for a run that had finished, which only warns.

    Returns:
      dict with ``step`` (reached), ``steps`` (``tc.steps``), ``loss`` (the last train loss of
      this invocation, NaN if it trained no step), ``eval_loss`` and ``eval_step`` (the last
      evaluation of the run, possibly from before a resume; NaN and None if there was none),
      ``has_eval_set``, ``stopped`` (``"signal"``, ``"stop_after"`` or None), ``finished``,
      ``unigram_entropy`` of the training tokens, and ``workdir``.

    Raises:
      CheckpointError: a checkpoint that does not fit the run or cannot be read, or no
        checkpoint restoring although damaged ones were moved aside (see above).
      TrainingDiverged: the loss or the parameters became NaN or Inf; nothing from that step
        is saved.
      ValueError, FileNotFoundError: bad arguments, paths or data.
    """
    _check_arguments(model_cfg, tc, stop_after)
    workdir = _prepare_workdir(workdir)
    plan = sharding_plan(tc)
    # Resolved once, here: an implementation this backend cannot run fails before any work.
    kernels = Kernels(tc.kernels)
    kernels.resolved()
    feed = _Feeder(plan, tc)
    if plan is not None:
        log.info("mesh %s, %s", dict(plan.mesh.shape), distributed.describe())
    prepared = None
    if is_prepared(tc.data.paths):
        # Tokenized once by `python -m sparse_jax.data.prepare`: memory-mapped, not read here.
        prepared = PreparedData(tc.data.paths[0])
        log.info("data: %s prepared at %s", prepared.describe(), prepared.path)
        train_docs = eval_docs = []
        if tc.data.tokenizer_path is not None:
            prepared.check_tokenizer(
                Tokenizer.load(tc.data.tokenizer_path),
                f"data.tokenizer_path={tc.data.tokenizer_path}",
            )
    else:
        docs = data_lib.load_documents(tc.data)
        train_docs, eval_docs = split_documents(docs, tc.data.eval_fraction, tc.seed)
    optimizer = make_optimizer(tc)
    with Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints) as ckpt:
        state = init_train_state(model_cfg, optimizer, tc.seed, plan)
        restored = ckpt.restore_latest(state, model_cfg)
        if restored is None:
            _check_fresh_start(ckpt, restart_if_unreadable)
            if prepared is not None:
                tokenizer = prepared.tokenizer
            else:
                tokenizer = _new_tokenizer(tc, model_cfg.vocab_size, train_docs)
        else:
            saved = restored.meta.get("train_config", {})
            check_resume(saved, tc, restored.step, ckpt.directory, allow_schedule_change)
            tokenizer = tokenizer_from_json(restored.meta["tokenizer"])
            if prepared is not None:
                prepared.check_tokenizer(tokenizer, f"checkpoint step {restored.step}")
        if tokenizer.vocab_size != model_cfg.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} pieces but ModelConfig.vocab_size="
                f"{model_cfg.vocab_size}"
            )
        if distributed.is_primary():
            tokenizer.save(workdir)
        shard = dict(shard_index=feed.shard_index, shard_count=feed.shard_count)
        if prepared is not None:
            iterator = prepared.train_iterator(tc.data, **shard, seed=tc.seed)
            held_out = prepared.eval_batches(tc.data, **shard)
        else:
            iterator = data_lib.train_iterator(
                tc.data, tokenizer, train_docs, **shard, seed=tc.seed
            )
            held_out = data_lib.eval_batches(tc.data, tokenizer, eval_docs, **shard)
        last_eval = None
        if restored is not None:
            state, last_eval = restored.state, restored.meta.get("last_eval")
            iterator.set_state(restored.data)
            log.info("resumed from step %d", restored.step)
        if not held_out:
            log.info(
                "no eval set (eval_fraction=%s): nothing will be evaluated", tc.data.eval_fraction
            )
        if prepared is not None:
            entropy = prepared.unigram_entropy()
        else:
            entropy = data_lib.unigram_entropy(
                data_lib.tokenize_documents(tokenizer, train_docs), tokenizer.vocab_size
            )
        meta = {
            "model_config": model_cfg.to_dict(),
            "train_config": tc.to_dict(),
            "tokenizer": tokenizer_to_json(tokenizer),
        }
        start = int(state.step)
        train_step = make_train_step(model_cfg, optimizer, tc.grad_accum, plan, kernels)
        eval_step = make_eval_step(model_cfg, plan, kernels)
        per_token = flops.train_flops_per_token(model_cfg, tc.data.seq_len)
        enabled = verbose and distributed.is_primary()
        with MetricsWriter(workdir, tc.steps, start, enabled) as writer:
            writer.write(start, "run", {"unigram_entropy": entropy, **per_token})
            step, loss, stopped = start, math.nan, None
            if start >= tc.steps:  # already trained: report where it stands
                log.info("checkpoint is at step %d of %d: nothing to train", start, tc.steps)
                if held_out and (last_eval is None or last_eval["step"] != start):
                    last_eval = {
                        "step": start,
                        "loss": evaluate(eval_step, state.params, held_out, feed),
                    }
            window_start, window_tokens = time.perf_counter(), 0.0
            with _stop_on_signals() as signals:
                while step < tc.steps:
                    batch = feed(next(iterator))
                    try:  # dispatch is asynchronous: a failed allocation shows at the read
                        state, metrics = train_step(state, batch)
                        loss = float(metrics["loss"])
                    except jax.errors.JaxRuntimeError as err:
                        if "RESOURCE_EXHAUSTED" not in str(err):
                            raise
                        raise ContextTooLarge(
                            _out_of_memory(model_cfg, tc, optimizer, train_step, batch)
                        ) from None
                    step += 1
                    if not (math.isfinite(loss) and bool(metrics["params_finite"])):
                        steps = ckpt.steps()
                        what = f"loss is {loss}"
                        if math.isfinite(loss):
                            what = f"the update made the parameters NaN or Inf (loss {loss:.4f})"
                        raise TrainingDiverged(
                            f"{what} at step {step}; stopping without saving this step "
                            f"(last good checkpoint: {steps[-1] if steps else 'none'})"
                        )
                    window_tokens += float(metrics["tokens"])
                    last = step == tc.steps
                    if signals["stop"] and not last:
                        stopped = "signal"
                    elif stop_after is not None and step - start >= stop_after and not last:
                        stopped = "stop_after"
                    if step % tc.log_every == 0 or last:
                        elapsed = time.perf_counter() - window_start
                        steps_in_window = step % tc.log_every or tc.log_every
                        record = _train_record(
                            tc, step, metrics, per_token, window_tokens, elapsed, steps_in_window
                        )
                        writer.write(step, "train", record)
                        writer.progress(
                            step, f"loss {loss:.3f} tok/s {record['tokens_per_s']:,.0f}"
                        )
                        window_start, window_tokens = time.perf_counter(), 0.0
                    if held_out and (step % tc.eval_every == 0 or last):
                        eval_loss = evaluate(eval_step, state.params, held_out, feed)
                        last_eval = {"step": step, "loss": eval_loss}
                        writer.write(step, "eval", {"loss": eval_loss})
                        writer.progress(step, f"loss {loss:.3f} eval {eval_loss:.3f}")
                    if step % tc.checkpoint_every == 0 or last or stopped:
                        ckpt.save(
                            step, state, iterator.get_state(), {**meta, "last_eval": last_eval}
                        )
                    if stopped:
                        break
    return {
        "step": step,
        "steps": tc.steps,
        "loss": loss,
        "eval_loss": math.nan if last_eval is None else float(last_eval["loss"]),
        "eval_step": None if last_eval is None else int(last_eval["step"]),
        "has_eval_set": bool(held_out),
        "stopped": stopped,
        "finished": step >= tc.steps,
        "unigram_entropy": entropy,
        "workdir": str(workdir),
    }
