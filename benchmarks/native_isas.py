"""Every native CPU kernel at the 2B shapes on each instruction set this CPU runs, side by side.

Run from the repository root: ``.venv/bin/python -m benchmarks.native_isas``. The kernels are
called directly (``pallas_kernels.*.native``) and the instruction sets alternate within each
repeat, median of ``--repeats`` calls after a warm-up. On an AVX-512 CPU this times the AVX2
and generic builds as they run there, not on an AVX2-only CPU (an AMD EPYC's memory system
differs). Cases, float32 and bfloat16 weights:

* ``linear``: one row through a [9216, 2304] weight (an FFN projection);
* ``sparse_ffn``: one token's 1312 gathered rows of K2 [13824, 1280] and V [13824, 2304];
* ``ffn_block``: a 256-token prefill chunk's active pairs (8% of 13824 neurons per token);
* ``spark_ffn_block``: the same from the pre-activations, the threshold in the kernel;
* ``scored_attention``: a prefill chunk's Spark attention (256 queries, 8 query and 4 kv
  heads) from its raw predictor scores over 2304 keys, 256 kept per query;
* ``decode_attention``: one decode step of a global layer at 32768 cached keys (8 query and 4
  kv heads of 256), Spark (256 kept keys) and dense, float32 cache.

Results: ``benchmarks/results/native_isas[_<tag>].{json,md}`` (``--tag`` names another
machine's run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import cpu_model
from pallas_kernels import _native
from pallas_kernels.decode_attention import native as attention_native
from pallas_kernels.linear import native as linear_native
from pallas_kernels.scored_attention import native as scored_native
from pallas_kernels.sparse_ffn import native as ffn_native
from pallas_kernels.stat_topk.xla import statistical_threshold

RESULTS = pathlib.Path(__file__).parent / "results"


def _cases(gen: np.random.Generator, dtype) -> dict:
    def w(*shape):
        return jnp.asarray(gen.standard_normal(shape, dtype=np.float32)).astype(dtype)

    def f32(*shape, scale=1.0):
        return jnp.asarray(gen.standard_normal(shape, dtype=np.float32) * scale)

    cases = {"linear": (jax.jit(linear_native.linear), (f32(1, 2304), w(9216, 2304)))}
    idx = jnp.asarray(np.sort(gen.choice(13824, 1312, replace=False))[None], jnp.int32)
    k2, v = w(13824, 1280), w(13824, 2304)
    cases["sparse_ffn"] = (
        jax.jit(ffn_native.sparse_ffn),
        (f32(1, 1312), idx, f32(1, 1280), k2, v),
    )
    pre = f32(256, 13824)
    theta, _ = statistical_threshold(pre, 1106)
    act = jax.nn.gelu(jnp.maximum(pre - theta, 0.0))
    cases["ffn_block"] = (jax.jit(ffn_native.sparse_ffn_block), (act, f32(256, 1280), k2, v))
    cases["spark_ffn_block"] = (
        jax.jit(lambda *a: ffn_native.spark_ffn_block(*a, keep_count=1106)),
        (pre, f32(256, 1280), k2, v),
    )
    # A prefill chunk of 256 queries (two heads per kv head) over 2048 cached keys and its own.
    s = 2304
    k_pos = jnp.arange(s, dtype=jnp.int32)[None]
    cases["scored_attention"] = (
        jax.jit(
            lambda *a: scored_native.spark_scored_attention(*a, 4096, top_k=256, softcap=50.0)
        ),
        (
            f32(1, 4, 2, 256, s, scale=3.0), f32(1, 4, 2, 256, 128, scale=0.1), w(1, 4, s, 128),
            w(1, 4, s, 256), k_pos[:, s - 256 :], k_pos,
        ),
    )  # fmt: skip
    if dtype == jnp.float32:
        b, n, kv, s, r, h = 1, 8, 4, 32767, 128, 256
        pos = jnp.arange(s, dtype=jnp.int32)[None]
        q_pos = jnp.full((1,), s, jnp.int32)
        spark = (
            f32(b, n, r, scale=0.1), f32(b, n, h - r, scale=0.1), f32(b, kv, s, r),
            f32(b, kv, s, h - r), f32(b, kv, s, h), pos, f32(b, kv, r), f32(b, kv, h - r),
            f32(b, kv, h), q_pos, 40000,
        )  # fmt: skip
        cases["decode_attention_spark"] = (
            jax.jit(
                lambda *a: attention_native.spark_decode_attention(*a, top_k=256, softcap=50.0)
            ),
            spark,
        )
        dense = (
            f32(b, n, h, scale=0.1), f32(b, kv, s, h), spark[4], pos, f32(b, kv, h), spark[8],
            q_pos, 40000,
        )  # fmt: skip
        cases["decode_attention_dense"] = (
            jax.jit(lambda *a: attention_native.dense_decode_attention(*a, softcap=50.0)),
            dense,
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. a CPU's name)")
    args = parser.parse_args()
    stem = f"native_isas_{args.tag}" if args.tag else "native_isas"
    if not _native.available():
        raise SystemExit(_native.unavailable_reason())
    isas = _native.supported_isas()
    gen = np.random.default_rng(0)
    results: dict = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        for name, (fn, fn_args) in _cases(gen, dtype).items():
            samples: dict[str, list[float]] = {isa: [] for isa in isas}
            for isa in isas:  # warm-up (and compilation) on each
                _native.use_isa(isa)
                jax.block_until_ready(fn(*fn_args))
            for _ in range(args.repeats):
                for isa in isas:
                    _native.use_isa(isa)
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*fn_args))
                    samples[isa].append((time.perf_counter() - start) * 1e3)
            key = f"{name}/{jnp.dtype(dtype).name}"
            results[key] = {isa: statistics.median(t) for isa, t in samples.items()}
            print(key, {k: round(v, 3) for k, v in results[key].items()}, flush=True)
    _native.use_isa(isas[-1])
    report = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "isas": isas, "ms": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    flag = f" --tag {args.tag}" if args.tag else ""
    lines = [
        "# Native kernels per instruction set (ms, median)",
        "",
        f"Machine: {report['machine']}. `python -m benchmarks.native_isas{flag}`.",
        "",
        "| kernel | " + " | ".join(isas) + " |",
        "|---|" + "---|" * len(isas),
    ]
    for key, row in results.items():
        lines.append(f"| {key} | " + " | ".join(f"{row[i]:.3f}" for i in isas) + " |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
