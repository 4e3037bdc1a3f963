"""Train a Spark (or dense) model: ``python train.py --config tiny [--set field=value ...]``.

Resumes from the newest complete checkpoint in ``--workdir`` by itself. ``--set`` takes fields
of the model config (``num_layers=2``) or the train config (``steps=100``,
``data_paths=my.txt``); a name in both must be prefixed (``model.``/``train.``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from configs import MODEL_PRESETS, get_model_config, get_train_config
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        model_cfg = get_model_config(args.config)
        train_cfg = get_train_config(args.config)
        to_model, to_train = split_overrides(args.set, model_cfg, train_cfg)
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
    print(
        f"step {summary['step']}: train loss {summary['loss']:.4f}, eval loss "
        f"{summary['eval_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f}); "
        f"checkpoints in {summary['workdir']}/checkpoints"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
