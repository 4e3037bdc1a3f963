"""Microbenchmarks behind the decode benchmark's misses, at the 2B shapes, f32 unless noted.

Run from the repository root: ``python -m benchmarks.decode_profile``. Each group is timed in
one process, its variants alternated (median of ``--repeats`` calls):

* ``gather``: the sparse FFN's row gather of 1312 of 13824 rows from K2 [13824, 1280] and
  V [13824, 2304] (``pallas_kernels.sparse_ffn.xla``, a 1-D ``take``, sorted/unique
  index flags), against a matvec reading the same bytes of K2;
* ``unembed``: the 256k x 2304 output projection through ``products.linear`` from bf16
  and from f32 weights;
* ``batch8_ffn``: at 8 rows, Spark's V product ``linear_rows`` over V [13824, 2304] (one neuron
  per row) against the dense down projection ``linear`` over [2304, 9216] ([out, in]);
* ``attn_scores``: Spark's predictor scores over 32768 cached keys (``spark_scores``) against
  the whole sparse attention op (``attend_sparse``).

Writes ``benchmarks/results/decode_profile.json`` (or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.decode import synthetic_cache
from configs import get_model_config
from pallas_kernels.sparse_ffn.xla import sparse_ffn as sparse_ffn_gathered
from sparse_jax.decode.step import DecodeOptions
from sparse_jax.model.attention import _grouped, attend_sparse, spark_scores
from sparse_jax.model.products import linear, linear_rows

RESULTS = pathlib.Path(__file__).parent / "results"


def alternate(fns: dict, args: dict, repeats: int) -> dict[str, float]:
    """Median ms of each jitted fn, the variants called in turn after one warm-up call each."""
    jitted = {name: jax.jit(fn) for name, fn in fns.items()}
    for name, fn in jitted.items():
        jax.block_until_ready(fn(*args[name]))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in jitted.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def rates(ms: dict[str, float], nbytes: dict[str, int]) -> dict[str, float]:
    """GB/s of each variant: the bytes it must read over its time."""
    return {name: nbytes[name] / t / 1e6 for name, t in ms.items()}


def gather_group(repeats: int) -> dict:
    f, d, r, a = 13824, 2304, 1024, 1312
    keys = jax.random.split(jax.random.key(0), 5)
    k2 = jax.random.normal(keys[0], (f, d - r))
    v = jax.random.normal(keys[1], (f, d))
    idx = jnp.sort(jax.random.choice(keys[2], f, (1, a), replace=False), axis=-1).astype(jnp.int32)
    h = jax.random.normal(keys[3], (1, a))
    x_rest = jax.random.normal(keys[4], (1, d - r))

    def take_1d(h, idx, x_rest, k2, v):
        flags = dict(mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True)
        value = k2.at[idx[0]].get(**flags) @ x_rest[0]
        return ((h[0] * value) @ v.at[idx[0]].get(**flags))[None]

    gathered = (h, idx, x_rest, k2, v)
    # A matvec over as many K2 rows as the gather reads bytes (rounded to whole rows).
    rows = min(f, a * (2 * d - r) // (d - r))
    streamed = (x_rest, k2[:rows])
    fns = {"gather_library": sparse_ffn_gathered, "gather_take_1d": take_1d, "matvec": linear}
    inputs = {"gather_library": gathered, "gather_take_1d": gathered, "matvec": streamed}
    ms = alternate(fns, inputs, repeats)
    gather_bytes = a * (2 * d - r) * 4
    nbytes = {"gather_library": gather_bytes, "gather_take_1d": gather_bytes}
    nbytes["matvec"] = rows * (d - r) * 4
    return {"ms": ms, "gb_per_s": rates(ms, nbytes), "rows_gathered": a}


def unembed_group(repeats: int) -> dict:
    vocab, dim = 256000, 2304
    w16 = jax.random.normal(jax.random.key(0), (vocab, dim), jnp.bfloat16)
    w32 = w16.astype(jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, dim))
    inputs = {"bfloat16": (x, w16), "float32": (x, w32)}
    ms = alternate({"bfloat16": linear, "float32": linear}, inputs, repeats)
    return {"ms": ms, "gb_per_s": rates(ms, {"bfloat16": w16.nbytes, "float32": w32.nbytes})}


def batch8_group(repeats: int) -> dict:
    spark, dense = get_model_config("spark_gemma2_2b"), get_model_config("gemma2_2b")
    v = jax.random.normal(jax.random.key(0), (spark.ffn_dim, spark.model_dim))
    w_down = jax.random.normal(jax.random.key(1), (dense.model_dim, dense.ffn_dim))
    act_spark = jax.random.normal(jax.random.key(2), (8, spark.ffn_dim))
    act_dense = jax.random.normal(jax.random.key(3), (8, dense.ffn_dim))
    ms = alternate(
        {"spark_v_linear_rows": linear_rows, "dense_down_linear": linear},
        {"spark_v_linear_rows": (act_spark, v), "dense_down_linear": (act_dense, w_down)},
        repeats,
    )
    nbytes = {"spark_v_linear_rows": v.nbytes, "dense_down_linear": w_down.nbytes}
    return {"ms": ms, "gb_per_s": rates(ms, nbytes)}


def attention_group(repeats: int, context: int = 32768) -> dict:
    cfg = dataclasses.replace(get_model_config("spark_gemma2_2b"), max_seq_len=context)
    layer_idx = cfg.layer_types.index("global")
    layer = synthetic_cache(cfg, 1, context - 1, context, seed=3).layers[layer_idx]
    new = {
        k: jax.random.normal(jax.random.key(5), (*a.shape[:2], 1, a.shape[3]), a.dtype)
        for k, a in layer.items()
        if k != "pos"
    }
    new["pos"] = jnp.full((1, 1), context - 1, jnp.int32)
    q = jax.random.normal(jax.random.key(4), (1, 1, cfg.num_heads, cfg.head_dim))
    window = cfg.layer_windows[layer_idx]
    cap = DecodeOptions().attn_cap(cfg, context)

    def scores(q, layer, new):
        return spark_scores(cfg, _grouped(cfg, q), (layer, new))

    def whole(q, layer, new):
        return attend_sparse(cfg, q, layer, new, new["pos"], window, cap)[0]

    ms = alternate(
        {"predictor_scores": scores, "attend_sparse": whole},
        {"predictor_scores": (q, layer, new), "attend_sparse": (q, layer, new)},
        repeats,
    )
    return {"ms": ms, "context": context, "k_pred_mb": layer["k_pred"].nbytes / 1e6}


GROUPS = {
    "gather": gather_group,
    "unembed": unembed_group,
    "batch8_ffn": batch8_group,
    "attn_scores": attention_group,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    groups = [g.strip() for g in args.groups.split(",")]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or args.repeats < 1:
        parser.error(f"--groups must be among {list(GROUPS)}, --repeats >= 1")
    report = {"load_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    for name in groups:
        report[name] = GROUPS[name](args.repeats)
        print(name, json.dumps(report[name], default=float), flush=True)
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_profile.json").write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
