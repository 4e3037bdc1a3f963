"""One 2B layer's prefill pieces and the decode FFN, each form side by side; writes JSON.

Run from the repository root: ``.venv/bin/python -m benchmarks.prefill_parts``. Random
weights and inputs at the ``gemma2_2b`` / ``spark_gemma2_2b`` shapes, median of ``--repeats``
calls after a warm-up, the forms of each piece alternated in one process:

* attention of a 256-token prefill chunk over a cache of 2049 slots holding 0, 1024 or 1792
  keys (and the chunk's own): dense blockwise, Spark blockwise, Spark through the native
  scored kernel (:func:`sparse_jax.model.attention.attend_scored_native`);
* the FFN of 256 tokens: the gated FFN, Spark masked, Spark's block kernel from XLA's
  activations, and the block kernel with the threshold inside (what prefill runs);
* the decode FFN at batch 1 and 8: Spark per-token gather against the block kernel.

Needs the native kernels. Results: ``benchmarks/results/prefill_parts.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import cpu_model, timed
from configs import gemma2_2b
from pallas_kernels import _native
from sparse_jax.decode.step import DecodeOptions
from sparse_jax.kernels import Kernels
from sparse_jax.model import attention as A
from sparse_jax.model.ffn import GatedFFN, SparkFFN

RESULTS = pathlib.Path(__file__).parent / "results"
CHUNK, SLOTS = 256, 2049


def _one_layer(cfg):
    return dataclasses.replace(
        cfg, num_layers=1, layer_types=None, attn_sparse_layers=None, ffn_sparse_layers=None
    )


def _random(tree, gen):
    return jax.tree.map(
        lambda a: jnp.asarray(gen.standard_normal(a.shape, dtype=np.float32) * 0.02), tree
    )


def attention_ms(gen, repeats: int) -> dict[str, float]:
    kernels = Kernels("native")
    dense, spark = gemma2_2b.dense(), gemma2_2b.spark()
    q = jnp.asarray(gen.standard_normal((1, CHUNK, 8, 256), dtype=np.float32))
    k = jnp.asarray(gen.standard_normal((1, 4, SLOTS + CHUNK, 256), dtype=np.float32))
    v = jnp.asarray(gen.standard_normal((1, 4, SLOTS + CHUNK, 256), dtype=np.float32))
    forms = {
        "dense_blockwise": (dense, A.attend_blockwise),
        "spark_blockwise": (spark, A.attend_blockwise),
        "spark_scored": (spark, None),
    }
    out = {}
    for cached in (0, 1024, 1792):
        pos = np.full((1, SLOTS + CHUNK), -1, np.int32)
        pos[0, :cached] = np.arange(cached)
        pos[0, SLOTS:] = cached + np.arange(CHUNK)
        q_pos = jnp.asarray(pos[:, SLOTS:])
        for name, (cfg, attend) in forms.items():
            seg = {"v": v, "pos": jnp.asarray(pos)}
            if cfg.attn_kind == "spark":
                seg["k_pred"], seg["k_rest"] = k[..., :128], k[..., 128:]
            else:
                seg["k"] = k
            if attend is None:
                fn = jax.jit(
                    lambda q, s, p, c=cfg: A.attend_scored_native(
                        c, q, (s,), p, 4096, True, kernels
                    )
                )
            else:
                fn = jax.jit(lambda q, s, p, c=cfg, f=attend: f(c, q, s, p, 4096, True, kernels))
            out[f"attention/{cached}/{name}"] = timed(fn, q, seg, q_pos, repeats=repeats)
    return out


def ffn_ms(gen, repeats: int) -> dict[str, float]:
    kernels = Kernels("native")
    spark, dense = _one_layer(gemma2_2b.spark()), _one_layer(gemma2_2b.dense())
    out = {}
    x = jnp.asarray(gen.standard_normal((1, CHUNK, 2304), dtype=np.float32))
    gated = GatedFFN(dense, kernels=kernels)
    pg = _random(gated.init(jax.random.key(0), x[:, :1], True), gen)
    out["ffn/gated"] = timed(
        jax.jit(lambda p, x: gated.apply(p, x, True)[0]), pg, x, repeats=repeats
    )
    ffn = SparkFFN(spark, kernels=kernels)
    p = _random(ffn.init(jax.random.key(0), x[:, :1], True), gen)
    forms = {
        "masked": lambda p, x: ffn.apply(p, x, True, "masked")[0],
        # A traced `enabled` keeps XLA's threshold and hands the kernel the activations.
        "block_from_activations": lambda p, x: ffn.apply(p, x, jnp.bool_(True), "block")[0],
        "block_threshold_inside": lambda p, x: ffn.apply(p, x, True, "block")[0],
    }
    for name, fn in forms.items():
        out[f"ffn/spark_{name}"] = timed(jax.jit(fn), p, x, repeats=repeats)
    for batch in (1, 8):
        x = jnp.asarray(gen.standard_normal((batch, 1, 2304), dtype=np.float32))
        cap = DecodeOptions().ffn_caps(spark, batch)[0]
        per_token = jax.jit(lambda p, x, c=cap: ffn.apply(p, x, True, "per_token", c)[0])
        block = jax.jit(lambda p, x: ffn.apply(p, x, True, "block")[0])
        out[f"decode_ffn/b{batch}/per_token"] = timed(per_token, p, x, repeats=repeats)
        out[f"decode_ffn/b{batch}/block"] = timed(block, p, x, repeats=repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not _native.available():
        raise SystemExit(_native.unavailable_reason())
    gen = np.random.default_rng(0)
    ms = {**attention_ms(gen, args.repeats), **ffn_ms(gen, args.repeats)}
    report = {"machine": f"{cpu_model()}, ISA {_native.isa()}", "ms": ms}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefill_parts.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# One 2B layer's prefill pieces and the decode FFN (ms, median)",
        "",
        f"Machine: {report['machine']}. `python -m benchmarks.prefill_parts`.",
        "",
        "| piece | ms |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in ms.items()),
    ]
    (RESULTS / "prefill_parts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
