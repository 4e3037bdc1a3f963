"""Train a Spark (or dense) model: ``python train.py --config tiny [--set field=value ...]``.

Resumes from the newest complete checkpoint in ``--workdir`` by itself. ``--set`` takes fields
of the model config (``num_layers=2``) or the train config (``steps=100``,
``data_paths=my.txt``); a name in both must be prefixed (``model.``/``train.``).
``--mesh data=2,fsdp=2,tensor=2`` shards the run over the devices (``train.mesh``). Several
processes train one model when each is started with ``--coordinator HOST:PORT
--num-processes N --process-id I``, or with ``--distributed`` where JAX reads the cluster from
the environment (TPU pods, SLURM); see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys

from configs import MODEL_PRESETS, get_model_config, get_train_config
from sparse_jax import distributed
from sparse_jax.config import override
from sparse_jax.trainer import TrainingDiverged, train


def split_overrides(assignments: list[str], model_cfg, train_cfg) -> tuple[list[str], list[str]]:
    model_fields = {f.name for f in dataclasses.fields(model_cfg)}
    train_fields = {f.name for f in dataclasses.fields(train_cfg)}
    to_model, to_train = [], []
    for item in assignments:
        name = item.split("=", 1)[0].strip()
        if name.startswith("model."):
            to_model.append(item.removeprefix("model."))
        elif name.startswith("train."):
            to_train.append(item.removeprefix("train."))
        elif name in model_fields and name in train_fields:
            raise ValueError(f"--set {name}: ambiguous, write model.{name} or train.{name}")
        elif name in model_fields:
            to_model.append(item)
        elif name in train_fields:
            to_train.append(item)
        else:
            raise ValueError(
                f"--set {name}: no such field; model fields: {sorted(model_fields)}; "
                f"train fields: {sorted(train_fields)}"
            )
    return to_model, to_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--workdir", default=None, help="default: runs/<config>")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N steps")
    parser.add_argument(
        "--mesh", default=None, metavar="AXIS=SIZE,...", help="e.g. data=2,fsdp=2,tensor=2"
    )
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
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
            model_cfg, train_cfg, args.workdir or f"runs/{args.config}", stop_after=args.stop_after
        )
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trained = "" if math.isnan(summary["loss"]) else f"train loss {summary['loss']:.4f}, "
    print(
        f"step {summary['step']}: {trained}eval loss "
        f"{summary['eval_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f}); "
        f"checkpoints in {summary['workdir']}/checkpoints"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
