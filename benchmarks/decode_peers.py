"""Decode speed against the peer a user would run instead: HF ``transformers`` Gemma-2 on PyTorch.

Run from the repository root: ``.venv/bin/python -m benchmarks.decode_peers [--layers N]``.
The peer is ``Gemma2ForCausalLM`` built from a config that matches the ``gemma2_2b`` preset
field by field (:func:`hf_config`), with random weights from the model's own initializer,
constructed directly in the measured dtype. Measured, at batch 1 and prompt lengths 128, 2048
and 8192, in float32 and bfloat16: the peer's decode ms/token, and this library's dense
``gemma2_2b`` and ``spark_gemma2_2b`` through ``benchmarks/decode.py``'s own functions.
Neither side prefills: the peer's ``DynamicCache`` (built from the model config, so local
layers get transformers' sliding-window cache layers) is filled with random keys and values of
the prompt length, as the library's cache is by ``benchmarks.decode.synthetic_cache``. Each
point is the median of ``--steps`` timed steps (the peer after ``--warmup`` untimed ones, the
library after the step that compiles); the cache grows by one token per step and the input
token is fixed, on both sides. Only one model is in memory at a time. In bfloat16 the library
stores its weights in bfloat16 and computes and caches in float32 (``param_dtype`` only, as in
``benchmarks/decode.py``); the peer runs weights, activations and cache in bfloat16.

Per prompt length the report compares the faster dtype of each side: HF ms / Spark ms, against
the target of at least ``0.9 x`` the bandwidth-bound dense/Spark ratio that
``benchmarks.decode.bounds_and_ratios`` computes from :mod:`sparse_jax.cost.decode_bytes` (in the
dtype Spark's best time was measured in). ``--layers N`` keeps the widths and vocabulary with
N layers, as ``benchmarks/decode.py --quick`` does with 2. Results go to
``benchmarks/results/decode_peers.{json,md}``, or to the ``--out`` folder.

The peer (torch 2.13.0, transformers 5.24.0) is in the ``dev`` extra that
``scripts/setup_env.sh`` installs. ``torch==2.13.0`` on PyPI is the build with CUDA libraries;
elsewhere, for the CPU-only build (a much smaller download, the same ``2.13.0`` for the pin),
install it first from PyTorch's index: ``.venv/bin/pip install "torch==2.13.0+cpu"
--index-url https://download.pytorch.org/whl/cpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from typing import TYPE_CHECKING, Any

import jax

from benchmarks.decode import (
    NAMES,
    bounds_and_ratios,
    cpu_model,
    decode_ms,
    ffn_ms,
    read_bandwidth,
)
from configs import get_model_config
from sparse_jax.decode.step import DecodeOptions
from sparse_jax.hf import config_to_hf
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.weights import random_params

if TYPE_CHECKING:
    from transformers import Gemma2Config, Gemma2ForCausalLM

RESULTS = pathlib.Path(__file__).parent / "results"
STEM = "decode_peers"
DTYPES = ("float32", "bfloat16")
TARGET_FRACTION = 0.9
INSTALL_HINT = 'install the peer with `.venv/bin/pip install -e ".[dev]"` (see the docstring)'


def require_peer() -> tuple[Any, Any]:
    """The ``torch`` and ``transformers`` modules, or an ImportError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ImportError(
            f"benchmarks.decode_peers needs torch and transformers: {INSTALL_HINT}"
        ) from err
    return torch, transformers


def sliced(cfg: ModelConfig, layers: int, longest: int) -> ModelConfig:
    """``cfg`` with its first ``layers`` layers (same widths and vocabulary), as ``--quick`` in
    ``benchmarks/decode.py`` slices it, and ``max_seq_len`` raised to ``longest`` if needed."""
    if not 1 <= layers <= cfg.num_layers:
        raise ValueError(f"--layers={layers} must be in [1, {cfg.num_layers}] for {cfg.name}")
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, longest))
    if layers == cfg.num_layers:
        return cfg
    return dataclasses.replace(
        cfg, num_layers=layers, layer_types=None, attn_sparse_layers=None, ffn_sparse_layers=None
    )


def hf_config(cfg: ModelConfig) -> Gemma2Config:
    """The transformers ``Gemma2Config`` of a dense Gemma-2 style ``ModelConfig``.

    The fields are the ones :func:`sparse_jax.hf.config_to_hf` writes into an exported
    checkpoint's ``config.json``: every architectural field, embeddings tied, GeGLU with tanh
    gelu.

    Raises:
      ValueError: ``cfg`` is not a dense model.
    """
    _, transformers = require_peer()
    fields = config_to_hf(cfg)
    del fields["model_type"], fields["dtype"]
    return transformers.Gemma2Config(**fields)


def build_hf_model(cfg: ModelConfig, dtype: str) -> Gemma2ForCausalLM:
    """The peer with random weights (its own initializer), built directly in ``dtype``."""
    torch, transformers = require_peer()
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(cfg), dtype=getattr(torch, dtype)
    )
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the HF model's output projection is not tied to its embedding")
    return model.eval()


def hf_cache(model: Gemma2ForCausalLM, context: int, seed: int = 0) -> Any:
    """A ``DynamicCache`` holding ``context`` tokens of random keys and values in every layer.

    The cache is built from the model config, so local layers get transformers' sliding-window
    layers, and is filled through ``Cache.update`` as a prefill would fill it: local layers keep
    the last ``sliding_window - 1`` tokens and count all ``context``.
    """
    torch, transformers = require_peer()
    config = model.config
    cache = transformers.DynamicCache(config=config)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(shape, generator=generator, dtype=model.dtype)
        values = torch.randn(shape, generator=generator, dtype=model.dtype)
        cache.update(keys, values, layer)
    return cache


def hf_decode_ms(model: Gemma2ForCausalLM, context: int, steps: int, warmup: int) -> float:
    """Median ms of the peer's batch-1 decode step at ``context`` cached tokens.

    Each step is one ``model(input_ids, cache=..., position_ids=..., use_cache=True)`` call
    under ``torch.inference_mode()``, with the ``cache`` keyword (the pinned transformers
    deprecates ``past_key_values`` for it) and explicit positions, from which transformers
    derives the causal and sliding-window masks (its Gemma-2 forward takes no
    ``cache_position``).
    """
    torch, _ = require_peer()
    token = torch.zeros((1, 1), dtype=torch.long)
    samples = []
    with torch.inference_mode():
        cache = hf_cache(model, context)
        for step in range(warmup + steps):
            position = torch.tensor([[context + step]])
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, position_ids=position, use_cache=True)
            elapsed = (time.perf_counter() - start) * 1e3
            if step >= warmup:
                samples.append(elapsed)
        if out.logits.shape != (1, 1, model.config.vocab_size):
            raise RuntimeError(f"unexpected HF logits shape {tuple(out.logits.shape)}")
        seen = cache.get_seq_length()
        if seen != context + warmup + steps:
            raise RuntimeError(f"HF cache holds {seen} tokens, expected {context + warmup + steps}")
    del cache, out
    return statistics.median(samples)


def measure_hf(cfg: ModelConfig, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """The peer's decode ms at every context in ``dtype``; the model is freed on return."""
    start = time.perf_counter()
    model = build_hf_model(cfg, dtype)
    out: dict[str, Any] = {
        "build_s": time.perf_counter() - start,
        "attn_implementation": model.config._attn_implementation,
    }
    for context in args.contexts:
        out[f"decode_b1_p{context}"] = hf_decode_ms(model, context, args.steps, args.warmup)
    del model
    gc.collect()
    return out


def measure_jax(cfg: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """This library's decode ms at every context (and one FFN block, which the bound rows of
    ``bounds_and_ratios`` need), as ``benchmarks/decode.py`` measures them; weights freed."""
    start = time.perf_counter()
    params = random_params(cfg, seed=0)
    jax.block_until_ready(params)
    out: dict[str, Any] = {"build_s": time.perf_counter() - start}
    for context in args.contexts:
        ms, stats = decode_ms(cfg, params, DecodeOptions(), 1, context, args.steps)
        out[f"decode_b1_p{context}"] = ms
        out[f"stats_b1_p{context}"] = stats
    out.update(ffn_ms(cfg, params, args.repeats, "auto"))
    del params
    gc.collect()
    return out


def batch_one_rows(rows: list[dict], contexts: list[int]) -> dict[int, dict]:
    """The batch-1 rows of ``bounds_and_ratios`` by context."""
    by_label = {r["measurement"]: r for r in rows}
    out = {}
    for context in contexts:
        label = f"batch 1, prompt {context}"
        if label not in by_label:
            raise RuntimeError(f"bounds_and_ratios gave no row {label!r}: {sorted(by_label)}")
        out[context] = by_label[label]
    return out


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per context: each side's fastest dtype, HF / Spark and the bandwidth-bound target."""
    spark = NAMES[1]
    summary = []
    for context in report["contexts"]:
        key = f"decode_b1_p{context}"
        hf_dtype = min(report["hf"], key=lambda d: report["hf"][d][key])
        spark_dtype = min(report["jax"], key=lambda d: report["jax"][d][spark][key])
        hf_ms, spark_ms = report["hf"][hf_dtype][key], report["jax"][spark_dtype][spark][key]
        bound = report["bounds"][spark_dtype][str(context)]["bound_ratio"]
        ratio = hf_ms / spark_ms
        target = TARGET_FRACTION * bound
        summary.append(
            {
                "context": context,
                "hf_dtype": hf_dtype,
                "hf_ms": hf_ms,
                "spark_dtype": spark_dtype,
                "spark_ms": spark_ms,
                "hf_over_spark": ratio,
                "bound_ratio": bound,
                "target": target,
                "met": ratio >= target,
            }
        )
    return summary


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: the summary table, then every measurement."""
    v = report["versions"]
    lines = [
        f"# Decode against the HF transformers peer ({report['layers']} layers)",
        "",
        f"Machine: {report['machine']}; load average at start/end: {report['load_start']} / "
        f"{report['load_end']}; wall {report['wall_s']:.0f} s; torch {v['torch']} "
        f"({report['torch_threads']} threads), transformers {v['transformers']}, jax {v['jax']}, "
        f"jaxlib {v['jaxlib']}; read bandwidth measured in the run: "
        f"{report['bandwidth_gb_s']:.1f} GB/s.",
        f"Peer: `Gemma2ForCausalLM`, random weights, `DynamicCache`, attention "
        f"`{report['hf_attn_implementation']}`. Batch 1, median of {report['args']['steps']} "
        "steps, cache filled with random keys and values of the prompt length.",
        f"Target: HF / Spark >= {TARGET_FRACTION} x the bandwidth-bound dense/Spark ratio (bytes "
        "read per step, `sparse_jax.cost.decode_bytes`), in the dtype of Spark's best time.",
        "",
        "| prompt | HF best ms | Spark best ms | HF / Spark | bound dense/Spark | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        lines.append(
            f"| {s['context']} | {s['hf_ms']:.1f} ({s['hf_dtype']}) "
            f"| {s['spark_ms']:.1f} ({s['spark_dtype']}) | {s['hf_over_spark']:.2f} "
            f"| {s['bound_ratio']:.2f} | {s['target']:.2f} | {'met' if s['met'] else 'missed'} |"
        )
    dense, spark = NAMES
    lines += [
        "",
        "## Every measurement (ms/token)",
        "",
        "| prompt | dtype | HF | JAX dense | JAX Spark | HF / Spark | dense / Spark "
        "| bound dense/Spark | Spark bound ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for context in report["contexts"]:
        key = f"decode_b1_p{context}"
        for dtype in report["hf"]:
            hf = report["hf"][dtype][key]
            d, s = report["jax"][dtype][dense][key], report["jax"][dtype][spark][key]
            b = report["bounds"][dtype][str(context)]
            lines.append(
                f"| {context} | {dtype} | {hf:.1f} | {d:.1f} | {s:.1f} | {hf / s:.2f} "
                f"| {d / s:.2f} | {b['bound_ratio']:.2f} | {b['spark_bound_ms']:.1f} |"
            )
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=26, help="layers kept, same widths")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated weight dtypes")
    parser.add_argument("--contexts", default="128,2048,8192", help="comma-separated prompts")
    parser.add_argument("--steps", type=int, default=5, help="timed decode steps per point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed HF steps before them")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of the FFN block")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        parser.error(f"--contexts={args.contexts!r} must be comma-separated integers")
    if any(c < 1 for c in args.contexts):
        parser.error("--contexts must be >= 1")
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
        parser.error(f"--dtypes entries must be among {DTYPES}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch, transformers = require_peer()
    torch.set_num_threads(os.cpu_count() or 1)
    wall = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    longest = max(args.contexts) + args.steps + args.warmup + 2
    try:
        cfgs = {n: sliced(get_model_config(n), args.layers, longest) for n in NAMES}
    except ValueError as err:
        raise SystemExit(str(err)) from err
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    report: dict[str, Any] = {
        "layers": args.layers,
        "contexts": args.contexts,
        "machine": f"{cpu_model()}, {os.cpu_count()} CPU cores ({platform.machine()}), jax on "
        f"{jax.devices()[0].platform}",
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
        },
        "bandwidth_gb_s": bandwidth / 1e9,
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "hf": {},
        "jax": {},
        "bounds": {},
    }
    for dtype in args.dtypes:
        typed = {n: dataclasses.replace(cfgs[n], param_dtype=dtype) for n in NAMES}
        report["hf"][dtype] = measure_hf(typed[NAMES[0]], dtype, args)
        print(dtype, "HF transformers", report["hf"][dtype], flush=True)
        report["jax"][dtype] = {}
        for name in NAMES:
            report["jax"][dtype][name] = measure_jax(typed[name], args)
            print(dtype, name, report["jax"][dtype][name], flush=True)
        rows = bounds_and_ratios(typed, report["jax"][dtype], bandwidth, args.contexts, {})
        report["bounds"][dtype] = {
            str(c): r for c, r in batch_one_rows(rows, args.contexts).items()
        }
    report["hf_attn_implementation"] = report["hf"][args.dtypes[0]]["attn_implementation"]
    report["summary"] = summarize(report)
    report["load_start"], report["load_end"] = load_start, [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = time.perf_counter() - wall
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(report, indent=1, default=float))
    (args.out / f"{STEM}.md").write_text(markdown(report))
    print(markdown(report))
    for s in report["summary"]:
        verdict = "met" if s["met"] else "missed"
        print(
            f"prompt {s['context']}: HF/Spark {s['hf_over_spark']:.2f} vs target "
            f"{s['target']:.2f} (0.9 x bound {s['bound_ratio']:.2f}): target {verdict}"
        )


if __name__ == "__main__":
    main()
