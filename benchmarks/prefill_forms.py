"""Prefill of a 2048-token prompt through the first 2 layers of ``gemma2_2b`` and
``spark_gemma2_2b`` (random weights), attention materialized against ``attn_impl="auto"``
(blockwise in these chunks), alternated after one unrecorded call of each that compiles it;
chunks of 256 tokens, ``benchmarks.prefill_timing.prefill_ms``.

    python -m benchmarks.prefill_forms [--rounds 2]

Results: ``benchmarks/results/prefill_forms.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics

import jax
import numpy as np

from benchmarks.prefill_timing import prefill_ms
from benchmarks.train_step import cpu_model
from configs import get_model_config
from sparse_jax.model.weights import random_params

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {}
    for name in ("gemma2_2b", "spark_gemma2_2b"):
        cfg = dataclasses.replace(
            get_model_config(name),
            num_layers=2,
            layer_types=None,
            attn_sparse_layers=None,
            ffn_sparse_layers=None,
        )
        params = random_params(cfg, seed=0)
        tokens = np.asarray(jax.random.randint(jax.random.key(2), (1, 2048), 0, cfg.vocab_size))
        forms = {
            impl: dataclasses.replace(cfg, attn_impl=impl) for impl in ("materialized", "auto")
        }
        for c in forms.values():
            prefill_ms(c, params, tokens, 256, "auto")  # compiles
        for _ in range(args.rounds):
            for impl, c in forms.items():
                ms = prefill_ms(c, params, tokens, 256, "auto")
                times.setdefault(f"{name}/{impl}", []).append(ms)
                print(f"{name} {impl}: {ms:.0f} ms", flush=True)
        del params
    report = {
        "machine": f"{cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s)",
        "prefill_ms": {k: statistics.median(v) for k, v in times.items()},
        "times_ms": times,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefill_forms.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["prefill_ms"], indent=1))


if __name__ == "__main__":
    main()
