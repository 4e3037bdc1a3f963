"""The native Spark FFN block kernel at decode batch sizes, reading from DRAM; writes JSON.

Run from the repository root: ``.venv/bin/python -m benchmarks.block_ffn``. At the
``spark_gemma2_2b`` shapes it builds ``--sets`` different K2 / V weight sets (and per set
different random pre-activations, so each call has its own active neurons) and calls
:func:`pallas_kernels.sparse_ffn.native.spark_ffn_block` on the sets in turn, so that every
call reads its rows from memory rather than from the caches, as a decode step does (the
``FFN block`` row of ``benchmarks.decode`` times one layer over and over instead). Beside it,
as the yardstick of the same run, the native product (:func:`sparse_jax.model.products.linear`,
one row) streams through the same sets' V matrices. Reported: median ms per call over
``--repeats`` passes, and GB/s: the bytes of the K2 and V rows of the neurons active for at
least one token (the library's XLA statistical threshold), over the time. Results:
``benchmarks/results/block_ffn[_TAG].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import cpu_model
from configs import get_model_config
from pallas_kernels import _native
from pallas_kernels.sparse_ffn import native as ffn_native
from pallas_kernels.stat_topk.xla import statistical_threshold
from sparse_jax.model import products

RESULTS = pathlib.Path(__file__).parent / "results"


def per_call_ms(fn, arg_sets, repeats: int) -> float:
    """Median over ``repeats`` passes of one pass's wall ms per call, calling ``fn`` on each
    argument set in turn (dispatched back to back, waited for at the end)."""
    jax.block_until_ready([fn(*a) for a in arg_sets])
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([fn(*a) for a in arg_sets])
        samples.append((time.perf_counter() - start) * 1e3 / len(arg_sets))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", type=int, default=12, help="weight sets called in turn")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    if not _native.available():
        raise SystemExit(f"error: {_native.unavailable_reason()}")
    cfg = get_model_config("spark_gemma2_2b")
    f, d, r = cfg.ffn_dim, cfg.model_dim, cfg.ffn_predictor_dim
    keep = cfg.ffn_keep_count
    block = jax.jit(
        lambda pre, x, k2, v: ffn_native.spark_ffn_block(pre, x, k2, v, keep_count=keep)
    )
    stream = jax.jit(lambda x, w: products.linear(x, w, native=True))
    rows = []
    for dtype in args.dtypes.split(","):
        key = jax.random.key(0)
        weights = [
            tuple(
                (jax.random.normal(jax.random.fold_in(key, 2 * i + j), shape) * 0.05).astype(dtype)
                for j, shape in enumerate(((f, d - r), (f, d)))
            )
            for i in range(args.sets)
        ]
        itemsize = jnp.dtype(dtype).itemsize
        x_one = jnp.ones((1, d), jnp.float32)
        stream_ms = per_call_ms(stream, [(x_one, w[1]) for w in weights], args.repeats)
        stream_gbs = f * d * itemsize / stream_ms / 1e6
        for tokens in (int(t) for t in args.tokens.split(",")):
            sets = []
            for i, (k2, v) in enumerate(weights):
                sub = jax.random.fold_in(key, 1000 + i)
                pre = jax.random.normal(sub, (tokens, f), jnp.float32)
                x = jax.random.normal(jax.random.fold_in(sub, 1), (tokens, d - r), jnp.float32)
                sets.append((pre, x, k2, v))
            ms = per_call_ms(block, sets, args.repeats)
            # The neurons above each token's threshold, and their union (the rows read).
            union = pairs = 0
            for pre, x, k2, v in sets:
                _, active = block(pre, x, k2, v)
                pairs += float(np.asarray(active).sum())
                theta, _ = statistical_threshold(pre, keep)
                union += int(jnp.any(pre > theta, axis=0).sum())
            union /= len(sets)
            gbs = union * (2 * d - r) * itemsize / ms / 1e6
            rows.append(
                {
                    "dtype": dtype,
                    "tokens": tokens,
                    "ms": ms,
                    "active_per_token": pairs / len(sets) / tokens,
                    "rows_read": union,
                    "gb_per_s": gbs,
                    "stream_ms": stream_ms,
                    "stream_gb_per_s": stream_gbs,
                }
            )
            print(rows[-1], flush=True)
        del weights
    report = {
        "machine": f"{cpu_model()}, native isa {_native.isa()}",
        "shapes": {"F": f, "D": d, "R": r, "keep_count": keep},
        "sets": args.sets,
        "repeats": args.repeats,
        "rows": rows,
    }
    lines = [
        f"# Spark FFN block kernel from DRAM ({report['machine']})",
        "",
        f"F {f}, D {d}, R {r}, keep_count {keep}; {args.sets} weight sets called in turn, "
        f"median of {args.repeats} passes. GB/s: the K2 and V rows of the neurons active for "
        "at least one token over the time; stream: the native one-row product over the same "
        "sets' V in the same run.",
        "",
        "| dtype | tokens | ms per call | active per token | rows read | GB/s | stream GB/s "
        "| of stream |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dtype']} | {row['tokens']} | {row['ms']:.3f} | "
            f"{row['active_per_token']:.0f} | {row['rows_read']:.0f} | "
            f"{row['gb_per_s']:.1f} | {row['stream_gb_per_s']:.1f} | "
            f"{row['gb_per_s'] / row['stream_gb_per_s']:.0%} |"
        )
    stem = "block_ffn" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
