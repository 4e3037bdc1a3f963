"""Training step time: Spark vs dense at equal parameters, and Spark's top-k baselines.

Times one jitted train step (forward, backward, AdamW) of the dense preset, the Spark preset
with statistical top-k, and the Spark preset with ``jax.lax.top_k`` and ``jax.lax.approx_max_k``
finding the threshold instead. The variants are measured round-robin in one process (each
round runs every variant once), so machine noise hits them alike; the report uses medians.

    python benchmarks/train_step.py                 # small presets, batch 8 x 256
    python benchmarks/train_step.py --preset tiny   # quick look

Writes ``benchmarks/results/train_step.json`` and prints a markdown table.

With ``--context-lens 256,1024,4096`` it sweeps the context instead: the ``small`` presets at
batch 1, dense and Spark, materialized and blockwise attention, the step time (round-robin,
median of ``--rounds``) and the compiled step's temporary bytes at each length, with the
Spark/dense ratio per length and form. That is :mod:`benchmarks.long_context`'s training
sweep; it writes ``long_context.{json,md}`` into ``--context-out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import get_model_config
from sparse_jax.data.pipeline import DataConfig
from sparse_jax.train.config import TrainConfig
from sparse_jax.train.optim import make_optimizer
from sparse_jax.train.step import init_train_state, make_train_step

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name and vector extensions: XLA:CPU's speed depends on both."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name or platform.machine()} ({' '.join(wanted) or 'no AVX2'})"


def variants(preset: str) -> dict[str, object]:
    spark = get_model_config(preset)
    return {
        "dense": get_model_config(f"{preset}_dense"),
        "spark (statistical top-k)": spark,
        "spark (lax.top_k)": dataclasses.replace(spark, topk_method="lax_top_k"),
        "spark (approx_max_k)": dataclasses.replace(spark, topk_method="approx_max_k"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "train_step.json"))
    parser.add_argument("--context-lens", default="", help="e.g. 256,1024,4096: sweep these")
    parser.add_argument("--context-out", default=str(RESULTS))
    args = parser.parse_args()
    if args.context_lens:
        root = str(RESULTS.parent.parent)
        if root not in sys.path:  # run as a script: the repository root is not on the path
            sys.path.insert(0, root)
        from benchmarks import long_context

        lens = args.context_lens
        sweep = ["--memory-lens", lens, "--time-lens", lens, "--prefill-lens", ""]
        long_context.main([*sweep, "--rounds", str(args.rounds), "--out", args.context_out])
        return

    tc = TrainConfig(data=DataConfig(batch_size=args.batch, seq_len=args.seq))
    opt = make_optimizer(tc)
    runners = {}
    for name, cfg in variants(args.preset).items():
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
        batch = {
            "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
            "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "mask": jnp.ones((args.batch, args.seq), jnp.float32),
        }
        step = make_train_step(cfg, opt, 1)
        state = init_train_state(cfg, opt, 0)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        print(f"{name}: compiled and ran once in {time.perf_counter() - start:.1f} s", flush=True)
        runners[name] = {"step": step, "state": state, "batch": batch, "times": []}

    for _ in range(args.rounds):
        for run in runners.values():
            start = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)

    dense = statistics.median(runners["dense"]["times"])
    rows = {}
    for name, run in runners.items():
        median = statistics.median(run["times"])
        rows[name] = {
            "median_s": median,
            "times_s": run["times"],
            "relative_to_dense": median / dense,
            "tokens_per_s": args.batch * args.seq / median,
        }
    result = {
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq,
        "rounds": args.rounds,
        "machine": f"{cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s)",
        "variants": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| variant ({args.preset}, batch {args.batch} x {args.seq}) | step s | vs dense |")
    print("|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_s']:.3f} | {row['relative_to_dense']:.2f}x |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
