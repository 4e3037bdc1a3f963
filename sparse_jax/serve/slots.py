"""Request rows in one shared KV cache: prefilling new requests, placing them, moving rows.

The engine decodes its requests as the rows of one cache. Every row of a
:class:`~sparse_jax.decode.cache.KVCache` advances through the ring slots together (slot-time
``t`` goes to ring slot ``t % S``), so a request cannot be prefilled into a live cache in
place. :func:`prefill_group` prefills a group of new prompts into a fresh cache with the shared
cache's ring sizes, left-padded to a whole number of prefill chunks, and :func:`insert_rows`
rotates each of its rows so that the prompt holds the slot-times just before the shared cursor
and writes it over a row of the shared cache (every other ring slot of the row comes out
empty). The next decode step then continues the request where its prefill ended, and the ring
never evicts a key still inside a window. Since the fresh cache always has the full context
length and every prefill chunk has the same width, one compiled prefill serves every prompt
length (two when the context is not a whole number of chunks); group sizes are bucketed to
powers of two. :func:`take_rows` re-lays a cache out with more or fewer rows (the engine
decodes only as many rows as its requests need); a moved row keeps its contents, since all
rows share the cursor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.decode.cache import KVCache, init_cache
from sparse_jax.decode.step import DecodeOptions, DecodeParams, prefill
from sparse_jax.model.config import ModelConfig


def bucket(n: int, most: int) -> int:
    """The smallest power of two >= ``n`` (1 for 0), capped at ``most``."""
    return min(1 << max(n - 1, 0).bit_length(), most)


def prefill_group(
    cfg: ModelConfig,
    params: DecodeParams,
    prompts: list[list[int]],
    options: DecodeOptions,
    max_group: int,
) -> tuple[jax.Array, KVCache]:
    """Prefills prompts into a fresh full-context cache.

    Args:
      cfg: model config.
      params: the model's parameters, layers unstacked (``decode_params``).
      prompts: G >= 1 non-empty token-id lists, each at most ``cfg.max_seq_len`` long.
      options: decode options; prompts are left-padded to a multiple of
        ``options.prefill_chunk`` (capped at ``cfg.max_seq_len``).
      max_group: the largest group size; G is padded to a power of two up to it.

    Returns:
      logits [G', V] at each row's last prompt token and the cache of G' >= G rows; rows past
      G are padding (a one-token prompt) to be dropped.
    """
    rows = bucket(len(prompts), max_group)
    chunk = options.prefill_chunk
    longest = max(len(p) for p in prompts)
    length = min(-(-longest // chunk) * chunk, cfg.max_seq_len)
    tokens = np.zeros((rows, length), np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, length - len(prompt) :] = prompt
        lengths[i] = len(prompt)
    cache = init_cache(cfg, rows, cfg.max_seq_len)
    logits, cache, _ = prefill(cfg, params, cache, tokens, lengths, options)
    return logits, cache


@functools.partial(jax.jit, donate_argnames=("shared",))
def insert_rows(shared: KVCache, fresh: KVCache, rows: jax.Array) -> KVCache:
    """Writes each row of a freshly prefilled cache over a row (slot) of the shared cache.

    Args:
      shared: the engine's cache of B rows; donated.
      fresh: a cache of G rows with the same ring sizes, from :func:`prefill_group`.
      rows: int32 [G], the shared row each fresh row goes to; B or more drops that row.

    Returns:
      The shared cache with those rows replaced; its cursor is unchanged.

    Raises:
      ValueError: the two caches' ring sizes differ.
    """
    layers = []
    for old, new in zip(shared.layers, fresh.layers, strict=True):
        size = old["pos"].shape[1]
        if new["pos"].shape[1] != size:
            raise ValueError(f"ring sizes differ: shared {size}, fresh {new['pos'].shape[1]}")
        # Fresh slot-time t sits in slot t % S and must move to (shared.length - written + t).
        shift = (shared.length - fresh.length) % size
        layer = {}
        for name, value in old.items():
            moved = jnp.roll(new[name], shift, axis=1 if name == "pos" else 2)
            layer[name] = value.at[rows].set(moved.astype(value.dtype), mode="drop")
        layers.append(layer)
    next_pos = shared.next_pos.at[rows].set(fresh.next_pos, mode="drop")
    return KVCache(layers=tuple(layers), length=shared.length, next_pos=next_pos)


@jax.jit
def take_rows(cache: KVCache, source: jax.Array) -> KVCache:
    """A cache whose row ``i`` is row ``source[i]`` of ``cache``, or empty where out of range.

    Args:
      cache: a cache of B rows.
      source: int32 [B'], a row of ``cache`` per new row; B or more gives an empty row.

    Returns:
      A cache of B' rows with the same cursor.
    """

    def take(name: str, value: jax.Array) -> jax.Array:
        fill = -1 if name == "pos" else 0
        return jnp.take(value, source, axis=0, mode="fill", fill_value=fill)

    layers = tuple(
        {name: take(name, value) for name, value in layer.items()} for layer in cache.layers
    )
    next_pos = jnp.take(cache.next_pos, source, mode="fill", fill_value=0)
    return KVCache(layers=layers, length=cache.length, next_pos=next_pos)
