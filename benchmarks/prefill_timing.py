"""Prefill timing for the benchmarks: one prompt's prefill, and dense against Spark alternated.

:func:`prefill_compare` is the prefill row of ``python -m benchmarks.decode``;
:func:`prefill_ms` times one prefill (``benchmarks.prefill_forms`` uses it too).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import jax
import numpy as np

from sparse_jax.decode.cache import init_cache
from sparse_jax.decode.step import DecodeOptions, prefill
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.weights import random_params


def prefill_ms(cfg, params, tokens: np.ndarray, chunk: int, implementation: str) -> float:
    """Wall ms to prefill ``tokens`` [1, T] into a fresh cache (compiled by an earlier call)."""
    opts = DecodeOptions(prefill_chunk=chunk, implementation=implementation)
    cache = init_cache(cfg, 1, tokens.shape[1] + 1)
    start = time.perf_counter()
    jax.block_until_ready(prefill(cfg, params, cache, tokens, None, opts)[0])
    return (time.perf_counter() - start) * 1e3


def _first_layers(cfg: ModelConfig, layers: int, length: int) -> ModelConfig:
    return dataclasses.replace(
        cfg,
        param_dtype="float32",
        num_layers=layers,
        layer_types=None,
        attn_sparse_layers=None,
        ffn_sparse_layers=None,
        max_seq_len=max(cfg.max_seq_len, length + 1),
    )


def prefill_compare(
    cfgs: dict[str, ModelConfig],
    *,
    layers: int,
    length: int,
    rounds: int,
    chunk: int,
    implementation: str,
) -> dict:
    """Prefill of a ``length``-token prompt, float32, the models of ``cfgs`` alternated.

    Prefill is compute-bound and costs the same in every layer, so each model is built with
    its first ``n`` and ``2n`` layers only (``n = layers``, at most half the shallowest
    model): the difference of the two times is ``n`` layers' cost, and the rest counts once
    in the whole-depth estimate: the embedding, the last position's logits, and the last
    layer, whose work after its keys and values only the last chunk does (the other chunks
    fill the cache). One unrecorded pass compiles every program; then ``rounds`` rounds each
    time the variants in turn, and every figure is a median over the rounds (the difference
    of two single timings moved by more than the ratio's margin).

    Returns:
      ``{"layers", "length", "samples_ms"}``, each model's whole-depth ms (under its name)
      and per-layer ms (``<name>/per_layer``), and ``ratio_per_round``: the first model's
      whole-depth time over the second's, round by round.
    """
    n = max(1, min(layers, min(c.num_layers for c in cfgs.values()) // 2))
    variants = {
        (name, depth): _first_layers(cfg, depth, length) for name, cfg in cfgs.items()
        for depth in (n, 2 * n)
    }  # fmt: skip
    params = {name: random_params(variants[(name, 2 * n)], seed=0) for name in cfgs}
    subs = {
        (name, depth): {
            k: v
            for k, v in params[name].items()
            if not k.startswith("layers_") or int(k.split("_")[1]) < depth
        }
        for (name, depth) in variants
    }
    vocab = min(c.vocab_size for c in cfgs.values())
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (1, length), 0, vocab))
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in variants}
    for r in range(rounds + 1):
        for key, part in variants.items():
            ms = prefill_ms(part, subs[key], tokens, chunk, implementation)
            if r:  # round 0 compiles
                samples[key].append(ms)
    del params, subs
    gc.collect()

    def whole(cfg: ModelConfig, short: float, double: float) -> float:
        return short + (cfg.num_layers - n) * (double - short) / n

    out: dict = {
        "layers": n,
        "length": length,
        "samples_ms": {f"{k[0]}/{k[1]}": v for k, v in samples.items()},
    }
    for name, cfg in cfgs.items():
        short, double = (statistics.median(samples[(name, d)]) for d in (n, 2 * n))
        out[name] = whole(cfg, short, double)
        out[name + "/per_layer"] = (double - short) / n
    first, second = list(cfgs)[:2]
    out["ratio_per_round"] = [
        whole(cfgs[first], samples[(first, n)][r], samples[(first, 2 * n)][r])
        / whole(cfgs[second], samples[(second, n)][r], samples[(second, 2 * n)][r])
        for r in range(rounds)
    ]
    return out
