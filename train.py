"""Train a Spark (or dense) model: ``python train.py --config tiny [--set field=value ...]``.

Resumes from the newest complete checkpoint in ``--workdir`` by itself. ``--set`` takes fields
of the model config (``num_layers=2``), the train config (``steps=100``) or its data config
(``paths=my.txt``, ``seq_len=64``); a name in two of them must be prefixed (``model.``,
``train.``, ``data.``).
``--mesh data=2,fsdp=2,tensor=2`` shards the run over the devices (``train.mesh``). Several
processes train one model when each is started with ``--coordinator HOST:PORT
--num-processes N --process-id I``, or with ``--distributed`` where JAX reads the cluster from
the environment (TPU pods, SLURM); see docs/distributed.md.

Exit status: 0 when the run finished or stopped cleanly (SIGTERM/SIGINT or ``--stop-after``
save a checkpoint first), 2 for a bad argument, config, path or checkpoint (one line on
stderr), 3 when the loss or the parameters became NaN or Inf.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from typing import NoReturn

from configs import MODEL_PRESETS, get_model_config, get_train_config
from pallas_kernels import ImplementationUnavailableError
from sparse_jax.model.config import override
from sparse_jax.parallel import distributed
from sparse_jax.train.loop import TrainingDiverged, train


def split_overrides(assignments: list[str], model_cfg, train_cfg) -> tuple[list[str], list[str]]:
    """Sorts ``--set`` items into the model config's and the train config's.

    A name may be prefixed (``model.``, ``train.``, ``data.`` for ``train.data.``); unprefixed,
    it must belong to exactly one of the model, train and data fields.
    """
    groups = {
        "model": {f.name for f in dataclasses.fields(model_cfg)},
        "train": {f.name for f in dataclasses.fields(train_cfg)},
        "data": {f.name for f in dataclasses.fields(train_cfg.data)},
    }
    to_model, to_train = [], []
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like field=value")
        name, value = item.split("=", 1)
        name = name.strip()
        prefix, _, rest = name.partition(".")
        if prefix == "train" and rest.startswith("data."):
            prefix, rest = "data", rest.removeprefix("data.")
        if prefix not in groups or not rest:
            owners = [group for group, fields in groups.items() if name in fields]
            if len(owners) > 1:
                choices = " or ".join(f"{group}.{name}" for group in owners)
                raise ValueError(f"--set {name}: ambiguous, write {choices}")
            if not owners:
                listing = "; ".join(f"{g} fields: {sorted(f)}" for g, f in groups.items())
                raise ValueError(f"--set {name}: no such field; {listing}")
            prefix, rest = owners[0], name
        if prefix == "model":
            to_model.append(f"{rest}={value}")
        elif prefix == "train":
            to_train.append(f"{rest}={value}")
        else:
            to_train.append(f"data.{rest}={value}")
    return to_model, to_train


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of this script."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= {minimum}")
        return value

    return parse


def summary_line(summary: dict) -> str:
    """What the run did, in one line: steps, losses, how it ended, where the checkpoints are."""
    step, steps = summary["step"], summary["steps"]
    parts = []
    if not math.isnan(summary["loss"]):
        parts.append(f"train loss {summary['loss']:.4f}")
    if not summary["has_eval_set"]:
        parts.append("no eval set (eval_fraction=0)")
    elif summary["eval_step"] is None:
        parts.append("not evaluated yet")
    else:
        at = "" if summary["eval_step"] == step else f" at step {summary['eval_step']}"
        parts.append(f"eval loss {summary['eval_loss']:.4f}{at}")
    parts.append(f"unigram entropy {summary['unigram_entropy']:.4f}")
    ending = {
        "signal": " (stopped by a signal; checkpoint saved, rerun to resume)",
        "stop_after": " (stopped by --stop-after; checkpoint saved, rerun to resume)",
    }.get(summary["stopped"], "")
    return (
        f"step {step} of {steps}{ending}: {', '.join(parts)}; "
        f"checkpoints in {summary['workdir']}/checkpoints"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n")[-1].replace("``", ""),
    )
    parser.add_argument("--config", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument(
        "--workdir", default=None, help="run directory, created if missing (default: runs/<config>)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument(
        "--stop-after",
        type=_integer(1),
        default=None,
        metavar="N",
        help="save and stop after N (>= 1) steps of this invocation",
    )
    parser.add_argument(
        "--restart-if-unreadable",
        action="store_true",
        help="when no checkpoint in the workdir restores (damaged steps are moved to "
        "checkpoints_unreadable/), start again from step 0 instead of stopping with an error; "
        "a readable checkpoint is still resumed",
    )
    parser.add_argument(
        "--allow-schedule-change",
        action="store_true",
        help="resume even though steps, learning_rate, warmup_steps or min_lr_ratio differ "
        "from the checkpoint's (the learning rate jumps to the new schedule); without it that "
        "is an error, except more steps for a finished run",
    )
    parser.add_argument(
        "--mesh", default=None, metavar="AXIS=SIZE,...", help="e.g. data=2,fsdp=2,tensor=2"
    )
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT")
    parser.add_argument("--num-processes", type=_integer(1), default=None)
    parser.add_argument("--process-id", type=_integer(0), default=None)
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run described by the cluster environment (TPU pod, SLURM)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            from_environment=args.distributed,
        )
        model_cfg = get_model_config(args.config)
        train_cfg = get_train_config(args.config)
        assignments = args.set + ([f"train.mesh={args.mesh}"] if args.mesh is not None else [])
        to_model, to_train = split_overrides(assignments, model_cfg, train_cfg)
        model_cfg, train_cfg = override(model_cfg, to_model), override(train_cfg, to_train)
        summary = train(
            model_cfg,
            train_cfg,
            args.workdir or f"runs/{args.config}",
            stop_after=args.stop_after,
            restart_if_unreadable=args.restart_if_unreadable,
            allow_schedule_change=args.allow_schedule_change,
        )
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, OSError, MemoryError, ImplementationUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
