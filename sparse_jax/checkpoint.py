"""Checkpoints: Orbax CheckpointManager over train state, data-iterator state and metadata.

A checkpoint directory holds one sub-directory per saved step (written to a temporary name and
renamed when complete, so a killed save never looks finished). Each step has three items:

* ``state``: the :class:`~sparse_jax.train_step.TrainState` (params, optimizer state, step, RNG);
* ``data``: the training iterator's JSON state, so a resumed run sees the next batch;
* ``meta``: model and train configs and the SentencePiece tokenizer (base64), so a checkpoint
  is self-contained.

:meth:`Checkpointer.restore_latest` walks back from the newest step and skips, with a warning,
any step that fails to restore (truncated or corrupted files).

Arrays are saved in whatever sharding they have, by every process of a multi-process run
together, and restored into the shardings of the target state: a checkpoint moves freely
between meshes, device counts and process counts.
"""

from __future__ import annotations

import base64
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from sparse_jax import distributed
from sparse_jax.config import ModelConfig
from sparse_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "sparse_jax/1"


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint, or one that does not fit the run."""


def tokenizer_to_json(tokenizer: Tokenizer) -> str:
    return base64.b64encode(tokenizer.model_proto).decode("ascii")


def tokenizer_from_json(text: str) -> Tokenizer:
    return Tokenizer(base64.b64decode(text))


def config_mismatch(saved: dict[str, Any], current: ModelConfig) -> list[str]:
    """Fields where a saved model config differs from ``current``, as readable strings."""
    now = current.to_dict()
    fields = sorted(set(saved) | set(now))
    return [
        f"{f}: checkpoint {saved.get(f)!r} != run {now.get(f)!r}"
        for f in fields
        if saved.get(f) != now.get(f) and f != "name"
    ]


class Checkpointer:
    """Saves and restores training checkpoints under ``directory``.

    Args:
      directory: checkpoint root (made absolute; created if missing).
      keep: number of most recent steps to keep.
      async_save: write in a background thread (call :meth:`wait` before exiting).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        meta = {**meta, "format": FORMAT, "step": int(step)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
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

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = out.meta
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.directory / str(step)} is not a sparse_jax checkpoint")
        return meta

    def restore_latest(
        self, target: Any, model_config: ModelConfig
    ) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
        """Newest step that restores cleanly, or None when there is none.

        Raises:
          CheckpointError: the newest readable checkpoint was written for another model config.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as err:
                log.warning("checkpoint step %d is unreadable (%s); trying an older one", step, err)
                self._quarantine(step)
                continue
            diff = config_mismatch(meta.get("model_config", {}), model_config)
            if diff:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} was written for a different model "
                    "config: " + "; ".join(diff)
                )
            try:
                return self.restore(step, target)
            except Exception as err:
                log.warning(
                    "checkpoint step %d failed to restore (%s); trying an older one", step, err
                )
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        """Moves an unrestorable step aside (never deletes it) so the step can be re-saved."""
        if distributed.is_primary():  # one process moves it; the others wait for the move
            aside = self.directory.parent / f"{self.directory.name}_unreadable"
            aside.mkdir(exist_ok=True)
            target = aside / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), target)
            log.warning("moved unreadable checkpoint step %d to %s", step, target)
        distributed.barrier(f"sparse_jax_quarantine_{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
