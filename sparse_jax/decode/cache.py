"""Key/value caches for decoding: one ring buffer per layer, sized by the layer's window.

A cache covers a batch of B rows and holds, per layer, the keys and values of the last S
tokens in slot order, where S is ``min(window, max_len)`` for local (sliding-window) layers and
``max_len`` for global ones. Spark attention layers store each key split into its predictor
half and the rest, ``k_pred`` [B, K, S, R] and ``k_rest`` [B, K, S, H-R], so the predictor read
at decode is contiguous per kv head; dense layers store ``k`` [B, K, S, H]; both store ``v``
[B, K, S, H] and ``pos`` [B, S], the position held by each slot (-1 for an empty or padding
slot, which attention masks out). All rows advance through the slots together: slot-time ``t``
(tokens written so far, padding included) goes to slot ``t % S``. Rows of different lengths are
left-padded at the first prefill, so padding only ever occupies the oldest slots and a ring
buffer never evicts a key still inside a window. ``next_pos`` [B] is each row's next position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.model.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Decode state of a batch: per-layer ring buffers and the write cursor.

    Attributes:
      layers: one dict per layer: ``pos`` [B, S] int32 and either ``k`` [B, K, S, H] (dense
        attention) or ``k_pred`` [B, K, S, R] and ``k_rest`` [B, K, S, H-R] (Spark), plus
        ``v`` [B, K, S, H].
      length: int32 scalar, slot-times written so far (padding included).
      next_pos: int32 [B], the position the next token of each row gets.
    """

    layers: tuple[dict[str, jax.Array], ...]
    length: jax.Array
    next_pos: jax.Array

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    @property
    def max_len(self) -> int:
        """Slot-times the cache can hold: the size of its largest (global) ring."""
        return max(layer["pos"].shape[1] for layer in self.layers)


def cache_sizes(cfg: ModelConfig, max_len: int) -> tuple[int, ...]:
    """Ring size S per layer: ``min(window, max_len)``."""
    return tuple(min(window, max_len) for window in cfg.layer_windows)


def init_cache(
    cfg: ModelConfig, batch_size: int, max_len: int | None = None, dtype: str | None = None
) -> KVCache:
    """An empty cache.

    Args:
      cfg: model config.
      batch_size: B, rows decoded together.
      max_len: slot-times the cache holds (longest padded prompt plus new tokens); defaults to
        ``cfg.max_seq_len``, which it may not exceed.
      dtype: storage dtype of keys and values; defaults to ``cfg.dtype``.

    Returns:
      A :class:`KVCache` with every slot empty (``pos`` -1, zero keys and values).

    Raises:
      ValueError: ``batch_size`` < 1 or ``max_len`` outside [1, cfg.max_seq_len].
    """
    max_len = cfg.max_seq_len if max_len is None else max_len
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if not isinstance(max_len, int) or not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(
            f"max_len={max_len!r} must be an integer in [1, cfg.max_seq_len={cfg.max_seq_len}]"
        )
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    b, kv, h = batch_size, cfg.num_kv_heads, cfg.head_dim
    layers = []
    for size in cache_sizes(cfg, max_len):
        layer = {"pos": jnp.full((b, size), -1, jnp.int32)}
        if cfg.attn_kind == "spark":
            r = cfg.attn_predictor_dim
            layer["k_pred"] = jnp.zeros((b, kv, size, r), dtype)
            layer["k_rest"] = jnp.zeros((b, kv, size, h - r), dtype)
        else:
            layer["k"] = jnp.zeros((b, kv, size, h), dtype)
        layer["v"] = jnp.zeros((b, kv, size, h), dtype)
        layers.append(layer)
    return KVCache(
        layers=tuple(layers),
        length=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((b,), jnp.int32),
    )


def write_one(layer: dict[str, jax.Array], new: dict[str, jax.Array], slot: jax.Array) -> dict:
    """Writes one slot-time per row in place (with a donated cache).

    Args:
      layer: one layer's cache entries.
      new: the same keys; arrays [B, K, 1, width] and ``pos`` [B, 1].
      slot: int32 scalar, the ring slot written.

    Returns:
      The updated layer dict.
    """
    out = {}
    for name, cached in layer.items():
        start = (0, slot) if name == "pos" else (0, 0, slot, 0)
        out[name] = jax.lax.dynamic_update_slice(cached, new[name].astype(cached.dtype), start)
    return out


def write_many(layer: dict[str, jax.Array], new: dict[str, jax.Array], start: jax.Array) -> dict:
    """Writes T consecutive slot-times starting at slot-time ``start`` into the ring.

    When T exceeds the ring size S only the last S slot-times are kept, as a ring buffer
    would after writing them one by one.

    Args:
      layer: one layer's cache entries, rings of size S.
      new: the same keys; arrays [B, K, T, width] and ``pos`` [B, T].
      start: int32 scalar slot-time of the first new entry.

    Returns:
      The updated layer dict.
    """
    size = layer["pos"].shape[1]
    t = new["pos"].shape[1]
    keep = min(t, size)
    slots = (start + (t - keep) + jnp.arange(keep, dtype=jnp.int32)) % size
    out = {}
    for name, cached in layer.items():
        values = new[name][..., t - keep :] if name == "pos" else new[name][:, :, t - keep :]
        values = values.astype(cached.dtype)
        if name == "pos":
            out[name] = cached.at[:, slots].set(values, unique_indices=True)
        else:
            out[name] = cached.at[:, :, slots].set(values, unique_indices=True)
    return out
