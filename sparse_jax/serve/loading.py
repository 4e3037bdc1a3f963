"""``sparse_jax.load``: a trained model's config, parameters and tokenizer from a checkpoint.

Accepts a training workdir (``runs/tiny``), its ``checkpoints`` directory, or one step's
directory (``runs/tiny/checkpoints/300``). Only the parameters are read (not the optimizer
state). Parameters land on the default device, or are laid out by ``shardings`` (a pytree of
``jax.sharding.Sharding`` matching the parameters, or a callable from the abstract parameters
to one), whatever the mesh or process count that wrote them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.transformer import Params, abstract_params
from sparse_jax.train import migrate
from sparse_jax.train.checkpoint import (
    FORMAT,
    CheckpointDamaged,
    CheckpointError,
    check_files,
    read_with_retries,
    tokenizer_from_json,
)

log = logging.getLogger(__name__)

READ_ATTEMPTS, RETRY_DELAY_S = 3, 1.0
# What loading reads: the data iterator's state may be damaged without harm here.
PARAMETER_FILES = ("meta/metadata", "state/_METADATA", "state/manifest.ocdbt")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What :func:`load` returns."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer
    step: int
    path: pathlib.Path


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and (path / "meta").is_dir() and (path / "state").is_dir()


def step_dirs(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """The complete step directories under ``path``, newest first (``[path]`` if it is one).

    Raises:
      CheckpointError: ``path`` is missing, a file, or holds no complete step.
    """
    root = pathlib.Path(path).absolute()
    if not root.exists():
        raise CheckpointError(f"checkpoint path {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {root} is a file, not a checkpoint directory")
    if _is_step_dir(root):
        return [root]
    for candidate in (root / "checkpoints", root):
        if candidate.is_dir():
            steps = sorted(
                (p for p in candidate.iterdir() if p.is_dir() and _is_step_dir(p)),
                key=lambda p: int(p.name),
                reverse=True,
            )
            if steps:
                return steps
    partial = [p.name for p in root.glob("**/*.orbax-checkpoint-tmp*")]
    hint = f" (only unfinished saves: {partial})" if partial else ""
    raise CheckpointError(
        f"{root} holds no complete sparse_jax checkpoint{hint}; expected a training workdir, "
        "its checkpoints/ directory, or a step directory containing meta/ and state/"
    )


def resolve_step_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """The newest complete step directory under ``path`` (or ``path`` itself if it is one)."""
    return step_dirs(path)[0]


def load(
    path: str | os.PathLike[str],
    shardings: Any | Callable[[Params], Any] | None = None,
) -> LoadedModel:
    """Loads a checkpoint written by ``train.py``.

    Given a workdir or checkpoints directory, a damaged newest step (missing, empty, truncated
    or undecodable files) is skipped with a one-line warning and the next older one is loaded.
    Other read failures are retried a few times and then raised: a passing filesystem error
    does not silently load an older model.

    Args:
      path: training workdir, checkpoints directory, or step directory.
      shardings: optional target shardings for the parameters (pytree or callable of the
        abstract parameters, such as ``sparse_jax.parallel.sharding.ShardingPlan.tree_shardings``);
        default: the current default device.

    Returns:
      LoadedModel with config, params, tokenizer, step and the step directory.

    Raises:
      CheckpointError: the path is missing, not a checkpoint, partial, or unreadable; the
        message names each step tried and the file that failed.
    """
    candidates = step_dirs(path)
    damaged: list[tuple[str, CheckpointDamaged]] = []
    for step_dir in candidates:
        try:
            model = _load_step(step_dir, shardings)
        except CheckpointDamaged as err:
            damaged.append((step_dir.name, err))
            continue
        for step, err in damaged:
            log.warning(
                "skipped damaged checkpoint step %s (%s); loaded step %s", step, err, model.step
            )
        return model
    where = candidates[0] if len(candidates) == 1 else candidates[0].parent
    steps = "; ".join(f"step {step}: {err}" for step, err in damaged)
    raise CheckpointError(f"no readable checkpoint in {where}: {steps}")


def _load_step(step_dir: pathlib.Path, shardings: Any) -> LoadedModel:
    def read(what: str, fn: Callable[[], Any]) -> Any:
        return read_with_retries(fn, what, step_dir, READ_ATTEMPTS, RETRY_DELAY_S)

    read("files", lambda: check_files(step_dir, PARAMETER_FILES))
    meta = read("metadata", lambda: ocp.JsonCheckpointHandler().restore(step_dir / "meta"))
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("sparse_jax/"):
        raise CheckpointError(f"{step_dir} is not a sparse_jax checkpoint (format {FORMAT})")
    try:
        migrate.check_format(meta["format"], str(step_dir))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    config = ModelConfig.from_dict(meta["model_config"])
    abstract = abstract_params(config)
    if callable(shardings):
        shardings = shardings(abstract)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    legacy = meta["format"] == migrate.FORMAT_1
    if legacy:
        # Read in the format-1 layout, then transposed into today's (files unchanged).
        final_shardings, target = shardings, migrate.format1_targets(target)
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), {"params": target}
    )
    restored = read(
        "parameters",
        lambda: ocp.PyTreeCheckpointer().restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args=restore_args, partial_restore=True
            ),
        ),
    )
    params = restored["params"]
    if legacy:
        params = migrate.from_format1(params, final_shardings)
    return LoadedModel(
        config=config,
        params=params,
        tokenizer=tokenizer_from_json(meta["tokenizer"]),
        step=int(meta["step"]),
        path=step_dir,
    )
