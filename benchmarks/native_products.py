"""The native CPU product kernel against the model's XLA products, side by side; writes JSON.

Run from the repository root: ``.venv/bin/python -m benchmarks.native_products``. For one
Gemma-2 2B FFN weight ([9216, 2304]) in float32 and bfloat16 and 1 to 16 rows, it times
:func:`sparse_jax.model.products.linear` with XLA's formulation (``native=False``: a dot, or
the fenced elementwise form for a few rows) and the native kernel
(:mod:`pallas_kernels.linear.native`), alternating the two, median of ``--repeats`` calls
after a warm-up. These figures set ``native_max_rows`` in :mod:`sparse_jax.policy`. Results:
``benchmarks/results/native_products.{json,md}``.
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
from pallas_kernels import _native
from pallas_kernels.linear import native as linear_native
from sparse_jax.model import products

RESULTS = pathlib.Path(__file__).parent / "results"


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="9216,2304", help="weight [out, in]")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not _native.available():
        raise SystemExit(f"error: {_native.unavailable_reason()}")
    out_dim, in_dim = (int(s) for s in args.shape.split(","))
    gen = np.random.default_rng(0)
    xla = jax.jit(lambda x, w: products.linear(x, w, native=False))
    native = jax.jit(linear_native.linear)
    rows_out = []
    for dtype in ("float32", "bfloat16"):
        w = jnp.asarray(gen.standard_normal((out_dim, in_dim)), dtype)
        for rows in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(gen.standard_normal((rows, in_dim)), jnp.float32)
            xla_ms = _median_ms(xla, (x, w), args.repeats)
            native_ms = _median_ms(native, (x, w), args.repeats)
            rows_out.append(
                {"dtype": dtype, "rows": rows, "xla_ms": xla_ms, "native_ms": native_ms}
            )
            print(rows_out[-1], flush=True)
    report = {
        "machine": f"{cpu_model()}, native isa {_native.isa()}",
        "weight": [out_dim, in_dim],
        "repeats": args.repeats,
        "rows": rows_out,
    }
    lines = [
        f"# Native product vs XLA's ({report['machine']}, weight {out_dim} x {in_dim})",
        "",
        "| dtype | rows | XLA ms | native ms | XLA / native |",
        "|---|---|---|---|---|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['dtype']} | {r['rows']} | {r['xla_ms']:.2f} | {r['native_ms']:.2f} "
            f"| {r['xla_ms'] / r['native_ms']:.2f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "native_products.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "native_products.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
