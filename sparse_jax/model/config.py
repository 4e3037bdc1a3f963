"""Model configuration: one frozen, validated dataclass for the dense and Spark variants.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field
and the allowed range. Per-layer fields (layer types, sparsity switches) default to ``None`` and
are resolved to full tuples at construction, so a config always describes every layer
explicitly. Command-line overrides go through :func:`override`, which parses ``field=value``
strings and applies ``dataclasses.replace`` (and so re-validates).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, ClassVar, Literal

FFNKind = Literal["gated", "spark"]
AttnKind = Literal["dense", "spark"]
LayerType = Literal["local", "global"]

FFN_KINDS = ("gated", "spark")
ATTN_KINDS = ("dense", "spark")
LAYER_TYPES = ("local", "global")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "names")
TOPK_METHODS = ("statistical", "lax_top_k", "approx_max_k")
ATTN_IMPLS = ("auto", "materialized", "blockwise")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ModelConfig.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Gemma-2 style decoder, dense or Spark (sparse FFN and/or attention).

    Attributes:
      name: preset name, informational.
      vocab_size: V, number of token ids.
      model_dim: D, residual width.
      num_layers: L.
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads; must divide ``num_heads``.
      head_dim: H.
      ffn_dim: F. For ``ffn_kind="gated"`` the gated FFN hidden width; for ``"spark"`` the
        Spark FFN width (1.5x the dense width gives parameter parity).
      ffn_kind: ``"gated"`` (Gemma-2 GeGLU) or ``"spark"`` (docs/method.md, section 2).
      attn_kind: ``"dense"`` or ``"spark"`` (docs/method.md, section 3).
      ffn_keep_fraction: fraction of the F neurons kept by statistical top-k, in (0, 1].
      ffn_predictor_dim: R of the Spark FFN, in [1, D); ``None`` means D // 2.
      attn_top_k: keys kept per query by Spark attention, >= 1.
      attn_predictor_dim: R of Spark attention, in [1, H); ``None`` means H // 2.
      layer_types: ``"local"`` (sliding window) or ``"global"`` per layer; ``None`` alternates,
        local first.
      ffn_sparse_layers: per layer, whether the Spark FFN thresholds (``False`` keeps every
        neuron, a dense FFN with the same weights); ``None`` means all ``True``.
      attn_sparse_layers: per layer, whether Spark attention selects keys; ``None`` means all.
      sliding_window: window of local layers, in tokens.
      max_seq_len: longest context the model is configured for (RoPE, caches, prompts).
      rope_base: RoPE wavelength base.
      attn_logit_softcap: soft cap of attention (predictor) logits; ``None`` disables.
      final_logit_softcap: soft cap of output logits; ``None`` disables.
      query_scale: dense attention query scale; ``None`` means 1/sqrt(H).
      predictor_query_scale: Spark predictor score scale; ``None`` means 1/sqrt(R).
      gate_query_scale: Spark softplus-branch scale; ``None`` means 1/sqrt(H - R).
      norm_eps: RMSNorm epsilon.
      param_dtype: dtype parameters are stored in.
      dtype: compute dtype of activations and matmuls.
      scan_layers: stack layers with ``nn.scan`` (params get a leading L axis).
      remat_policy: ``"none"``, ``"full"`` (recompute everything), ``"dots"`` (save matmul
        outputs without batch dims) or ``"names"`` (save q/k/v and FFN pre-activations).
      topk_method: how the threshold is found: ``"statistical"`` (the method) or the
        ``"lax_top_k"`` / ``"approx_max_k"`` baselines, which find the k-th largest value.
      attn_impl: how a block attends without the sparse decode path: ``"materialized"``
        (every score tensor at once), ``"blockwise"`` (:mod:`pallas_kernels.blockwise_attention`,
        O(T x block) memory; ``topk_method="statistical"`` only; training, evaluation and
        prefill chunks of more than one token) or ``"auto"`` (blockwise once the length times
        the keys read reaches ``policy.blockwise_min_len ** 2``, and at any length for a Spark
        sequence attending to itself with the native CPU kernels on one device).
      attn_block_size: query block of the blockwise form, >= 1.
      attn_key_block_size: key block of the blockwise form, >= 1. The defaults, 256 queries
        by 128 keys, ran a ``small``-preset attention gradient on CPU at 2048 tokens in 0.176 s
        (dense) and 0.349 s (Spark), against 0.372 s and 1.249 s at 512 by 512
        (``benchmarks.long_context --block-len 2048``).
    """

    name: str = "custom"
    vocab_size: int = 4096
    model_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 768
    ffn_kind: FFNKind = "spark"
    attn_kind: AttnKind = "spark"
    ffn_keep_fraction: float = 0.08
    ffn_predictor_dim: int | None = None
    attn_top_k: int = 32
    attn_predictor_dim: int | None = None
    layer_types: tuple[LayerType, ...] | None = None
    ffn_sparse_layers: tuple[bool, ...] | None = None
    attn_sparse_layers: tuple[bool, ...] | None = None
    sliding_window: int = 128
    max_seq_len: int = 256
    rope_base: float = 10_000.0
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    query_scale: float | None = None
    predictor_query_scale: float | None = None
    gate_query_scale: float | None = None
    norm_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    topk_method: str = "statistical"
    attn_impl: str = "auto"
    attn_block_size: int = 256
    attn_key_block_size: int = 128

    DERIVED_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "num_layers": ("layer_types", "ffn_sparse_layers", "attn_sparse_layers"),
        "model_dim": ("ffn_predictor_dim",),
        "head_dim": ("attn_predictor_dim",),
    }

    def __post_init__(self) -> None:
        for field in ("vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(field, value, "must be an integer >= 1")
        for field in ("head_dim", "ffn_dim", "sliding_window", "max_seq_len", "attn_top_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(field, value, "must be an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            _fail(
                "num_kv_heads",
                self.num_kv_heads,
                f"must divide num_heads={self.num_heads}",
            )
        if self.ffn_kind not in FFN_KINDS:
            _fail("ffn_kind", self.ffn_kind, f"must be one of {FFN_KINDS}")
        if self.attn_kind not in ATTN_KINDS:
            _fail("attn_kind", self.attn_kind, f"must be one of {ATTN_KINDS}")
        if not 0.0 < self.ffn_keep_fraction <= 1.0:
            _fail("ffn_keep_fraction", self.ffn_keep_fraction, "must be in (0, 1]")
        self._resolve("ffn_predictor_dim", self.model_dim // 2, self.model_dim, "model_dim")
        self._resolve("attn_predictor_dim", self.head_dim // 2, self.head_dim, "head_dim")
        if self.attn_kind == "spark" and self.head_dim < 2:
            _fail("head_dim", self.head_dim, "must be >= 2 for Spark attention")
        if self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be even (RoPE rotates pairs of dimensions)")
        if self.attn_predictor_dim % 2:
            _fail("attn_predictor_dim", self.attn_predictor_dim, "must be even (RoPE pairs)")
        self._resolve_layers()
        for field in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                _fail(field, value, "must be > 0 or None")
        for field in ("query_scale", "predictor_query_scale", "gate_query_scale"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                _fail(field, value, "must be > 0 or None")
        if not self.rope_base > 1:
            _fail("rope_base", self.rope_base, "must be > 1")
        if not 0 < self.norm_eps < 1:
            _fail("norm_eps", self.norm_eps, "must be in (0, 1)")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                _fail(field, getattr(self, field), f"must be one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            _fail("remat_policy", self.remat_policy, f"must be one of {REMAT_POLICIES}")
        if self.topk_method not in TOPK_METHODS:
            _fail("topk_method", self.topk_method, f"must be one of {TOPK_METHODS}")
        if self.attn_impl not in ATTN_IMPLS:
            _fail("attn_impl", self.attn_impl, f"must be one of {ATTN_IMPLS}")
        if self.attn_impl == "blockwise" and self.topk_method != "statistical":
            _fail("attn_impl", self.attn_impl, "blockwise needs topk_method='statistical'")
        for field in ("attn_block_size", "attn_key_block_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(field, value, "must be an integer >= 1")
        if self.ffn_kind == "spark" and self.ffn_keep_count < 1:
            _fail("ffn_keep_fraction", self.ffn_keep_fraction, "keeps no neuron at this ffn_dim")

    def _resolve(self, field: str, default: int, limit: int, limit_name: str) -> None:
        value = getattr(self, field)
        if value is None:
            value = default
            object.__setattr__(self, field, value)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < limit:
            _fail(field, value, f"must be an integer in [1, {limit_name}={limit})")

    def _resolve_layers(self) -> None:
        n = self.num_layers
        if self.layer_types is None:
            object.__setattr__(
                self, "layer_types", tuple("local" if i % 2 == 0 else "global" for i in range(n))
            )
        for field, default in (
            ("ffn_sparse_layers", True),
            ("attn_sparse_layers", True),
        ):
            if getattr(self, field) is None:
                object.__setattr__(self, field, (default,) * n)
        for field in ("layer_types", "ffn_sparse_layers", "attn_sparse_layers"):
            value = tuple(getattr(self, field))
            object.__setattr__(self, field, value)
            if len(value) != n:
                _fail(field, value, f"must have one entry per layer (num_layers={n})")
        if any(t not in LAYER_TYPES for t in self.layer_types):
            _fail("layer_types", self.layer_types, f"entries must be one of {LAYER_TYPES}")
        for field in ("ffn_sparse_layers", "attn_sparse_layers"):
            if any(not isinstance(v, bool) for v in getattr(self, field)):
                _fail(field, getattr(self, field), "entries must be True or False")

    # Derived quantities -------------------------------------------------------------------

    @property
    def group_size(self) -> int:
        """G, query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def ffn_keep_count(self) -> int:
        """k of the Spark FFN: neurons kept per token."""
        return max(1, round(self.ffn_keep_fraction * self.ffn_dim))

    @property
    def resolved_query_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    @property
    def resolved_predictor_query_scale(self) -> float:
        if self.predictor_query_scale is not None:
            return self.predictor_query_scale
        return self.attn_predictor_dim**-0.5

    @property
    def resolved_gate_query_scale(self) -> float:
        if self.gate_query_scale is not None:
            return self.gate_query_scale
        return (self.head_dim - self.attn_predictor_dim) ** -0.5

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per-layer attention window in tokens; global layers get ``max_seq_len``."""
        return tuple(
            self.sliding_window if t == "local" else max(self.max_seq_len, self.sliding_window)
            for t in self.layer_types
        )

    @property
    def is_spark(self) -> bool:
        return self.ffn_kind == "spark" or self.attn_kind == "spark"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists) that :meth:`from_dict` inverts."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"ModelConfig has no field(s) {unknown}; known fields: {sorted(known)}"
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


def as_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int if it is an integer-like (``int``, ``numpy`` integer) >= minimum.

    Raises:
      ValueError: a bool, a float, a non-integer or a value below ``minimum``, naming ``name``.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    count = operator.index(value)
    if count < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return count


def check_context(
    context: int, prompt_len: int, new_tokens: int, new_name: str = "max_new_tokens"
) -> None:
    """The one rule for what fits: a prompt of P tokens and N new tokens need P + N - 1 slots.

    The last generated token is returned without being fed back, so it takes no cache slot: a
    prompt of ``context`` tokens can still produce one token.

    Args:
      context: the model's context length (``ModelConfig.max_seq_len``).
      prompt_len: tokens in the (longest) prompt, >= 1.
      new_tokens: tokens to generate, >= 1.
      new_name: the caller's name for ``new_tokens``, used in the message.

    Raises:
      ValueError: naming both lengths and the context.
    """
    if prompt_len > context:
        raise ValueError(
            f"the prompt has {prompt_len} tokens: it exceeds the model's context of "
            f"{context} tokens (max_seq_len)"
        )
    if prompt_len + new_tokens - 1 > context:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus {new_name}={new_tokens} needs "
            f"{prompt_len + new_tokens - 1} positions: it exceeds the model's context of "
            f"{context} tokens (max_seq_len)"
        )


def parse_value(text: str, current: Any, field: str) -> Any:
    """Parses a command-line string into the type of ``current`` for ``field``."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if isinstance(current, bool):
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"{field}={text!r}: expected true or false")
    if isinstance(current, tuple):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if current and isinstance(current[0], bool):
            return tuple(parse_value(s, True, field) for s in items)
        return tuple(items)
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError as err:
        raise ValueError(f"{field}={text!r}: expected a {type(current).__name__}") from err
    if current is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def override(cfg: Any, assignments: list[str] | tuple[str, ...]) -> Any:
    """Applies ``field=value`` strings to a frozen dataclass with ``dataclasses.replace``.

    A dotted name (``data.seq_len=64``) sets a field of a nested dataclass.
    """
    known = {f.name for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    nested: dict[str, list[str]] = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field=value")
        field, text = item.split("=", 1)
        field = field.strip()
        head, dot, rest = field.partition(".")
        if head not in known:
            raise ValueError(
                f"{type(cfg).__name__} has no field {head!r}; known fields: {sorted(known)}"
            )
        if dot:
            if not dataclasses.is_dataclass(getattr(cfg, head)):
                raise ValueError(f"{type(cfg).__name__}.{head} has no fields: write {head}=...")
            nested.setdefault(head, []).append(f"{rest}={text}")
        elif dataclasses.is_dataclass(getattr(cfg, head)):
            inner = sorted(f.name for f in dataclasses.fields(getattr(cfg, head)))
            raise ValueError(
                f"{type(cfg).__name__}.{head} is a group of fields: set them one at a time as "
                f"{head}.FIELD=VALUE, FIELD one of {inner}"
            )
        else:
            changes[field] = parse_value(text, getattr(cfg, field), field)
    for head, items in nested.items():
        changes[head] = override(getattr(cfg, head), items)
    # Fields derived from a changed one (per-layer tuples from num_layers, predictor widths
    # from model_dim and head_dim) are re-derived unless given too.
    for base, derived in getattr(cfg, "DERIVED_FIELDS", {}).items():
        if base in changes:
            for field in derived:
                changes.setdefault(field, None)
    return dataclasses.replace(cfg, **changes)
