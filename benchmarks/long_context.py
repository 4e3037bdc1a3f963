"""Long-context training: the blockwise and materialized attention, memory and step time.

* Memory: the compiled train step's temporary bytes (``compiled.memory_analysis()``, from
  abstract inputs: nothing is allocated) of the ``small`` and ``small_dense`` presets at batch
  1 for each context in ``--memory-lens``, both forms of attention.
* Time: one train step (forward, backward, AdamW) at batch 1 for each context in
  ``--time-lens``, dense and Spark, both forms, measured round-robin in one process (median
  of ``--rounds``), with the Spark/dense ratio per length and form.
* Prefill: a prompt of each length in ``--prefill-lens`` through ``decode.prefill`` in chunks
  of 256 tokens (each chunk attends to the cache and to itself), both forms, dense and Spark.

    python -m benchmarks.long_context [--memory-lens 1024,8192] [--time-lens 256,1024,2048,4096]
        [--prefill-lens 2048,8192]
* Blocks: with ``--block-len T``, the gradient of one ``small``-preset attention op alone
  (6 query heads over 3 kv heads, head 64, causal) at T tokens for each block shape in
  ``--blocks``, dense and Spark (the XLA scan), alternated with Spark's native CPU kernels
  (which take no blocks) where they are built.

    python -m benchmarks.long_context --memory-lens "" --time-lens "" --prefill-lens "" \
        --block-len 2048 --blocks 512x512,256x256,256x128,128x128

Results: ``benchmarks/results/long_context.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import cpu_model
from configs import get_model_config
from pallas_kernels import _native
from pallas_kernels.blockwise_attention import blockwise_attention
from sparse_jax.data.pipeline import DataConfig
from sparse_jax.decode import DecodeOptions, init_cache
from sparse_jax.decode.step import decode_params, prefill
from sparse_jax.model.transformer import init_params
from sparse_jax.train.config import TrainConfig
from sparse_jax.train.optim import make_optimizer
from sparse_jax.train.step import abstract_train_state, init_train_state, make_train_step

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PRESETS = {"dense": "small_dense", "spark": "small"}
IMPLS = ("materialized", "blockwise")
HEADER = "| T | dense materialized | dense blockwise | Spark materialized | Spark blockwise |"


def model(kind: str, impl: str, length: int):
    cfg = get_model_config(PRESETS[kind])
    return dataclasses.replace(cfg, attn_impl=impl, max_seq_len=max(cfg.max_seq_len, length))


def batch(length: int, vocab: int, abstract: bool):
    if abstract:
        ints = jax.ShapeDtypeStruct((1, length), jnp.int32)
        return {
            "inputs": ints,
            "targets": ints,
            "mask": jax.ShapeDtypeStruct((1, length), jnp.float32),
        }
    tokens = np.random.default_rng(0).integers(0, vocab, (1, length + 1))
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "mask": jnp.ones((1, length), jnp.float32),
    }


def temp_bytes(kind: str, impl: str, length: int) -> int:
    cfg = model(kind, impl, length)
    opt = make_optimizer(TrainConfig(data=DataConfig(batch_size=1, seq_len=length)))
    step = make_train_step(cfg, opt, 1)
    lowered = step.lower(abstract_train_state(cfg, opt), batch(length, cfg.vocab_size, True))
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def block_sweep(length: int, shapes: list[tuple[int, int]], rounds: int) -> dict[str, list]:
    """Seconds of one attention op's gradient (XLA blockwise) per block shape and kind."""
    cfg = get_model_config("small")
    b, kv, h, r = 1, cfg.num_kv_heads, cfg.head_dim, cfg.attn_predictor_dim
    g = cfg.num_heads // kv
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    v = arr(b, kv, length, h)
    parts = {
        "dense": ((arr(b, kv, g, length, h, scale=0.3),), (arr(b, kv, length, h),), 0),
        "spark": (
            (arr(b, kv, g, length, r, scale=0.3), arr(b, kv, g, length, h - r, scale=0.3)),
            (arr(b, kv, length, r), arr(b, kv, length, h - r)),
            cfg.attn_top_k,
        ),
    }
    runs = {}

    def add(key, kind, impl, blocks=(None, None)):
        q, keys, top_k = parts[kind]

        def loss(q, keys, v):
            out, _ = blockwise_attention(
                q, keys, v, pos, pos, 1 << 20, softcap=cfg.attn_logit_softcap, top_k=top_k,
                block_q=blocks[0], block_k=blocks[1], implementation=impl,
            )  # fmt: skip
            return jnp.sum(out)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        jax.block_until_ready(grad(q, keys, v))  # compiles
        runs[key] = grad, (q, keys, v)

    for bq, bk in shapes:
        for kind in parts:
            add(f"{kind}/{bq}x{bk}/{length}", kind, "xla", (bq, bk))
    if _native.available():
        add(f"spark/native/{length}", "spark", "native")
    times: dict[str, list] = {}
    for _ in range(rounds):
        for key, (grad, args) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(grad(*args))
            times.setdefault(key, []).append(time.perf_counter() - start)
    for key in runs:
        print(f"attention gradient {key}: {statistics.median(times[key]):.3f} s", flush=True)
    return times


def prefill_sweep(lengths: list[int], rounds: int) -> dict[str, list[float]]:
    """Seconds to prefill one prompt of each length, both forms, dense and Spark, alternated."""
    times: dict[str, list[float]] = {}
    options = DecodeOptions(path="masked", prefill_chunk=256)
    for length in lengths:
        runs = {}
        for kind in PRESETS:
            for impl in IMPLS:
                cfg = model(kind, impl, length)
                params = decode_params(cfg, init_params(cfg, jax.random.key(0)))
                tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, length))
                runs[kind, impl] = cfg, params, tokens

        def run(cfg, params, tokens):
            cache = init_cache(cfg, 1, tokens.shape[1])
            logits, _, _ = prefill(cfg, params, cache, tokens, None, options)
            jax.block_until_ready(logits)

        for args in runs.values():
            run(*args)  # compiles
        for _ in range(rounds):
            for (kind, impl), args in runs.items():
                start = time.perf_counter()
                run(*args)
                times.setdefault(f"{kind}/{impl}/{length}", []).append(time.perf_counter() - start)
        for kind, impl in runs:
            key = f"{kind}/{impl}/{length}"
            print(f"prefill {key}: {statistics.median(times[key]):.2f} s", flush=True)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-lens", default="1024,2048,4096,8192")
    parser.add_argument("--time-lens", default="256,1024,2048,4096")
    parser.add_argument("--prefill-lens", default="2048,8192")
    parser.add_argument("--block-len", type=int, default=0)
    parser.add_argument("--blocks", default="512x512,256x256,256x128,128x128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    memory = {}
    for length in (int(x) for x in args.memory_lens.split(",") if x):
        for kind in PRESETS:
            for impl in IMPLS:
                key = f"{kind}/{impl}/{length}"
                memory[key] = temp_bytes(kind, impl, length)
                print(f"memory {key}: {memory[key] / 2**20:.0f} MiB", flush=True)
    times: dict[str, list[float]] = {}
    out_of_memory: list[str] = []
    for length in (int(x) for x in args.time_lens.split(",") if x):
        runs = {}
        for kind in PRESETS:
            for impl in IMPLS:
                cfg = model(kind, impl, length)
                opt = make_optimizer(TrainConfig(data=DataConfig(batch_size=1, seq_len=length)))
                step = make_train_step(cfg, opt, 1)
                state = init_train_state(cfg, opt, 0)
                data = batch(length, cfg.vocab_size, False)
                try:
                    state, metrics = step(state, data)  # compiles
                    jax.block_until_ready(metrics)
                except jax.errors.JaxRuntimeError as err:
                    if "RESOURCE_EXHAUSTED" not in str(err):
                        raise
                    out_of_memory.append(f"{kind}/{impl}/{length}")
                    print(f"time {kind}/{impl}/{length}: out of memory", flush=True)
                    continue
                runs[kind, impl] = [step, state, data]
        for _ in range(args.rounds):
            for (kind, impl), run in runs.items():
                start = time.perf_counter()
                run[1], metrics = run[0](run[1], run[2])
                jax.block_until_ready(metrics)
                times.setdefault(f"{kind}/{impl}/{length}", []).append(time.perf_counter() - start)
        for kind, impl in runs:
            key = f"{kind}/{impl}/{length}"
            print(f"time {key}: {statistics.median(times[key]):.3f} s", flush=True)
        del runs
    prefill_times = prefill_sweep([int(x) for x in args.prefill_lens.split(",") if x], args.rounds)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.blocks.split(",") if s]
    block_times = block_sweep(args.block_len, shapes, args.rounds) if args.block_len else {}
    report = {
        "machine": f"{cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s)",
        "presets": PRESETS,
        "batch": 1,
        "temp_bytes": memory,
        "step_seconds": {k: statistics.median(v) for k, v in times.items()},
        "step_times": times,
        "out_of_memory": out_of_memory,
        "prefill_seconds": {k: statistics.median(v) for k, v in prefill_times.items()},
        "prefill_times": prefill_times,
        "attention_gradient_seconds": {k: statistics.median(v) for k, v in block_times.items()},
        "attention_gradient_times": block_times,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Long-context training step, batch 1 ({report['machine']})", ""]
    lens = sorted({int(k.rsplit("/", 1)[1]) for k in memory})
    if lens:
        lines += [
            "Temporary bytes of the compiled train step, MiB:",
            "",
            HEADER,
            "|---|---|---|---|---|",
        ]
        for t in lens:
            cells = [f"{memory[f'{k}/{i}/{t}'] / 2**20:,.0f}" for k in PRESETS for i in IMPLS]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    tlens = sorted({int(k.rsplit("/", 1)[1]) for k in [*times, *out_of_memory]})
    if tlens:
        lines += [
            "Train step, median seconds (Spark/dense in parentheses):",
            "",
            HEADER,
            "|---|---|---|---|---|",
        ]
        med = report["step_seconds"]
        for t in tlens:
            cells = []
            for k in PRESETS:
                for i in IMPLS:
                    s = med.get(f"{k}/{i}/{t}")
                    if s is None:
                        cells.append("out of memory")
                        continue
                    dense = med.get(f"dense/{i}/{t}")
                    ratio = "" if k == "dense" or dense is None else f" ({s / dense:.2f}x)"
                    cells.append(f"{s:.3f}{ratio}")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    plens = sorted({int(k.rsplit("/", 1)[1]) for k in prefill_times})
    if plens:
        med = report["prefill_seconds"]
        lines += [
            "",
            "Prefill in chunks of 256 tokens, median seconds (blockwise / materialized):",
            "",
            HEADER.replace("| T |", "| prompt |"),
            "|---|---|---|---|---|",
        ]
        for t in plens:
            cells = []
            for k in PRESETS:
                for i in IMPLS:
                    s = med[f"{k}/{i}/{t}"]
                    base = med[f"{k}/materialized/{t}"]
                    cells.append(
                        f"{s:.2f}" + ("" if i == "materialized" else f" ({s / base:.2f}x)")
                    )
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if block_times:
        med = report["attention_gradient_seconds"]
        lines += [
            "",
            f"One attention op's gradient at {args.block_len} tokens (XLA), median seconds:",
            "",
            "| blocks (queries x keys) | dense | Spark | Spark / dense |",
            "|---|---|---|---|",
        ]
        for bq, bk in shapes:
            d, s = (med[f"{k}/{bq}x{bk}/{args.block_len}"] for k in PRESETS)
            lines.append(f"| {bq} x {bk} | {d:.3f} | {s:.3f} | {s / d:.2f}x |")
        native = med.get(f"spark/native/{args.block_len}")
        if native is not None:
            lines += ["", f"Spark, native CPU kernels (no blocks): {native:.3f} s."]
            for bq, bk in shapes:
                d = med[f"dense/{bq}x{bk}/{args.block_len}"]
                lines.append(f"- against dense with {bq} x {bk} blocks: {native / d:.2f}x")
    (out / "long_context.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
