"""Checkpoints: Orbax CheckpointManager over train state, data-iterator state and metadata.

A checkpoint directory holds one sub-directory per saved step (written to a temporary name and
renamed when complete, so a killed save never looks finished). Each step has three items:

* ``state``: the :class:`~sparse_jax.train.step.TrainState` (params, optimizer state, step);
* ``data``: the training iterator's JSON state, so a resumed run sees the next batch;
* ``meta``: model and train configs, the SentencePiece tokenizer (base64) and the last
  evaluation, so a checkpoint is self-contained.

:meth:`Checkpointer.restore_latest` walks back from the newest step. A step whose damage it can
name (a missing, empty or truncated file, undecodable metadata) is moved to
``<directory>_unreadable/`` with a warning and the next older one is tried. Any other read
failure, such as an ``OSError`` from the filesystem, is retried a few times and then raised,
leaving the step where it is: a flaky disk never costs a good checkpoint.

Arrays are saved in whatever sharding they have, by every process of a multi-process run
together, and restored into the shardings of the target state: a checkpoint moves freely
between meshes, device counts and process counts.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.model.config import ModelConfig
from sparse_jax.parallel import distributed
from sparse_jax.train import migrate
from sparse_jax.train.migrate import FORMAT

log = logging.getLogger(__name__)

# Files every complete step has, whatever the number of processes that wrote it.
REQUIRED_FILES = ("meta/metadata", "data/metadata", "state/_METADATA", "state/manifest.ocdbt")
JSON_FILES = ("meta/metadata", "data/metadata", "state/_METADATA")
# TensorStore status codes that mean the bytes on disk are missing or wrong, not unreachable.
_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE")

T = TypeVar("T")


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint, or one that does not fit the run."""


class CheckpointDamaged(CheckpointError):
    """A step whose files are missing, truncated or undecodable (retrying will not help)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore_latest` returns."""

    step: int
    state: Any
    data: dict[str, Any]
    meta: dict[str, Any]


def tokenizer_to_json(tokenizer: Tokenizer) -> str:
    return base64.b64encode(tokenizer.model_proto).decode("ascii")


def tokenizer_from_json(text: str) -> Tokenizer:
    return Tokenizer(base64.b64decode(text))


# Model config fields a run may change on resume: they change how it computes, not what.
UNCHECKED_FIELDS = ("name", "attn_impl", "attn_block_size", "attn_key_block_size")


def config_mismatch(saved: dict[str, Any], current: ModelConfig) -> list[str]:
    """Fields where a saved model config differs from ``current``, as readable strings.

    A field the saved config lacks (one added to ``ModelConfig`` after it was written) counts
    as its default, which a checkpoint written before it had.
    """
    now = current.to_dict()
    defaults = ModelConfig.from_dict({k: v for k, v in now.items() if k in saved}).to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    fields = sorted(set(saved) | set(now))
    return [
        f"{f}: checkpoint {saved.get(f)!r} != run {now.get(f)!r}"
        for f in fields
        if saved.get(f) != now.get(f) and f not in UNCHECKED_FIELDS
    ]


def describe_error(err: BaseException, root: pathlib.Path | None = None) -> str:
    """One short line for a read failure: TensorStore's code and the file, without its spec."""
    if isinstance(err, CheckpointError):
        return str(err)
    text = str(err).split(" [tensorstore_spec", 1)[0].strip()
    code = re.match(r"([A-Z_]+): ", text)
    files = re.findall(r'local file "([^"]+)"', text)
    if code and files:
        path = files[-1]
        tail = text[text.rindex(f'"{path}"') + len(path) + 2 :].lstrip(": ").strip()
        if root is not None and path.startswith(str(root) + os.sep):
            path = path[len(str(root)) + 1 :]
        return f"{code.group(1)} reading {path}: {tail[:160] or 'missing or unreadable'}"
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def is_damage(err: BaseException) -> bool:
    """Whether ``err`` shows that a step's files are missing, truncated or undecodable.

    Anything else (an ``OSError`` other than a missing file, a timeout, an unknown error) may
    be passing, so it must not be taken for a broken checkpoint.
    """
    decoded = CheckpointDamaged | FileNotFoundError | UnicodeDecodeError | json.JSONDecodeError
    if isinstance(err, decoded):
        return True
    return isinstance(err, ValueError) and str(err).startswith(_DAMAGE_CODES)


def check_files(step_dir: pathlib.Path, names: tuple[str, ...] = REQUIRED_FILES) -> None:
    """Raises :class:`CheckpointDamaged` naming each of ``names`` in ``step_dir`` that is
    absent, empty or (for the JSON ones) not JSON; an ``OSError`` while reading propagates."""
    problems = []
    for name in names:
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size == 0:
            problems.append(f"{name} is empty")
        elif name in JSON_FILES:
            problems += _json_problems(step_dir, [path])
    if "state/_METADATA" in names:  # per-process array metadata, where Orbax wrote it
        problems += _json_problems(step_dir, sorted(step_dir.glob("state/array_metadatas/*")))
    if problems:
        raise CheckpointDamaged("; ".join(problems))


def _json_problems(step_dir: pathlib.Path, paths: list[pathlib.Path]) -> list[str]:
    problems = []
    for path in paths:
        try:
            json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(f"{path.relative_to(step_dir)} is not valid JSON ({err})")
    return problems


def read_with_retries(
    read: Callable[[], T], what: str, step_dir: pathlib.Path, attempts: int, delay_s: float
) -> T:
    """``read()``, retried on failures that are not damage; damage raises at once.

    Raises:
      CheckpointDamaged: ``read`` failed in a way :func:`is_damage` recognizes.
      CheckpointError: every attempt failed otherwise; the step is left as it is.
    """
    _mute_abandoned_reads()
    attempt = 1
    while True:
        try:
            return read()
        except Exception as err:
            log.debug("reading the %s of %s failed", what, step_dir, exc_info=True)
            reason = describe_error(err, step_dir)
            if is_damage(err):
                raise CheckpointDamaged(f"{what}: {reason}") from None
            if attempt >= attempts:
                raise CheckpointError(
                    f"checkpoint {step_dir}: its {what} could not be read in {attempts} "
                    f"attempts ({reason}); it was left in place. Check the filesystem and rerun, "
                    "or move the step out of the directory to resume from an older one"
                ) from None
            delay = delay_s * attempt
            log.warning(
                "checkpoint %s: reading its %s failed (%s); retrying in %.1f s",
                step_dir,
                what,
                reason,
                delay,
            )
            time.sleep(delay)
            attempt += 1


class _AbandonedReadFilter(logging.Filter):
    """Drops asyncio's report of a failed read whose failure a restore already raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        abandoned = record.getMessage().startswith(
            ("Task exception was never retrieved", "Future exception was never retrieved")
        )
        return not (abandoned and error is not None and is_damage(error))


def _mute_abandoned_reads() -> None:
    """Drops the reports of the reads a failed restore abandons (once per process).

    When one array of a restore fails, Orbax raises and closes its event loop while TensorStore
    still completes the reads of the other arrays. Each completion then reports an unraisable
    "Event loop is closed" RuntimeError, or asyncio logs a "Task (or Future) exception was
    never retrieved" for another damaged array: tracebacks on stderr, at any later time, after
    the one error that matters. Every other unraisable exception and log record passes through.
    """
    previous = sys.unraisablehook
    if getattr(previous, "mutes_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.mutes_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


class Checkpointer:
    """Saves and restores training checkpoints under ``directory``; a context manager.

    Args:
      directory: checkpoint root (made absolute; created if missing).
      keep: number of most recent steps to keep.
      async_save: write in a background thread (call :meth:`wait` before exiting).
      read_attempts: tries of a read that fails for a reason other than damage.
      retry_delay_s: wait before the second try; it grows linearly with each try.
      numpy_in_place: write NumPy leaves of the state from their own memory: without the copy
        Orbax makes of each by default (a guard against changes while an asynchronous save
        runs) and uncompressed (the compressed chunks would be a second copy in memory), so a
        save needs no more host memory than the state; only with ``async_save=False``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int = 3,
        async_save: bool = True,
        read_attempts: int = 3,
        retry_delay_s: float = 1.0,
        numpy_in_place: bool = False,
    ):
        if numpy_in_place and async_save:
            raise ValueError("Checkpointer(numpy_in_place=True) needs async_save=False")
        self.directory = pathlib.Path(directory).absolute()
        self.aside = self.directory.parent / f"{self.directory.name}_unreadable"
        self.read_attempts, self.retry_delay_s = read_attempts, retry_delay_s
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._in_place = numpy_in_place
        if numpy_in_place:
            registry = ocp.type_handlers.create_type_handler_registry(
                (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
            )
            handlers = {
                "state": ocp.PyTreeCheckpointHandler(
                    type_handler_registry=registry, use_compression=False
                ),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            }
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        else:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "data", "meta")
            )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        meta = {**meta, "format": FORMAT, "step": int(step)}
        save = ocp.args.PyTreeSave if self._in_place else ocp.args.StandardSave
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=save(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restores ``step`` into the structure, shapes and shardings of ``target``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.state, out.data, out.meta

    def restore_format1(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores a format-1 ``step`` (see :mod:`sparse_jax.train.migrate`) into ``target``.

        The state is read in its own layout, its RNG key dropped and its weights (parameters
        and optimizer moments) transposed into today's layout and shardings.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        replicated = abstract.step.sharding
        legacy = {
            "step": abstract.step,
            "params": migrate.format1_targets(abstract.params),
            "opt_state": migrate.format1_targets(abstract.opt_state),
            "rng": jax.ShapeDtypeStruct(
                migrate.RNG_KEY.shape, migrate.RNG_KEY.dtype, sharding=replicated
            ),
        }
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(legacy), data=ocp.args.JsonRestore()
            ),
        )
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        state = type(target)(
            step=out.state["step"],
            params=migrate.from_format1(out.state["params"], shardings.params),
            opt_state=migrate.from_format1(out.state["opt_state"], shardings.opt_state),
        )
        return state, out.data

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` item of ``step``.

        Raises:
          CheckpointDamaged: the item is not sparse_jax metadata.
          CheckpointError: it is, of a format this version does not read.
        """
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = out.meta
        where = f"{self.directory / str(step)}/meta"
        if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("sparse_jax/"):
            raise CheckpointDamaged(f"{where} is not sparse_jax metadata (format {FORMAT})")
        try:
            migrate.check_format(meta["format"], where)
        except ValueError as err:
            # Not damage: a newer checkpoint stays where it is.
            raise CheckpointError(str(err)) from None
        return meta

    def restore_latest(self, target: Any, model_config: ModelConfig) -> Restored | None:
        """Newest step that restores, or None when no step does.

        Damaged steps on the way are moved to :attr:`aside` (see the module docstring).

        Raises:
          CheckpointError: the newest readable checkpoint was written for another model config
            or holds parameters only (an imported model), or a step failed to read for a
            reason other than damage on every attempt.
        """
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            try:
                self._read(lambda d=step_dir: check_files(d), "files", step_dir)
                meta = self._read(lambda s=step: self.read_meta(s), "metadata", step_dir)
                if meta.get("params_only"):
                    raise CheckpointError(
                        f"checkpoint {step_dir} holds parameters only (imported from "
                        f"{meta.get('source', {}).get('format', 'elsewhere')}), no optimizer or "
                        "data state: it cannot be resumed. Load it with sparse_jax.load or "
                        "serve.py, and train in another workdir"
                    )
                diff = config_mismatch(meta.get("model_config", {}), model_config)
                if diff:
                    raise CheckpointError(
                        f"checkpoint {step_dir} was written for a different model config: "
                        + "; ".join(diff)
                    )
                if meta["format"] == migrate.FORMAT_1:
                    state, data = self._read(
                        lambda s=step: self.restore_format1(s, target), "train state", step_dir
                    )
                    log.warning(
                        "checkpoint step %d is in format %s: converted to %s on reading (the "
                        "files are unchanged; checkpoints saved from now on are in %s)",
                        step,
                        migrate.FORMAT_1,
                        FORMAT,
                        FORMAT,
                    )
                else:
                    state, data, _ = self._read(
                        lambda s=step: self.restore(s, target), "train state", step_dir
                    )
                return Restored(step=step, state=state, data=data, meta=meta)
            except CheckpointDamaged as err:
                log.warning("checkpoint step %d is damaged (%s); trying an older one", step, err)
                self._quarantine(step)
        return None

    def _read(self, read: Callable[[], T], what: str, step_dir: pathlib.Path) -> T:
        return read_with_retries(read, what, step_dir, self.read_attempts, self.retry_delay_s)

    def moved_aside(self) -> list[pathlib.Path]:
        """Steps moved to :attr:`aside` by this or any earlier run, by name (``<step>-<time>``)."""
        return sorted(self.aside.iterdir()) if self.aside.is_dir() else []

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step aside (never deletes it) so the step can be re-saved."""
        if distributed.is_primary():  # one process moves it; the others wait for the move
            self.aside.mkdir(exist_ok=True)
            target = self.aside / f"{step}-{int(time.time())}"
            for n in itertools.count(1):
                if not target.exists():
                    break
                target = self.aside / f"{step}-{int(time.time())}-{n}"
            shutil.move(str(self.directory / str(step)), target)
            log.warning("moved damaged checkpoint step %d to %s", step, target)
        distributed.barrier(f"sparse_jax_quarantine_{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
