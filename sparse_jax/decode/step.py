"""Cached decoding: chunked prefill and a jitted one-token decode step, sparse or masked.

Both run the model's own blocks (:meth:`sparse_jax.model.transformer.Transformer.extend`) over
a :class:`~sparse_jax.decode.cache.KVCache` and return ``(logits, cache, stats)``; the cache
is donated, so it is updated in place. Parameters are the model's, with the layers unstacked
(:func:`decode_params`; scanned parameters are split once). ``DecodeOptions.path`` picks how
Spark layers run: ``"sparse"`` gathers only the selected FFN neurons and attention keys,
``"masked"`` computes densely with the masks (as training does), and ``"auto"`` takes, per
layer, whichever is expected to read fewer byte-equivalents (:func:`layer_choices`, from the
backend policy's cost constants, :mod:`sparse_jax.policy`); with the native CPU kernels a
one-token step's attention is one fused kernel (no capacity, so it never overflows). Prefill
takes the masked forms in chunks of ``prefill_chunk`` tokens, except that with the native
kernels a sparse Spark FFN layer computes only its active token-neuron pairs
(:func:`prefill_choices`; not with ``path="masked"``). Stats are per layer: ``attn_keys`` and
``ffn_active`` (mean kept keys per query head, mean active neurons per token) and
``attn_overflow`` / ``ffn_overflow`` (1 where a sparse selection overflowed its capacity and
the layer fell back to the masked computation for this step).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.decode.cache import KVCache, write_many, write_one
from sparse_jax.kernels import Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.selection import capacity, union_capacity
from sparse_jax.model.transformer import MASKED, DecodeChoice, Transformer, unstack_layers
from sparse_jax.policy import policy_for

DecodeParams = dict[str, Any]
PATHS = ("sparse", "masked", "auto")
BATCH_MODES = ("auto", "per_token", "union")
Stats = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How decoding runs (hashable: a static argument of the jitted steps).

    Attributes:
      path: "sparse", "masked" or "auto" (see the module docstring).
      capacity_slack: gathered slots per selection are k plus this many ``sqrt(k log d)``
        (see :func:`sparse_jax.model.selection.capacity`); >= 0.
      batch_mode: for batches, "per_token" FFN gathers, one gather of the "union" of the
        batch's active sets, or "auto" (the cheaper by the cost model).
      prefill_chunk: tokens per prefill chunk, >= 1.
      ffn_capacity: if set, the gathered neurons per selection (per token or union) instead of
        the slack rule; >= 1.
      attn_capacity: if set, the gathered keys per query head instead of the slack rule; >= 1.
      implementation: the sparse ops and weight products of prefill and decoding
        (statistical top-k of the masked path, the gathered FFN and attention of the sparse
        path) run through :class:`sparse_jax.kernels.Kernels` with this implementation
        ("auto": Pallas on TPU and GPU, the native kernels on CPU when built, else XLA;
        "xla"; "native"; "pallas_tpu"; "pallas_gpu"). The union FFN gather for batches is
        always XLA, and so is the sparse path's threshold except in the native fused decode
        attention.
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
        """The kernel seam of prefill and decoding."""
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


def attention_capacity(cfg: ModelConfig, cache_size: int, slack: float) -> int:
    """Gathered keys per query head for a cache of ``cache_size`` slots."""
    return capacity(cfg.attn_top_k, cache_size, slack)


def sparse_attention_pays(
    cfg: ModelConfig, cache_size: int, cap: int, native: bool = False
) -> bool:
    """Whether the sparse path reads fewer byte-equivalents than the masked one at this size.

    Per kv head the masked path streams ``S * 2H`` values; the sparse path streams ``S * R``
    predictor values and gathers ``G * C * (2H - R)``, each gathered value costing the
    backend policy's ``gather_cost`` streamed ones (``native_gather_cost`` when ``native``
    kernels gather; :mod:`sparse_jax.policy`).
    """
    h, r, g = cfg.head_dim, cfg.attn_predictor_dim, cfg.group_size
    sparse = cache_size * r + policy_for().row_gather_cost(native) * g * cap * (2 * h - r)
    return sparse < cache_size * 2 * h


def ffn_capacities(cfg: ModelConfig, batch_size: int, slack: float) -> tuple[int, int]:
    """(per-token, union) capacities of a Spark FFN selection at this batch size."""
    k, f = cfg.ffn_keep_count, cfg.ffn_dim
    return capacity(k, f, slack), union_capacity(k, f, batch_size, slack)


def ffn_mode(
    cfg: ModelConfig,
    batch_size: int,
    path: str,
    caps: tuple[int, int],
    batch_mode: str,
    native: bool = False,
) -> str:
    """How a sparse Spark FFN layer runs at this batch size: masked, per-token, union or block.

    Compares gathered row-equivalents: per token ``B * C * gather_cost`` (with the native
    kernel, ``native_gather_cost``), union ``C_union * union_gather_cost`` (the backend
    policy's constants, :mod:`sparse_jax.policy`), masked ``F`` (every row streamed once).
    With the native kernels and ``batch_mode="auto"``, a gathered choice becomes "block": the
    native block kernel computes each token's active pairs with each active neuron's rows read
    once for the batch, and has no capacity to overflow (2B shapes, float32,
    ``benchmarks/prefill_parts``: 1.66 ms against 1.96 ms per token at batch 1, 7.86 ms
    against 8.44 ms at batch 8).

    Args:
      cfg: model config.
      batch_size: B.
      path: "sparse" (never masked), "masked" or "auto".
      caps: (per-token, union) capacities.
      batch_mode: "auto", "per_token" or "union" (forces the sparse variant).
      native: the per-token product runs the native CPU kernel.

    Returns:
      "masked", "per_token", "union" or "block".
    """
    if path == "masked" or cfg.ffn_keep_count >= cfg.ffn_dim:
        return "masked"
    policy = policy_for()
    costs = {
        "per_token": batch_size * caps[0] * policy.row_gather_cost(native),
        "union": caps[1] * policy.union_gather_cost,
    }
    if batch_size == 1:
        costs.pop("union")
    if batch_mode != "auto":
        costs = {batch_mode: costs.get(batch_mode, 0.0)}
    if path == "auto":
        costs["masked"] = float(cfg.ffn_dim)
    mode = min(costs, key=costs.__getitem__)
    return "block" if native and batch_mode == "auto" and mode != "masked" else mode


def layer_choices(
    cfg: ModelConfig, opts: DecodeOptions, batch_size: int, cache_sizes: tuple[int, ...]
) -> tuple[DecodeChoice, ...]:
    """Per-layer choices of one decode step (static; prefill's are :func:`prefill_choices`).

    Args:
      cfg: model config.
      opts: decode options.
      batch_size: B.
      cache_sizes: ring size S of each layer's cache.
    """
    choices = []
    caps = opts.ffn_caps(cfg, batch_size)
    native = opts.kernels.native()
    for i, size in enumerate(cache_sizes):
        attn_cap = None
        if cfg.attn_kind == "spark" and cfg.attn_sparse_layers[i] and opts.path != "masked":
            cap = opts.attn_cap(cfg, size)
            if opts.path == "sparse" or sparse_attention_pays(cfg, size, cap, native):
                attn_cap = cap
        mode, ffn_cap = "masked", 0
        if cfg.ffn_kind == "spark" and cfg.ffn_sparse_layers[i]:
            mode = ffn_mode(cfg, batch_size, opts.path, caps, opts.batch_mode, native)
            ffn_cap = caps[0] if mode == "per_token" else caps[1] if mode == "union" else 0
        choices.append(DecodeChoice(attn_capacity=attn_cap, ffn_mode=mode, ffn_capacity=ffn_cap))
    return tuple(choices)


def decode_params(cfg: ModelConfig, params: DecodeParams, dtype: str | None = None) -> DecodeParams:
    """The model's parameters as the cached steps take them: layers unstacked, optionally cast.

    Scanned parameters (``layers`` with a leading L axis) are split into ``layers_i`` once;
    the weights keep their layout (there is one). Unstacked parameters pass through.

    Args:
      cfg: the model config the parameters belong to.
      params: the ``params`` collection of :class:`~sparse_jax.model.transformer.Transformer`.
      dtype: if set, every weight is cast to it (for example "bfloat16" for serving).

    Raises:
      ValueError: the tree does not match ``cfg``.
    """
    if "layers" in params:
        params = unstack_layers(params, cfg.num_layers)
    check_decode_params(cfg, params)
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return params


def check_decode_params(cfg: ModelConfig, params: DecodeParams) -> None:
    """Raises ValueError unless ``params`` are this model's, layers unstacked."""
    missing = [f"layers_{i}" for i in range(cfg.num_layers) if f"layers_{i}" not in params]
    if "embedder" not in params or missing:
        raise ValueError(
            "params are not the model's with unstacked layers (missing "
            f"{'embedder' if 'embedder' not in params else missing[0]}): pass them through "
            "sparse_jax.decode.decode_params(cfg, params) once"
        )
    if f"layers_{cfg.num_layers}" in params:
        raise ValueError(f"params have more than cfg.num_layers={cfg.num_layers} layers")
    table = params["embedder"]["embedding"]
    if table.shape != (cfg.vocab_size, cfg.model_dim):
        raise ValueError(
            f"embedding shape {table.shape} does not match "
            f"(vocab_size, model_dim)=({cfg.vocab_size}, {cfg.model_dim})"
        )
    ffn = params["layers_0"].get("ffn", {})
    expected = "k1" if cfg.ffn_kind == "spark" else "w_gate"
    if expected not in ffn:
        raise ValueError(f"params have FFN weights {sorted(ffn)}, not a {cfg.ffn_kind} FFN")


def _extend(cfg, kernels, params, lookup, cache, tokens, pos, choices):
    model = Transformer(cfg, kernels=kernels, unrolled=True)
    return model.apply(
        {"params": params}, tokens, pos, cache.layers, choices, lookup, method=Transformer.extend
    )


def prefill_choices(cfg: ModelConfig, opts: DecodeOptions) -> tuple[DecodeChoice, ...]:
    """Per-layer choices of a prefill chunk: the masked forms, except that with the native
    kernels (and a path other than "masked") a sparse Spark FFN layer runs its block form
    (only the active token-neuron pairs; :mod:`sparse_jax.model.ffn`)."""
    block = (
        cfg.ffn_kind == "spark"
        and opts.path != "masked"
        and cfg.ffn_keep_count < cfg.ffn_dim
        and opts.kernels.native()
    )
    return tuple(
        DecodeChoice(ffn_mode="block") if block and on else MASKED for on in cfg.ffn_sparse_layers
    )


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "last"), donate_argnames=("cache",))
def _prefill_chunk(cfg, opts, params, lookup, cache, tokens, pos, last=True):
    """One chunk into the cache; the logits only for the ``last`` chunk (an earlier chunk's
    program returns None, so XLA drops the final norm and the unembedding from it)."""
    choices = prefill_choices(cfg, opts)
    logits, new, stats = _extend(cfg, opts.kernels, params, lookup, cache, tokens, pos, choices)
    layers = tuple(
        write_many(layer, entries, cache.length)
        for layer, entries in zip(cache.layers, new, strict=True)
    )
    real = jnp.sum(pos >= 0, axis=1, dtype=jnp.int32)
    length = cache.length + tokens.shape[1]
    cache = KVCache(layers=layers, length=length, next_pos=cache.next_pos + real)
    return (logits if last else None), cache, stats


@functools.partial(jax.jit, static_argnames=("cfg", "opts"))
def _decode_compute(cfg, opts, params, lookup, cache, tokens):
    sizes = tuple(layer["pos"].shape[1] for layer in cache.layers)
    choices = layer_choices(cfg, opts, tokens.shape[0], sizes)
    return _extend(
        cfg, opts.kernels, params, lookup, cache, tokens[:, None], cache.next_pos[:, None], choices
    )


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
    lookup = params["embedder"]["embedding"]
    logits, new, stats = _decode_compute(cfg, opts, params, lookup, cache, tokens)
    return logits, _decode_write(cache, new), stats


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
      params: the model's parameters, layers unstacked (:func:`decode_params`).
      cache: a cache from :func:`sparse_jax.decode.cache.init_cache`; donated.
      tokens: int [B, T] prompts, left-padded: row b's prompt is ``tokens[b, T - lengths[b]:]``.
      lengths: int [B] prompt lengths in [1, T]; None means all T. Rows may differ only on
        an empty cache (padding must occupy the oldest slots).
      options: decode options (prefill uses the masked forms, the native block FFN where
        :func:`prefill_choices` says, and ``options.prefill_chunk``).

    Returns:
      logits [B, V] float32 at each row's last prompt token, the cache, and per-layer stats of
      the last chunk.

    Raises:
      ValueError: bad shapes, token ids out of range, lengths out of range or ragged on a
        non-empty cache, or a prompt that does not fit the cache or the model's context.
    """
    check_decode_params(cfg, params)
    lookup = params["embedder"]["embedding"]
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
    # Prefill reads no other option (of the path, only whether it is "masked"): one canonical
    # value shares its compilations.
    options = DecodeOptions(
        path="masked" if options.path == "masked" else "auto",
        prefill_chunk=chunk,
        implementation=options.implementation,
        interpret=options.interpret,
    )
    # The first chunk takes the remainder so that every later chunk is full: two shapes at
    # most, and no padding after real tokens. Only the last chunk's program computes logits.
    bounds = [0, *range(t % chunk or chunk, t + 1, chunk)]
    logits = stats = None
    for lo, hi in itertools.pairwise(bounds):
        chunk_tokens, chunk_pos = jnp.asarray(tokens_np[:, lo:hi]), jnp.asarray(pos[:, lo:hi])
        logits, cache, stats = _prefill_chunk(
            cfg, options, params, lookup, cache, chunk_tokens, chunk_pos, last=hi == t
        )
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
      params: the model's parameters, layers unstacked (:func:`decode_params`).
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
