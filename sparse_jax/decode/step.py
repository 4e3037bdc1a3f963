"""Cached decoding: chunked prefill and a jitted one-token decode step, sparse or masked.

Both are pure functions of (cfg, decode-layout params, :class:`~sparse_jax.decode.cache.KVCache`,
tokens) returning ``(logits, cache, stats)``; the cache is donated, so it is updated in place.
``DecodeOptions.path`` picks how Spark layers run: ``"sparse"`` gathers only the selected FFN
neurons and attention keys, ``"masked"`` computes densely with the masks (as training does),
and ``"auto"`` takes, per layer, whichever is expected to read fewer byte-equivalents. Prefill
always takes the masked path, in chunks of ``prefill_chunk`` tokens. Stats are per layer:
``attn_keys`` and ``ffn_active`` (mean kept keys per query head, mean active neurons per
token) and ``attn_overflow`` / ``ffn_overflow`` (1 where a sparse selection overflowed its
capacity and the layer fell back to the masked computation for this step).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.decode.attention import (
    attend_masked,
    attend_sparse,
    attention_capacity,
    sparse_attention_pays,
)
from sparse_jax.decode.cache import KVCache, split_keys, write_many, write_one
from sparse_jax.decode.ffn import (
    ffn_capacities,
    ffn_mode,
    gated_ffn,
    spark_ffn_masked,
    spark_ffn_sparse,
)
from sparse_jax.decode.layout import DecodeParams, linear
from sparse_jax.kernels import Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.layers import softcap, split_rope

PATHS = ("sparse", "masked", "auto")
BATCH_MODES = ("auto", "per_token", "union")
Stats = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How decoding runs (hashable: a static argument of the jitted steps).

    Attributes:
      path: "sparse", "masked" or "auto" (see the module docstring).
      capacity_slack: gathered slots per selection are k plus this many ``sqrt(k log d)``
        (see :func:`sparse_jax.decode.gather.capacity`); >= 0.
      batch_mode: for batches, "per_token" FFN gathers, one gather of the "union" of the
        batch's active sets, or "auto" (the cheaper by the cost model).
      prefill_chunk: tokens per prefill chunk, >= 1.
      ffn_capacity: if set, the gathered neurons per selection (per token or union) instead of
        the slack rule; >= 1.
      attn_capacity: if set, the gathered keys per query head instead of the slack rule; >= 1.
      implementation: the gathered FFN and attention of the sparse path run through
        :class:`sparse_jax.kernels.Kernels` with this implementation ("auto": Pallas on TPU
        and GPU, XLA elsewhere; "xla"; "pallas_tpu"; "pallas_gpu"). The union FFN gather for
        batches is always XLA (one gather shared by the batch).
      interpret: run an explicit Pallas implementation in Pallas interpret mode.
    """

    path: str = "auto"
    capacity_slack: float = 2.0
    batch_mode: str = "auto"
    prefill_chunk: int = 256
    ffn_capacity: int | None = None
    attn_capacity: int | None = None
    implementation: str = "auto"
    interpret: bool = False

    def __post_init__(self) -> None:
        # Validates implementation and interpret (ValueError on a bad pair).
        Kernels(self.implementation, self.interpret)
        if self.path not in PATHS:
            raise ValueError(f"DecodeOptions.path={self.path!r} must be one of {PATHS}")
        if not self.capacity_slack >= 0:
            raise ValueError(f"DecodeOptions.capacity_slack={self.capacity_slack!r} must be >= 0")
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(
                f"DecodeOptions.batch_mode={self.batch_mode!r} must be one of {BATCH_MODES}"
            )
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise ValueError(
                f"DecodeOptions.prefill_chunk={self.prefill_chunk!r} must be an integer >= 1"
            )
        for field in ("ffn_capacity", "attn_capacity"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"DecodeOptions.{field}={value!r} must be an integer >= 1")

    @property
    def kernels(self) -> Kernels:
        """The kernel seam of the sparse path."""
        return Kernels(self.implementation, self.interpret)

    def ffn_caps(self, cfg: ModelConfig, batch_size: int) -> tuple[int, int]:
        """(per-token, union) FFN capacities at this batch size."""
        if self.ffn_capacity is not None:
            cap = min(self.ffn_capacity, cfg.ffn_dim)
            return cap, cap
        return ffn_capacities(cfg, batch_size, self.capacity_slack)

    def attn_cap(self, cfg: ModelConfig, cache_size: int) -> int:
        """Gathered keys per query head for a ring of ``cache_size`` slots."""
        if self.attn_capacity is not None:
            return min(self.attn_capacity, cache_size)
        return attention_capacity(cfg, cache_size, self.capacity_slack)


DEFAULT_OPTIONS = DecodeOptions()


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm in float32, as :class:`sparse_jax.model.layers.RMSNorm`."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return normed * (1.0 + scale.astype(jnp.float32))


def _project(cfg: ModelConfig, p: dict, h: jax.Array, pos: jax.Array):
    """h [B, T, D] -> rotated q [B, T, N, H], new cache entries (keys, v, pos)."""
    b, t, d = h.shape
    n, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    qkv = linear(h.reshape(b * t, d), p["wqkv"]).astype(dtype)
    q, k, v = jnp.split(qkv, [n * hd, (n + kv) * hd], axis=-1)
    split = cfg.attn_predictor_dim if cfg.attn_kind == "spark" else None
    q = split_rope(q.reshape(b, t, n, hd), pos, cfg.rope_base, split)
    k = split_rope(k.reshape(b, t, kv, hd), pos, cfg.rope_base, split)
    real = (pos >= 0)[:, :, None, None]
    new = split_keys(cfg, jnp.where(real, k, 0))
    new["v"] = jnp.swapaxes(jnp.where(real, v.reshape(b, t, kv, hd), 0), 1, 2)
    new["pos"] = pos
    return q, new


def _ffn(cfg, opts, p, i, x, decoding):
    """Normed FFN input x [M, D] -> (y [M, D], active [M], overflow)."""
    zero = jnp.zeros((), jnp.int32)
    if cfg.ffn_kind != "spark":
        return gated_ffn(p, x), jnp.full(x.shape[:1], cfg.ffn_dim, jnp.float32), zero
    enabled = cfg.ffn_sparse_layers[i]
    path = opts.path if (decoding and enabled) else "masked"
    caps = opts.ffn_caps(cfg, x.shape[0])
    mode = ffn_mode(cfg, x.shape[0], path, caps, opts.batch_mode)
    if mode == "masked":
        y, active = spark_ffn_masked(cfg, p, x, enabled)
        return y, active, zero
    cap = caps[0] if mode == "per_token" else caps[1]
    return spark_ffn_sparse(cfg, p, x, mode, cap, opts.kernels)


def _attend(cfg, opts, i, q, layer, pos, decoding, new=None):
    window = cfg.layer_windows[i]
    enabled = cfg.attn_sparse_layers[i]
    cap = opts.attn_cap(cfg, layer["pos"].shape[1])
    sparse = (
        decoding
        and cfg.attn_kind == "spark"
        and enabled
        and (
            opts.path == "sparse"
            or (opts.path == "auto" and sparse_attention_pays(cfg, layer["pos"].shape[1], cap))
        )
    )
    if sparse:
        return attend_sparse(cfg, q, layer, pos, window, cap, new, opts.kernels)
    out, kept = attend_masked(cfg, q, layer, pos, window, enabled, new)
    return out, kept, jnp.zeros((), jnp.int32)


def _block(cfg, opts, p, i, layer, x, pos, start, decoding):
    """One layer over x [B, T, D] at positions pos [B, T] (-1 padding), writing the cache."""
    b, t, d = x.shape
    eps = cfg.norm_eps
    q, new = _project(cfg, p, rms_norm(x, p["pre_attn_norm"], eps), pos)
    if decoding:
        # The cache is only read here; decode_step_jit writes the new entries afterwards.
        out, kept, attn_over = _attend(cfg, opts, i, q, layer, pos, True, new)
        layer = new
    else:
        # Chunk queries attend to the cache before the chunk plus the chunk itself; the chunk
        # is written afterwards, as it may evict keys its own first queries still see.
        joined = {
            name: jnp.concatenate([layer[name], new[name]], axis=-2 if name != "pos" else 1)
            for name in layer
        }
        out, kept, attn_over = _attend(cfg, opts, i, q, joined, pos, False)
        layer = write_many(layer, new, start)
    attn = linear(out.reshape(b * t, -1), p["wo"]).reshape(b, t, d)
    x = x + rms_norm(attn, p["post_attn_norm"], eps).astype(x.dtype)
    h = rms_norm(x, p["pre_ffn_norm"], eps).reshape(b * t, d)
    y, active, ffn_over = _ffn(cfg, opts, p, i, h, decoding)
    x = x + rms_norm(y.reshape(b, t, d), p["post_ffn_norm"], eps).astype(x.dtype)
    real = (pos >= 0).astype(jnp.float32)
    stats = {
        "attn_keys": jnp.sum(kept * real[:, None]) / (jnp.sum(real) * cfg.num_heads),
        "ffn_active": jnp.sum(active * real.reshape(-1)) / jnp.sum(real),
        "attn_overflow": attn_over,
        "ffn_overflow": ffn_over,
    }
    return x, layer, stats


def _forward(cfg, opts, params, cache, tokens, pos, decoding):
    """Embeds tokens [B, T] and runs every layer.

    Returns last-position logits [B, V], per-layer cache entries (the updated layers when
    prefilling, the new token's entries when decoding) and per-layer stats.
    """
    dtype = jnp.dtype(cfg.dtype)
    rows = jnp.take(params["lookup"], tokens, axis=0)
    x = rows.astype(dtype) * jnp.asarray(cfg.model_dim**0.5, dtype)
    layers, per_layer = [], []
    for i, (p, layer) in enumerate(zip(params["blocks"], cache.layers, strict=True)):
        with jax.named_scope(f"layer_{i}"):
            x, layer, stats = _block(cfg, opts, p, i, layer, x, pos, cache.length, decoding)
        layers.append(layer)
        per_layer.append(stats)
    last = rms_norm(x[:, -1], params["final_norm"], cfg.norm_eps)
    logits = softcap(linear(last, params["embedding"]), cfg.final_logit_softcap)
    stats = {name: jnp.stack([s[name] for s in per_layer]) for name in per_layer[0]}
    return logits, tuple(layers), stats


@functools.partial(jax.jit, static_argnames=("cfg", "opts"), donate_argnames=("cache",))
def _prefill_chunk(cfg, opts, params, cache, tokens, pos):
    logits, layers, stats = _forward(cfg, opts, params, cache, tokens, pos, decoding=False)
    real = jnp.sum(pos >= 0, axis=1, dtype=jnp.int32)
    length = cache.length + tokens.shape[1]
    return logits, KVCache(layers=layers, length=length, next_pos=cache.next_pos + real), stats


@functools.partial(jax.jit, static_argnames=("cfg", "opts"))
def _decode_compute(cfg, opts, params, cache, tokens):
    return _forward(cfg, opts, params, cache, tokens[:, None], cache.next_pos[:, None], True)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _decode_write(cache: KVCache, new: tuple[dict[str, jax.Array], ...]) -> KVCache:
    layers = tuple(
        write_one(layer, entries, cache.length % layer["pos"].shape[1])
        for layer, entries in zip(cache.layers, new, strict=True)
    )
    return KVCache(layers=layers, length=cache.length + 1, next_pos=cache.next_pos + 1)


def decode_step_jit(
    cfg: ModelConfig, opts: DecodeOptions, params: DecodeParams, cache: KVCache, tokens: jax.Array
) -> tuple[jax.Array, KVCache, Stats]:
    """Unchecked decode step (see :func:`decode_step`); the cache is donated.

    Two jitted programs: one reads the cache and computes the logits and this token's cache
    entries, one writes those entries in place. In a single program XLA's CPU backend copied
    the whole cache of every layer it both read (through a dot) and updated.
    """
    logits, new, stats = _decode_compute(cfg, opts, params, cache, tokens)
    return logits, _decode_write(cache, new), stats


def check_decode_params(cfg: ModelConfig, params: DecodeParams) -> None:
    """Raises ValueError unless ``params`` is a decode-layout tree for ``cfg``."""
    if "blocks" not in params or "embedding" not in params or "lookup" not in params:
        raise ValueError(
            "params are not in the decode layout: convert model parameters once with "
            "sparse_jax.decode.layout.to_decode_params(cfg, params)"
        )
    if len(params["blocks"]) != cfg.num_layers:
        raise ValueError(f"params have {len(params['blocks'])} blocks, cfg {cfg.num_layers}")
    if params["embedding"].shape != (cfg.vocab_size, cfg.model_dim):
        raise ValueError(
            f"embedding shape {params['embedding'].shape} does not match "
            f"(vocab_size, model_dim)=({cfg.vocab_size}, {cfg.model_dim})"
        )


def check_tokens(cfg: ModelConfig, tokens: np.ndarray) -> None:
    """Raises ValueError for token ids outside [0, vocab_size) or a non-integer array."""
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)].ravel()[0]
        raise ValueError(f"token id {bad} is out of range [0, vocab_size={cfg.vocab_size})")


def prefill(
    cfg: ModelConfig,
    params: DecodeParams,
    cache: KVCache,
    tokens: jax.Array | np.ndarray,
    lengths: jax.Array | np.ndarray | None = None,
    options: DecodeOptions = DEFAULT_OPTIONS,
) -> tuple[jax.Array, KVCache, Stats]:
    """Runs prompts through the model in chunks, filling the cache (donated).

    Args:
      cfg: model config.
      params: decode-layout parameters.
      cache: a cache from :func:`sparse_jax.decode.cache.init_cache`; donated.
      tokens: int [B, T] prompts, left-padded: row b's prompt is ``tokens[b, T - lengths[b]:]``.
      lengths: int [B] prompt lengths in [1, T]; None means all T. Rows may differ only on
        an empty cache (padding must occupy the oldest slots).
      options: decode options (prefill uses the masked path and ``options.prefill_chunk``).

    Returns:
      logits [B, V] float32 at each row's last prompt token, the cache, and per-layer stats of
      the last chunk.

    Raises:
      ValueError: bad shapes, token ids out of range, lengths out of range or ragged on a
        non-empty cache, or a prompt that does not fit the cache or the model's context.
    """
    check_decode_params(cfg, params)
    tokens_np = np.asarray(tokens)
    if tokens_np.ndim != 2 or tokens_np.shape[0] != cache.batch_size or tokens_np.shape[1] < 1:
        raise ValueError(f"tokens must be [B={cache.batch_size}, T>=1], got {tokens_np.shape}")
    check_tokens(cfg, tokens_np)
    b, t = tokens_np.shape
    lengths_np = np.full((b,), t) if lengths is None else np.asarray(lengths).reshape(-1)
    if lengths_np.shape != (b,) or lengths_np.min() < 1 or lengths_np.max() > t:
        raise ValueError(f"lengths must be [B={b}] with entries in [1, T={t}], got {lengths_np}")
    used = int(cache.length)
    next_pos = np.asarray(cache.next_pos)
    if used and (lengths_np != t).any():
        raise ValueError("rows of different lengths can only be prefilled into an empty cache")
    if used + t > cache.max_len:
        raise ValueError(
            f"prompt of {t} tokens does not fit: the cache holds {used} of {cache.max_len} slots"
        )
    if (next_pos + lengths_np).max() > cfg.max_seq_len:
        raise ValueError(
            f"prompt ends at position {(next_pos + lengths_np).max()}, beyond the context "
            f"(cfg.max_seq_len={cfg.max_seq_len})"
        )
    cols = np.arange(t)[None, :] - (t - lengths_np)[:, None]
    pos = np.where(cols >= 0, next_pos[:, None] + cols, -1).astype(np.int32)
    chunk = options.prefill_chunk
    # Prefill reads no other option: one canonical value shares its compilations.
    options = DecodeOptions(prefill_chunk=chunk)
    # The first chunk takes the remainder so that every later chunk is full: two compiled
    # shapes at most, and no padding after real tokens.
    bounds = [0, *range(t % chunk or chunk, t + 1, chunk)]
    logits = stats = None
    for lo, hi in itertools.pairwise(bounds):
        chunk_tokens, chunk_pos = jnp.asarray(tokens_np[:, lo:hi]), jnp.asarray(pos[:, lo:hi])
        logits, cache, stats = _prefill_chunk(cfg, options, params, cache, chunk_tokens, chunk_pos)
    return logits, cache, stats


def decode_step(
    cfg: ModelConfig,
    params: DecodeParams,
    cache: KVCache,
    tokens: jax.Array | np.ndarray,
    options: DecodeOptions = DEFAULT_OPTIONS,
) -> tuple[jax.Array, KVCache, Stats]:
    """Feeds one token per row and returns the next-token logits; the cache is donated.

    Args:
      cfg: model config.
      params: decode-layout parameters.
      cache: the cache after prefill (or earlier steps); donated.
      tokens: int [B], each row's newest token.
      options: decode options.

    Returns:
      logits [B, V] float32, the updated cache, and per-layer stats (see module docstring).

    Raises:
      ValueError: wrong shape or token ids out of range, or a full cache or context.
    """
    tokens_np = np.asarray(tokens)
    if tokens_np.shape != (cache.batch_size,):
        raise ValueError(f"tokens must be [B={cache.batch_size}], got {tokens_np.shape}")
    check_tokens(cfg, tokens_np)
    if int(cache.length) >= cache.max_len:
        raise ValueError(f"the cache is full ({cache.max_len} slots); allocate a larger max_len")
    if int(np.max(cache.next_pos)) >= cfg.max_seq_len:
        raise ValueError(f"a row reached the context length cfg.max_seq_len={cfg.max_seq_len}")
    return decode_step_jit(cfg, options, params, cache, jnp.asarray(tokens_np, jnp.int32))
