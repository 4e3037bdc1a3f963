"""Quality at equal parameters and tokens: the dense and Spark ``small`` presets side by side.

Trains ``small_dense`` and ``small`` (about 21M parameters each) on the same batches of the
bundled corpus (same seed, tokenizer and data order), then reports each final eval loss, their
ratio, the sparsity reached per layer, and a PNG of both loss curves. Runs resume by themselves
(the trainer's checkpoints), so an interrupted benchmark picks up where it stopped.

    python benchmarks/quality.py                  # 200 steps x 8 x 256 tokens each
    python benchmarks/quality.py --steps 100      # a quick look

Writes ``benchmarks/results/quality.json`` and ``benchmarks/results/quality.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from configs import get_model_config, get_train_config
from sparse_jax.train.loop import train

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _curves(workdir: pathlib.Path) -> dict[str, list]:
    out: dict[str, list] = {"train": [], "eval": [], "sparsity": None}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            out["train"].append((record["step"], record["loss"]))
            out["sparsity"] = {
                "ffn_active_fraction": record["ffn_active_fraction"],
                "attn_keys_per_query": record["attn_keys_per_query"],
            }
        elif record["kind"] == "eval":
            out["eval"].append((record["step"], record["loss"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--workdir", default="runs/quality")
    args = parser.parse_args()

    base = get_train_config("small")
    tc = dataclasses.replace(
        base,
        steps=args.steps,
        data=dataclasses.replace(base.data, batch_size=args.batch, seq_len=args.seq),
        warmup_steps=max(1, args.steps // 10),
        eval_every=max(1, args.steps // 10),
        checkpoint_every=max(1, args.steps // 5),
        log_every=max(1, args.steps // 50),
    )
    tokens = tc.steps * tc.data.batch_size * tc.data.seq_len
    results = {"steps": tc.steps, "tokens_per_model": tokens, "models": {}}
    for name in ("small_dense", "small"):
        cfg = get_model_config(name)
        workdir = pathlib.Path(args.workdir).absolute() / name
        summary = train(cfg, tc, workdir)
        curves = _curves(workdir)
        results["models"][name] = {
            "final_eval_loss": summary["eval_loss"],
            "unigram_entropy": summary["unigram_entropy"],
            "eval_curve": curves["eval"],
            "train_curve": curves["train"],
            "sparsity_at_end": curves["sparsity"],
        }
        print(f"{name}: eval loss {summary['eval_loss']:.4f} after {tokens:,} tokens", flush=True)
    dense = results["models"]["small_dense"]["final_eval_loss"]
    spark = results["models"]["small"]["final_eval_loss"]
    results["spark_over_dense_eval_loss"] = spark / dense

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("small_dense", "tab:blue"), ("small", "tab:red")):
        model = results["models"][name]
        steps, losses = zip(*model["train_curve"], strict=True)
        ax.plot(steps, losses, color=style, alpha=0.35, label=f"{name} train")
        steps, losses = zip(*model["eval_curve"], strict=True)
        ax.plot(steps, losses, "o-", color=style, label=f"{name} eval")
    ax.set_xlabel(f"step ({tc.data.batch_size} x {tc.data.seq_len} tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"small presets, equal parameters and tokens: Spark/dense = {spark / dense:.4f}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)
    print(f"Spark/dense eval loss: {spark / dense:.4f}; wrote {RESULTS / 'quality.json'}")


if __name__ == "__main__":
    main()
