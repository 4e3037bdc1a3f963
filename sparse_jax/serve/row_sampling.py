"""Per-row sampling for a batch whose rows belong to different requests.

:func:`sparse_jax.decode.sampling.sample` takes one static
:class:`~sparse_jax.decode.sampling.Sampler` for the whole batch, and every new value compiles a
new function. A continuous batch mixes requests with their own temperature, top-k, top-p, seed
and step, so :func:`sample_rows` takes them as arrays [B] and compiles once per batch size. It
filters with the same function as :class:`~sparse_jax.decode.sampling.Sampler` does
(:func:`sparse_jax.decode.sampling.filter_rows`, given arrays instead of scalars) and draws
with the same per-row keys (``fold_in(key(seed), step)``), so a request draws the tokens it
would draw alone with the equivalent ``Sampler``. :class:`RowSettings` is one request's
settings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.decode.sampling import Sampler, filter_rows

# top_p above 1 keeps every token: the cumulative mass before a token is at most 1 (+ rounding).
TOP_P_OFF = 2.0


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """How one request draws its tokens.

    Attributes:
      temperature: 0 means greedy.
      top_k: int >= 1, or 0 to disable.
      top_p: in (0, 1], or :data:`TOP_P_OFF` to disable.
      seed: reduced to [0, 2**31) as :func:`sparse_jax.decode.generate.stream` reduces seeds.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = TOP_P_OFF
    seed: int = 0

    @classmethod
    def from_sampler(cls, sampler: Sampler, seed: int) -> RowSettings:
        """The settings equivalent to ``sampler`` (``min_p`` is not supported)."""
        if sampler.min_p is not None:
            raise ValueError("per-row sampling does not support Sampler.min_p")
        return cls(
            temperature=float(sampler.temperature),
            top_k=sampler.top_k or 0,
            top_p=TOP_P_OFF if sampler.top_p is None else float(sampler.top_p),
            seed=int(seed) % (1 << 31),
        )


def settings_arrays(rows: list[RowSettings]) -> dict[str, np.ndarray]:
    """Host arrays [B] of the settings, as :func:`sample_rows` takes them."""
    return {
        "temperature": np.array([r.temperature for r in rows], np.float32),
        "top_k": np.array([r.top_k for r in rows], np.int32),
        "top_p": np.array([r.top_p for r in rows], np.float32),
        "seeds": np.array([r.seed for r in rows], np.int32),
    }


@jax.jit
def sample_rows(
    logits: jax.Array,
    seeds: jax.Array,
    steps: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One token per row, each row with its own settings.

    Args:
      logits: [B, V] float32.
      seeds: int32 [B] per-request seeds.
      steps: int32 [B], the index of the token each row draws (0 for its first new token).
      temperature: float32 [B]; 0 is greedy for that row.
      top_k: int32 [B]; 0 disables.
      top_p: float32 [B]; above 1 disables.

    Returns:
      int32 [B] token ids.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_: None) -> jax.Array:
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
        filtered = filter_rows(logits, temperature, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # An all-greedy batch skips the sorts.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
