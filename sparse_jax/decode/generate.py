"""High-level generation: batched prompts of mixed lengths in, new tokens out, streamed.

:func:`stream` left-pads the prompts, prefills one cache for the batch, then loops over the
jitted decode step (cache donated) and a jitted sampler, yielding a :class:`StepOutput` after
every token; rows stop at a stop token (not emitted) or after
``max_new_tokens``, and the loop ends when every row has stopped. :func:`generate` drains the
stream into a :class:`GenerationResult`, calling an optional callback per step. Each request
samples from its own seed, so a request's tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.decode.cache import KVCache, init_cache
from sparse_jax.decode.sampling import GREEDY, Sampler, sample, step_keys
from sparse_jax.decode.step import (
    DEFAULT_OPTIONS,
    DecodeOptions,
    DecodeParams,
    check_tokens,
    decode_params,
    decode_step_jit,
    prefill,
)
from sparse_jax.kernels import Kernels
from sparse_jax.model.config import ModelConfig, as_count, check_context


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One generated token per row.

    Attributes:
      step: index of the new token (0 for the first).
      tokens: int32 [B]; -1 for rows that had already stopped or stop at this step.
      done: bool [B], rows finished after this step.
    """

    step: int
    tokens: np.ndarray
    done: np.ndarray


@dataclasses.dataclass
class GenerationResult:
    """Output of :func:`generate`.

    Attributes:
      tokens: per request, the new tokens (a stop token ends the list and is not included).
      finish_reasons: per request, "stop" or "length".
      stats: ``prefill_s`` and ``decode_s`` (wall seconds), ``steps`` (decode steps run),
        ``attn_overflow`` and ``ffn_overflow`` (per layer [L], steps whose sparse selection
        overflowed its capacity and fell back to the masked computation), ``attn_keys`` and
        ``ffn_active`` (per layer [L], means over the decode steps).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict


@functools.partial(jax.jit, static_argnames=("sampler",))
def _sample(sampler, logits, seeds, step):
    return sample(logits, step_keys(seeds, step), sampler)


def _prepare(cfg, params, prompts, max_new_tokens, sampler, seeds):
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        raise ValueError("prompts must be a batch: a sequence of token-id sequences")
    rows = [np.asarray(p) for p in prompts]
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
        raise ValueError("prompts must be a non-empty sequence of non-empty token-id sequences")
    for r in rows:
        check_tokens(cfg, r)
    max_new_tokens = as_count(max_new_tokens, "max_new_tokens")
    longest = max(r.size for r in rows)
    check_context(cfg.max_seq_len, longest, max_new_tokens)
    sampler.check_vocab(cfg.vocab_size)
    seed_list = [seeds] * len(rows) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) != len(rows) or not all(isinstance(s, int | np.integer) for s in seed_list):
        raise ValueError(f"seeds must be an int or one int per prompt ({len(rows)}), got {seeds}")
    padded = np.zeros((len(rows), longest), np.int32)
    for i, r in enumerate(rows):
        padded[i, longest - r.size :] = r
    lengths = np.array([r.size for r in rows], np.int32)
    params = decode_params(cfg, params)
    seeds_arr = jnp.asarray(np.array(seed_list, np.int64) % (1 << 31), jnp.int32)
    return params, padded, lengths, seeds_arr


def _stop_ids(stop_tokens: int | Sequence[int]) -> np.ndarray:
    """Stop ids as int64 [n]: one integer-like id, or a sequence of them."""
    if np.ndim(stop_tokens) == 0 and hasattr(stop_tokens, "__index__"):
        stop_tokens = [stop_tokens]
    try:
        ids = list(stop_tokens)
    except TypeError:
        raise ValueError(
            f"stop_tokens={stop_tokens!r} must be a token id or a sequence of token ids"
        ) from None
    for i in ids:
        if isinstance(i, bool) or np.ndim(i) != 0 or not hasattr(i, "__index__"):
            raise ValueError(f"stop_tokens must hold integer token ids, got {i!r}")
    return np.asarray([operator.index(i) for i in ids], np.int64)


def stream(
    cfg: ModelConfig,
    params: DecodeParams,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler = GREEDY,
    seeds: int | Sequence[int] = 0,
    stop_tokens: int | Sequence[int] = (),
    options: DecodeOptions = DEFAULT_OPTIONS,
    cache_len: int | None = None,
    stats: dict | None = None,
) -> Iterator[StepOutput]:
    """Generates token by token, yielding after each new token of the batch.

    Args:
      cfg: model config.
      params: the model's parameters (scanned ones are split per layer on each call; split
        them once with :func:`sparse_jax.decode.step.decode_params` instead).
      prompts: B token-id sequences of any lengths >= 1.
      max_new_tokens: most new tokens per request, an integer (``numpy`` integers too) >= 1.
      sampler: how tokens are drawn; greedy by default.
      seeds: one seed for every request or one per request.
      stop_tokens: a token id or ids that end a request (not emitted).
      options: decode options (path, capacities, prefill chunk).
      cache_len: slot-times of the cache; at least the longest prompt plus
        ``max_new_tokens - 1`` (the default), at most ``cfg.max_seq_len``. A fixed value lets
        requests of different lengths share compiled steps.
      stats: optional dict filled with the statistics described in :class:`GenerationResult`.

    Yields:
      :class:`StepOutput` per new token.

    Raises:
      ValueError: empty or out-of-range prompts, a prompt plus ``max_new_tokens`` beyond the
        context, bad seeds or a sampler that does not fit the vocabulary.
      ImplementationUnavailableError: ``options`` asks for kernels this backend cannot run.
    """
    max_new_tokens = as_count(max_new_tokens, "max_new_tokens")
    # Decoding runs now, on this backend: a kernel it cannot run fails before the first token.
    Kernels(options.implementation, options.interpret).resolved()
    params, padded, lengths, seeds_arr = _prepare(
        cfg, params, prompts, max_new_tokens, sampler, seeds
    )
    b, t = padded.shape
    stop = _stop_ids(stop_tokens)
    if cache_len is not None:
        cache_len = as_count(cache_len, "cache_len")
    needed = t + max_new_tokens - 1
    if cache_len is not None and not needed <= cache_len <= cfg.max_seq_len:
        raise ValueError(
            f"cache_len={cache_len} must be in [{needed}, cfg.max_seq_len={cfg.max_seq_len}]: "
            f"the longest prompt ({t}) plus max_new_tokens - 1"
        )
    cache: KVCache = init_cache(cfg, b, needed if cache_len is None else cache_len)
    start = time.perf_counter()
    logits, cache, _ = prefill(cfg, params, cache, padded, lengths, options)
    tokens = _sample(sampler, logits, seeds_arr, jnp.int32(0))
    host = np.asarray(tokens)
    prefill_s = time.perf_counter() - start
    totals: dict[str, np.ndarray] = {}
    done = np.zeros((b,), bool)
    steps = 0
    start = time.perf_counter()
    for step in range(max_new_tokens):
        stopping = np.isin(host, stop) & ~done
        emitted = np.where(done | stopping, -1, host).astype(np.int32)
        done = done | stopping | (step == max_new_tokens - 1)
        if stats is not None:
            stats.update(_summary(totals, steps, prefill_s, time.perf_counter() - start))
        yield StepOutput(step=step, tokens=emitted, done=done.copy())
        if done.all():
            break
        logits, cache, layer_stats = decode_step_jit(cfg, options, params, cache, tokens)
        tokens = _sample(sampler, logits, seeds_arr, jnp.int32(step + 1))
        host = np.asarray(tokens)
        steps += 1
        for name, value in jax.device_get(layer_stats).items():
            totals[name] = totals.get(name, 0) + np.asarray(value, np.float64)
    if stats is not None:
        stats.update(_summary(totals, steps, prefill_s, time.perf_counter() - start))


def _summary(totals: dict, steps: int, prefill_s: float, decode_s: float) -> dict:
    out: dict = {"prefill_s": prefill_s, "decode_s": decode_s, "steps": steps}
    for name, total in totals.items():
        if name.endswith("overflow"):
            out[name] = np.asarray(total, np.int64)
        else:
            out[name] = total / max(steps, 1)
    return out


def generate(
    cfg: ModelConfig,
    params: DecodeParams,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler = GREEDY,
    seeds: int | Sequence[int] = 0,
    stop_tokens: int | Sequence[int] = (),
    options: DecodeOptions = DEFAULT_OPTIONS,
    cache_len: int | None = None,
    callback: Callable[[StepOutput], None] | None = None,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` per prompt; arguments as :func:`stream`.

    Args:
      cfg: model config.
      params: the model's parameters (scanned or unstacked).
      prompts: B token-id sequences.
      max_new_tokens: most new tokens per request, an integer-like >= 1.
      sampler: how tokens are drawn; greedy by default.
      seeds: one seed for every request or one per request.
      stop_tokens: a token id or ids that end a request (not included in the output).
      options: decode options.
      cache_len: slot-times of the cache (see :func:`stream`).
      callback: called with every :class:`StepOutput` as it is produced.

    Returns:
      A :class:`GenerationResult`.
    """
    stats: dict = {}
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for step_out in stream(
        cfg,
        params,
        prompts,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        seeds=seeds,
        stop_tokens=stop_tokens,
        options=options,
        cache_len=cache_len,
        stats=stats,
    ):
        if callback is not None:
            callback(step_out)
        for i, token in enumerate(step_out.tokens):
            if token >= 0:
                out[i].append(int(token))
            else:
                stopped[i] = True
    reasons = ["stop" if s else "length" for s in stopped]
    return GenerationResult(tokens=out, finish_reasons=reasons, stats=stats)
