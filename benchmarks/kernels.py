"""Times each Pallas kernel against its XLA path and a dense baseline; writes JSON.

Run from the repository root: ``.venv/bin/python -m benchmarks.kernels [--size small]``.
On a TPU or GPU backend each op is timed three ways: the Pallas kernel (``pallas_tpu`` or
``pallas_gpu``, whichever ``"auto"`` picks), the XLA path (``"xla"``, the jnp reference) and
a dense baseline (statistical top-k: ``jax.lax.top_k`` and ``jax.lax.approx_max_k``; sparse
FFN: the same FFN over all F neurons; top-k attention: dense softmax GQA attention over all S
keys). On CPU the Pallas kernels only run in interpret mode, which measures nothing, so only
the XLA paths and the baselines are timed and the JSON says so. Results go to
benchmarks/results/kernels.json: median milliseconds per call over ``--repeats`` timed calls
after one warm-up call.
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import sparse_ffn, statistical_topk, topk_attention
from pallas_kernels._common.dispatch import resolve_implementation


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Benchmark dimensions (letters as in docs/method.md)."""

    batch: int
    model_dim: int
    predictor_dim: int
    ffn_dim: int
    ffn_keep: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    attn_keep: int


SIZES = {
    # Gemma-2 2B decode: D 2304, R 1024, F 13824 (8% kept), N/K 8/4, H 256, 8k cache, k 256.
    "gemma2_2b": Shapes(1, 2304, 1024, 13824, 1106, 8, 4, 256, 8192, 256),
    # Same ratios, a few milliseconds per call on a laptop CPU.
    "small": Shapes(1, 512, 256, 3072, 246, 4, 2, 64, 1024, 64),
}


def time_ms(fn, *args, repeats: int) -> float:
    """Median wall milliseconds of ``jax.jit(fn)(*args)`` after one warm-up call."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _normal(gen: np.random.Generator, shape, dtype, scale: float = 1.0) -> jax.Array:
    return jnp.asarray((gen.standard_normal(shape) * scale).astype(jnp.dtype(dtype)))


def _sorted_indices(gen: np.random.Generator, rows: int, universe: int, count: int) -> jax.Array:
    picks = [np.sort(gen.choice(universe, count, replace=False)) for _ in range(rows)]
    return jnp.asarray(np.stack(picks).astype(np.int32))


def bench_stat_topk(s: Shapes, dtype, timed_impls, repeats):
    """FFN predictor row [B, F] with k = ffn_keep."""
    x = _normal(np.random.default_rng(0), (s.batch, s.ffn_dim), dtype)
    k = s.ffn_keep
    cases = {
        f"stat_topk/{impl}": functools.partial(statistical_topk, k=k, implementation=impl)
        for impl in timed_impls
    }
    cases["stat_topk/baseline_lax_top_k"] = lambda x: jax.lax.top_k(x, k)[0]
    cases["stat_topk/baseline_approx_max_k"] = lambda x: jax.lax.approx_max_k(x, k)[0]
    return {name: time_ms(fn, x, repeats=repeats) for name, fn in cases.items()}


def bench_sparse_ffn(s: Shapes, dtype, timed_impls, repeats):
    """Decode FFN over ffn_keep gathered neurons against the dense FFN over all F."""
    gen = np.random.default_rng(1)
    rest = s.model_dim - s.predictor_dim
    h = _normal(gen, (s.batch, s.ffn_keep), dtype)
    idx = _sorted_indices(gen, s.batch, s.ffn_dim, s.ffn_keep)
    x_rest = _normal(gen, (s.batch, rest), dtype)
    k2 = _normal(gen, (s.ffn_dim, rest), dtype, rest**-0.5)
    v = _normal(gen, (s.ffn_dim, s.model_dim), dtype, s.ffn_dim**-0.5)
    dense_h = _normal(gen, (s.batch, s.ffn_dim), dtype)
    out = {}
    for impl in timed_impls:
        fn = functools.partial(sparse_ffn, implementation=impl)
        out[f"sparse_ffn/{impl}"] = time_ms(fn, h, idx, x_rest, k2, v, repeats=repeats)

    def dense(dense_h, x_rest, k2, v):
        return ((x_rest @ k2.T) * dense_h) @ v

    out["sparse_ffn/baseline_dense"] = time_ms(dense, dense_h, x_rest, k2, v, repeats=repeats)
    return out


def bench_topk_attention(s: Shapes, dtype, timed_impls, repeats):
    """Decode attention over attn_keep selected keys against dense attention over S keys."""
    gen = np.random.default_rng(2)
    b, n, kv, seq, h = s.batch, s.num_heads, s.num_kv_heads, s.seq_len, s.head_dim
    r = h // 2
    q_rest = _normal(gen, (b, n, h - r), dtype, (h - r) ** -0.5)
    p = jax.nn.softmax(_normal(gen, (b, n, s.attn_keep), jnp.float32), axis=-1)
    idx = _sorted_indices(gen, b * n, seq, s.attn_keep).reshape(b, n, s.attn_keep)
    k_rest = _normal(gen, (b, kv, seq, h - r), dtype)
    v = _normal(gen, (b, kv, seq, h), dtype)
    q = _normal(gen, (b, n, h), dtype, h**-0.5)
    k = _normal(gen, (b, kv, seq, h), dtype)
    out = {}
    for impl in timed_impls:
        fn = functools.partial(topk_attention, implementation=impl)
        out[f"topk_attention/{impl}"] = time_ms(fn, q_rest, p, idx, k_rest, v, repeats=repeats)

    def dense(q, k, v):
        q = q.reshape(b, kv, n // kv, h)
        weights = jax.nn.softmax(jnp.einsum("bkgh,bksh->bkgs", q, k).astype(jnp.float32), -1)
        return jnp.einsum("bkgs,bksh->bkgh", weights.astype(v.dtype), v).reshape(b, n, h)

    out["topk_attention/baseline_dense"] = time_ms(dense, q, k, v, repeats=repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="gemma2_2b")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: bfloat16 on TPU/GPU, float32 on CPU (XLA:CPU bf16 dots are slow)",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args()

    backend = jax.default_backend()
    on_accelerator = backend in ("tpu", "gpu")
    kernel = resolve_implementation("auto", interpret=False)
    timed_impls = (kernel, "xla") if on_accelerator else ("xla",)
    note = (
        f"{backend}: Pallas kernels timed as {kernel}"
        if on_accelerator
        else "cpu: only XLA paths and baselines are timed; Pallas kernels run on TPU/GPU only"
    )
    print(note)
    dtype_name = args.dtype or ("bfloat16" if on_accelerator else "float32")
    shapes, dtype = SIZES[args.size], jnp.dtype(dtype_name)
    results = {}
    for bench in (bench_stat_topk, bench_sparse_ffn, bench_topk_attention):
        for name, ms in bench(shapes, dtype, timed_impls, args.repeats).items():
            results[name] = ms
            print(f"{name:40s} {ms:9.3f} ms")
    report = {
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "note": note,
        "size": args.size,
        "shapes": dataclasses.asdict(shapes),
        "dtype": dtype_name,
        "repeats": args.repeats,
        "median_ms": results,
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
