"""Decode speed of ``gemma2_2b`` against ``spark_gemma2_2b``, beside the memory-bandwidth bound.

Run from the repository root: ``.venv/bin/python -m benchmarks.decode [--quick]``. Random
weights are built leaf by leaf in the model's layout
(:func:`sparse_jax.model.weights.random_params`), one model at a time (each is 10.5 GB in
float32), and the two models alternate within the run. Measured: batch-1 decode ms/token at
prompt lengths 128, 2048 and 8192 (the cache is filled with random keys and values rather than
by a prefill), batch 8 at 128 (Spark's masked, per-token and union FFN modes, and the one
``"auto"`` picks), one FFN block, one global attention layer's cache read at 32768, and the
float32 prefill of a 2048-token prompt (compute-bound and the same in every layer, so it is
timed on the first ``--prefill-layers`` layers and twice as many, and scaled to the whole
depth; :func:`benchmarks.prefill_timing.prefill_compare`). Every ratio is printed
beside its bound: the bytes each variant must read per step (:mod:`sparse_jax.cost.decode_bytes`)
over the read bandwidth measured in the same run. ``--quick`` keeps the widths (and the
vocabulary) with 2 layers. ``--implementation`` picks the kernels (``auto``: the native CPU
kernels when built; ``xla`` for XLA's), and the report names the one each figure used.
Results go to ``benchmarks/results/decode[_quick][_<implementation>][_<tag>].{json,md,png}``
(no implementation suffix for ``auto``; ``--tag`` names the machine when one is not the
usual one).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.prefill_timing import prefill_compare
from configs import get_model_config
from pallas_kernels import _native
from sparse_jax.cost.decode_bytes import attention_op_bytes, ffn_block_bytes, step_bytes
from sparse_jax.decode.cache import KVCache, init_cache
from sparse_jax.decode.step import DecodeOptions, decode_step_jit, ffn_mode
from sparse_jax.kernels import XLA_KERNELS, Kernels
from sparse_jax.model.attention import attend_masked, attend_sparse
from sparse_jax.model.attention_native import attend_decode_native
from sparse_jax.model.ffn import make_ffn
from sparse_jax.model.weights import random_params
from sparse_jax.policy import policy_for

NAMES = ("gemma2_2b", "spark_gemma2_2b")
RESULTS = pathlib.Path(__file__).parent / "results"


def timed(fn, *args, repeats: int, **kwargs) -> float:
    """Median wall milliseconds of ``fn(*args)`` over ``repeats`` calls after one warm-up."""
    jax.block_until_ready(fn(*args, **kwargs))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: a float32 sum over an array far larger than the caches."""
    x = jnp.ones((int(gigabytes * 2**30) // 4,), jnp.float32)
    ms = timed(jax.jit(jnp.sum), x, repeats=repeats)
    return x.nbytes / (ms / 1e3)


def cpu_model() -> str:
    """The CPU's model name (Linux), or the platform's processor string."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def synthetic_cache(cfg, batch: int, context: int, max_len: int, seed: int = 0) -> KVCache:
    """A cache holding ``context`` tokens of random keys and values, as a prefill would."""
    cache = init_cache(cfg, batch, max_len)
    key = jax.random.key(seed)
    layers = []
    for i, layer in enumerate(cache.layers):
        size = layer["pos"].shape[1]
        times = np.arange(max(0, context - size), context)
        pos = np.full((batch, size), -1, np.int32)
        pos[:, times % size] = times
        new = {"pos": jnp.asarray(pos)}
        for name, value in layer.items():
            if name != "pos":
                sub = jax.random.fold_in(key, i * 8 + len(new))
                new[name] = jax.random.normal(sub, value.shape, value.dtype)
        layers.append(new)
    return KVCache(
        layers=tuple(layers),
        length=jnp.int32(context),
        next_pos=jnp.full((batch,), context, jnp.int32),
    )


def decode_ms(cfg, params, opts, batch, context, steps) -> tuple[float, dict]:
    """Median ms per decode step at ``context`` cached tokens, and the last step's stats."""
    cache = synthetic_cache(cfg, batch, context, context + steps + 2)
    tokens = jnp.zeros((batch,), jnp.int32)
    samples, stats = [], {}
    for step in range(steps + 1):
        start = time.perf_counter()
        logits, cache, stats = decode_step_jit(cfg, opts, params, cache, tokens)
        jax.block_until_ready(logits)
        if step:  # the first step compiles
            samples.append((time.perf_counter() - start) * 1e3)
    del cache
    stats = {k: np.asarray(v).tolist() for k, v in stats.items()}
    return statistics.median(samples), stats


def ffn_ms(cfg, params, repeats, implementation) -> dict[str, float]:
    """One FFN layer at batch 1: the gated FFN, or Spark's sparse and masked paths."""
    p = {"params": params["layers_0"]["ffn"]}
    x = jax.random.normal(jax.random.key(1), (1, 1, cfg.model_dim), jnp.float32)
    ffn = make_ffn(cfg, "ffn", Kernels(implementation))
    masked = jax.jit(lambda p, x: ffn.apply(p, x, True)[0])
    if cfg.ffn_kind != "spark":
        return {"ffn": timed(masked, p, x, repeats=repeats)}
    caps = DecodeOptions().ffn_caps(cfg, 1)
    # The mode a batch-1 decode step picks (the block kernel with the native kernels).
    mode = ffn_mode(cfg, 1, "auto", caps, "auto", Kernels(implementation).native())
    sparse = jax.jit(lambda p, x: ffn.apply(p, x, True, mode, caps[0])[0])
    return {
        "ffn": timed(sparse, p, x, repeats=repeats),
        "ffn_masked": timed(masked, p, x, repeats=repeats),
    }


def attention_ms(base_cfgs, context: int, repeats: int, implementation: str) -> dict[str, float]:
    """One global layer's attention of one query over ``context`` keys, as in a decode step:
    ``context - 1`` cached tokens plus the current token's own key."""
    out = {}
    for name, cfg in base_cfgs.items():
        cfg = dataclasses.replace(cfg, max_seq_len=context)
        layer_idx = cfg.layer_types.index("global")
        cache = synthetic_cache(cfg, 1, context - 1, context, seed=3)
        layer = cache.layers[layer_idx]
        new = {
            k: jax.random.normal(jax.random.key(5), (*v.shape[:2], 1, v.shape[3]), v.dtype)
            for k, v in layer.items()
            if k != "pos"
        }
        new["pos"] = jnp.full((1, 1), context - 1, jnp.int32)
        q = jax.random.normal(jax.random.key(4), (1, 1, cfg.num_heads, cfg.head_dim))
        window = cfg.layer_windows[layer_idx]
        masked = jax.jit(
            lambda q, layer, new, window=window, cfg=cfg: attend_masked(
                cfg, q, (layer, new), new["pos"], window, True, XLA_KERNELS
            )
        )
        out[name] = timed(masked, q, layer, new, repeats=repeats)
        kernels = Kernels(implementation)
        if kernels.native():
            # The decode step's own path: the fused native kernel, dense and Spark alike.
            fused = jax.jit(
                lambda q, layer, new, window=window, cfg=cfg, kernels=kernels: attend_decode_native(
                    cfg, q, layer, new, new["pos"], window, kernels
                )
            )
            out[name + "/masked"] = out[name]
            out[name] = timed(fused, q, layer, new, repeats=repeats)
        elif cfg.attn_kind == "spark":
            cap = DecodeOptions().attn_cap(cfg, context)
            sparse = jax.jit(
                lambda q, layer, new, window=window, cfg=cfg, cap=cap: attend_sparse(
                    cfg, q, layer, new, new["pos"], window, cap, Kernels(implementation)
                )
            )
            out[name + "/masked"] = out[name]
            out[name] = timed(sparse, q, layer, new, repeats=repeats)
        del cache, layer
    return out


def measure_model(cfg, args, dtype_is_f32: bool) -> dict:
    """Every measurement that needs this model's weights; the weights are freed on return."""
    start = time.perf_counter()
    params = random_params(cfg, seed=0)
    jax.block_until_ready(params)
    out: dict = {"build_s": time.perf_counter() - start}
    impl = args.implementation
    opts = DecodeOptions(implementation=impl)
    for context in args.contexts:
        ms, stats = decode_ms(cfg, params, opts, 1, context, args.steps)
        out[f"decode_b1_p{context}"] = ms
        out[f"stats_b1_p{context}"] = stats
    out.update(ffn_ms(cfg, params, args.repeats, impl))
    if dtype_is_f32:
        modes = ("auto", "per_token", "union", "masked") if cfg.ffn_kind == "spark" else ("masked",)
        for mode in modes:
            mode_opts = DecodeOptions(path="masked", implementation=impl)
            if mode == "auto":
                mode_opts = DecodeOptions(implementation=impl)
            elif mode != "masked":
                mode_opts = DecodeOptions(path="sparse", batch_mode=mode, implementation=impl)
            ms, _ = decode_ms(cfg, params, mode_opts, 8, 128, args.steps)
            out[f"decode_b8_p128/{mode}"] = ms
        caps = opts.ffn_caps(cfg, 8)
        native = opts.kernels.native()
        out["b8_auto_mode"] = ffn_mode(cfg, 8, "auto", caps, "auto", native)
    del params
    gc.collect()
    return out


def median_rounds(rounds: list[dict]) -> dict:
    out = {}
    for key, value in rounds[0].items():
        values = [r[key] for r in rounds if key in r]
        out[key] = statistics.median(values) if isinstance(value, float) else value
    return out


def bounds_and_ratios(cfgs, res, bandwidth, contexts, attn, prefill=None) -> list[dict]:
    """Rows of (measurement, dense ms, Spark ms, measured ratio, bound ratio, Spark bound ms)."""
    dense_cfg, spark_cfg = (cfgs[n] for n in NAMES)
    dense, spark = (res[n] for n in NAMES)
    rows = []

    def row(label, d_ms, s_ms, d_bytes, s_bytes):
        rows.append(
            {
                "measurement": label,
                "dense_ms": d_ms,
                "spark_ms": s_ms,
                "ratio": d_ms / s_ms,
                "bound_ratio": d_bytes / s_bytes,
                "of_bound": (d_ms / s_ms) / (d_bytes / s_bytes),
                "dense_bound_ms": d_bytes / bandwidth * 1e3,
                "spark_bound_ms": s_bytes / bandwidth * 1e3,
            }
        )

    for p in contexts:
        long_d = dataclasses.replace(dense_cfg, max_seq_len=max(dense_cfg.max_seq_len, p))
        long_s = dataclasses.replace(spark_cfg, max_seq_len=max(spark_cfg.max_seq_len, p))
        d_bytes, s_bytes = step_bytes(long_d, 1, p)["total"], step_bytes(long_s, 1, p)["total"]
        key = f"decode_b1_p{p}"
        row(f"batch 1, prompt {p}", dense[key], spark[key], d_bytes, s_bytes)
    if "decode_b8_p128/masked" in dense:
        best = min(v for k, v in spark.items() if k.startswith("decode_b8_p128/"))
        auto = spark["decode_b8_p128/auto"]
        d_bytes, s_bytes = step_bytes(dense_cfg, 8, 128)["total"], step_bytes(spark_cfg, 8, 128)
        row(
            f"batch 8, prompt 128 (auto: {spark['b8_auto_mode']})",
            dense["decode_b8_p128/masked"],
            auto,
            d_bytes,
            s_bytes["total"],
        )
        row(
            "batch 8, prompt 128 (fastest mode)",
            dense["decode_b8_p128/masked"],
            best,
            d_bytes,
            s_bytes["total"],
        )
    row(
        "FFN block, batch 1",
        dense["ffn"],
        spark["ffn"],
        ffn_block_bytes(dense_cfg),
        ffn_block_bytes(spark_cfg),
    )
    if attn.get("context"):
        ctx = attn["context"]
        long_d = dataclasses.replace(dense_cfg, max_seq_len=ctx)
        long_s = dataclasses.replace(spark_cfg, max_seq_len=ctx)
        row(
            f"attention op, context {ctx}",
            attn[NAMES[0]],
            attn[NAMES[1]],
            attention_op_bytes(long_d, ctx),
            attention_op_bytes(long_s, ctx),
        )
    if prefill:
        n = prefill["layers"]
        spread = ", ".join(f"{r:.2f}" for r in prefill["ratio_per_round"])
        rows.append(
            {
                "measurement": f"prefill {prefill['length']} tokens (timed on {n} and {2 * n} "
                f"layers, extrapolated; median of {len(prefill['ratio_per_round'])} "
                f"alternated rounds, per round: {spread})",
                "dense_ms": prefill[NAMES[0]],
                "spark_ms": prefill[NAMES[1]],
                "ratio": prefill[NAMES[0]] / prefill[NAMES[1]],
            }
        )
    return rows


def add_round_ratios(rows: list[dict], per_round: list[list[dict]]) -> None:
    """Gives each of ``rows`` (from the medians) its ratio in every round (``ratio_per_round``),
    from each round's own rows, where every round has that measurement."""
    for row in rows:
        ratios = [
            r["ratio"] for rnd in per_round for r in rnd if r["measurement"] == row["measurement"]
        ]
        if len(ratios) == len(per_round):
            row["ratio_per_round"] = ratios


def markdown(report: dict) -> str:
    lines = [
        f"# Decode benchmark ({report['mode']})",
        "",
        f"Machine: {report['machine']}; kernels: {report['kernels']}; read bandwidth "
        "measured in the run: "
        f"{report['bandwidth_gb_s']:.1f} GB/s; load average at start/end: "
        f"{report['load_start']} / {report['load_end']}; wall {report['wall_s']:.0f} s.",
        "Bound ratio: bytes each variant must read per step (dense / Spark). Bound ms: those "
        "bytes over the measured bandwidth. `of bound`: measured ratio / bound ratio. `x per "
        "round`: the measured ratio in each alternation (medians above).",
        "",
    ]
    for dtype, rows in report["rows"].items():
        lines += [
            f"## {dtype} weights",
            "",
            "| measurement | dense ms | Spark ms | measured x | bound x | of bound "
            "| dense bound ms | Spark bound ms | Spark ms / bound | x per round |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            spread = " / ".join(f"{x:.2f}" for x in r.get("ratio_per_round", ())) or "-"
            if "bound_ratio" in r:
                lines.append(
                    f"| {r['measurement']} | {r['dense_ms']:.2f} | {r['spark_ms']:.2f} "
                    f"| {r['ratio']:.2f} | {r['bound_ratio']:.2f} | {r['of_bound']:.0%} "
                    f"| {r['dense_bound_ms']:.2f} | {r['spark_bound_ms']:.2f} "
                    f"| {r['spark_ms'] / r['spark_bound_ms']:.2f} | {spread} |"
                )
            else:
                lines.append(
                    f"| {r['measurement']} | {r['dense_ms']:.0f} | {r['spark_ms']:.0f} "
                    f"| {r['ratio']:.2f} | - | - | - | - | - | - |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(report["rows"])
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        rows = [r for r in report["rows"][dtype] if "bound_ratio" in r]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["ratio"] for r in rows], 0.4, label="measured dense/Spark")
        ax.bar(x + 0.2, [r["bound_ratio"] for r in rows], 0.4, label="bandwidth bound")
        ax.set_xticks(x, [r["measurement"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speed-up of Spark over dense")
        ax.set_title(f"{report['mode']}, {dtype} weights")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, same widths")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--contexts", default="128,2048,8192")
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per point")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per op")
    parser.add_argument("--rounds", type=int, default=1, help="dense/Spark alternations")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    parser.add_argument("--prefill-layers", type=int, default=2, help="layers timed in prefill")
    parser.add_argument("--prefill-len", type=int, default=2048, help="prompt length of prefill")
    parser.add_argument(
        "--prefill-rounds", type=int, default=3, help="alternated prefill rounds (0: none)"
    )
    parser.add_argument("--attn-context", type=int, default=32768)
    parser.add_argument("--implementation", default="auto", choices=("auto", "xla", "native"))
    parser.add_argument(
        "--tag",
        default="",
        help="suffix of the result files (e.g. a CPU's name), so runs on "
        "other machines sit beside each other",
    )
    args = parser.parse_args()
    resolved = Kernels(args.implementation).resolved()
    kernels = resolved
    if resolved == "native":
        pol = policy_for()
        kernels = (
            f"native ({_native.isa()}): products of up to {pol.native_max_rows} float32 or "
            f"{pol.native_max_rows_narrow} bfloat16 rows (XLA's dot above), the block FFN "
            "with its threshold inside, the fused decode attention (dense and Spark)"
        )
    args.contexts = [int(c) for c in args.contexts.split(",")]
    wall = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    longest = max(args.contexts) + args.steps + 2
    cfgs = {}
    for name in NAMES:
        cfg = get_model_config(name)
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, longest))
        if args.quick:
            cfg = dataclasses.replace(
                cfg, num_layers=2, layer_types=None, attn_sparse_layers=None, ffn_sparse_layers=None
            )
        cfgs[name] = cfg
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    attn = {}
    if args.attn_context:
        attn = attention_ms(cfgs, args.attn_context, args.repeats, args.implementation)
    attn["context"] = args.attn_context
    print("attention op", attn, flush=True)
    prefill = None
    if args.prefill_rounds > 0 and "float32" in args.dtypes.split(","):
        prefill = prefill_compare(
            cfgs,
            layers=args.prefill_layers,
            length=args.prefill_len,
            rounds=args.prefill_rounds,
            chunk=args.chunk,
            implementation=args.implementation,
        )
    print("prefill", prefill, flush=True)
    report = {
        "mode": "quick (2 layers)" if args.quick else "full (26 layers)",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "kernels": kernels,
        "bandwidth_gb_s": bandwidth / 1e9,
        "args": vars(args),
        "attention_op_ms": attn,
        "prefill_ms": prefill,
        "models": {},
        "rows": {},
    }
    for dtype in args.dtypes.split(","):
        rounds: dict[str, list[dict]] = {n: [] for n in NAMES}
        for r in range(args.rounds):
            for name in NAMES:
                cfg = dataclasses.replace(cfgs[name], param_dtype=dtype)
                res = measure_model(cfg, args, dtype == "float32")
                print(dtype, name, f"round {r}", res, flush=True)
                rounds[name].append(res)
        res = {n: median_rounds(rounds[n]) for n in NAMES}
        report["models"][dtype] = res
        typed = {n: dataclasses.replace(cfgs[n], param_dtype=dtype) for n in NAMES}
        f32 = dtype == "float32"
        rows = bounds_and_ratios(
            typed, res, bandwidth, args.contexts, attn if f32 else {}, prefill if f32 else None
        )
        if args.rounds > 1:
            each = [{n: rounds[n][i] for n in NAMES} for i in range(args.rounds)]
            add_round_ratios(
                rows, [bounds_and_ratios(typed, r, bandwidth, args.contexts, {}) for r in each]
            )
        report["rows"][dtype] = rows
    report["load_start"], report["load_end"] = load_start, [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = time.perf_counter() - wall
    stem = "decode_quick" if args.quick else "decode"
    if args.implementation != "auto":
        stem += f"_{args.implementation}"
    if args.tag:
        stem += f"_{args.tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    plot(report, RESULTS / f"{stem}.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
