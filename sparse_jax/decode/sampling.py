"""Token samplers for decoding: greedy, temperature, top-k, top-p (nucleus) and min-p.

A :class:`Sampler` is a frozen, validated, hashable description (a static argument under
``jit``); :func:`sample` draws one token per row from float32 logits [B, V] with one PRNG key
per row, so a request's tokens depend only on its own seed and step, never on the other rows of
the batch. Filters apply in the order temperature, top-k, top-p, min-p, each on the
distribution the previous ones left; temperature 0 is greedy (argmax) and ignores the filters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is drawn from the logits.

    Attributes:
      temperature: logits are divided by it; 0 means greedy (argmax). Must be >= 0.
      top_k: keep only the k most likely tokens (k >= 1); None disables.
      top_p: keep the smallest set of most likely tokens whose mass reaches p, in (0, 1];
        None disables.
      min_p: keep tokens with probability >= min_p times the top probability, in [0, 1];
        None disables.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, int | float) or not self.temperature >= 0:
            raise ValueError(f"Sampler.temperature={self.temperature!r} must be a number >= 0")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise ValueError(f"Sampler.top_k={self.top_k!r} must be an integer >= 1 or None")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampler.top_p={self.top_p!r} must be in (0, 1] or None")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"Sampler.min_p={self.min_p!r} must be in [0, 1] or None")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError if ``top_k`` exceeds the vocabulary."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise ValueError(f"Sampler.top_k={self.top_k} exceeds the vocabulary ({vocab_size})")


GREEDY = Sampler(temperature=0.0)


def filter_rows(
    logits: jax.Array,
    temperature: jax.Array | float,
    top_k: jax.Array | int | None = None,
    top_p: jax.Array | float | None = None,
    min_p: jax.Array | float | None = None,
) -> jax.Array:
    """Temperature-scaled logits with filtered-out tokens set to -inf: the one filter chain.

    Each setting is a Python scalar (one value for the batch; ``None`` skips the filter) or an
    array [B] (one value per row, for a batch of different requests). The filters apply in
    the order temperature, top-k, top-p, min-p, each on what the previous ones left.

    Args:
      logits: [B, V] float32.
      temperature: > 0 where the row samples; rows at 0 are scaled by 1 (the caller takes
        their argmax).
      top_k: keep the k most likely tokens; per row, 0 disables. Ties keep the lower id.
      top_p: keep the smallest set of most likely tokens whose mass reaches p; per row, a
        value above 1 disables.
      min_p: keep tokens with probability >= min_p times the top one.

    Returns:
      [B, V] float32; at least the most likely token of each row stays finite.
    """
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]

    def per_row(value):
        return jnp.asarray(value, jnp.float32).reshape(-1, 1)

    temperature = per_row(temperature)
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    if isinstance(top_k, int):
        _, idx = jax.lax.top_k(scaled, top_k)
        keep = jnp.zeros(scaled.shape, bool).at[rows, idx].set(True)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    elif top_k is not None:
        # A different k per row: each token's rank, from a stable descending sort (ties keep
        # the lower id first, as lax.top_k does).
        order = jnp.argsort(-scaled, axis=-1, stable=True)
        rank = jnp.zeros((b, v), jnp.int32).at[rows, order].set(jnp.arange(v, dtype=jnp.int32))
        k = jnp.where(top_k > 0, top_k, v).reshape(-1, 1)
        scaled = jnp.where(rank < k, scaled, -jnp.inf)
    if top_p is not None:
        order = jnp.argsort(-scaled, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
        # A token is kept when the mass strictly before it is below p: the smallest such set.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = (before < per_row(top_p)).at[:, 0].set(True)
        keep = jnp.zeros(scaled.shape, bool).at[rows, order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    if min_p is not None:
        probs = jax.nn.softmax(scaled, axis=-1)
        top = jnp.max(probs, axis=-1, keepdims=True)
        scaled = jnp.where(probs >= per_row(min_p) * top, scaled, -jnp.inf)
    return scaled


def filter_logits(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """:func:`filter_rows` with one non-greedy :class:`Sampler`'s settings for every row."""
    return filter_rows(logits, sampler.temperature, sampler.top_k, sampler.top_p, sampler.min_p)


def sample(logits: jax.Array, keys: jax.Array, sampler: Sampler) -> jax.Array:
    """One token per row.

    Args:
      logits: [B, V] float32.
      keys: [B] PRNG keys (typed, from ``jax.random.key``), one per row; unused when greedy.
      sampler: the :class:`Sampler`.

    Returns:
      int32 [B] token ids.
    """
    if sampler.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampler)
    draw = jax.vmap(jax.random.categorical)(keys, filtered)
    return draw.astype(jnp.int32)


def step_keys(seeds: jax.Array, step: jax.Array) -> jax.Array:
    """Per-row keys for one decode step: ``fold_in(key(seed_b), step)``.

    Args:
      seeds: int32 [B] per-request seeds.
      step: int32 scalar, the index of the token being drawn (0 for the first new token).

    Returns:
      [B] typed PRNG keys.
    """
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)
