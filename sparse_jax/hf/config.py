"""Gemma-2's Hugging Face ``config.json`` and :class:`ModelConfig`, field by field.

:func:`config_from_hf` reads a ``Gemma2ForCausalLM`` config (as transformers 4 or 5 writes it)
into a dense ``ModelConfig``; :func:`config_to_hf` writes one back. Every field of the file is
either mapped, checked against the one value the library can represent, or known to carry
nothing the model computes with (dropout, initializer range, bookkeeping); any other field is an
error that names it, so that a config the library would silently misread never loads.
"""

from __future__ import annotations

import math
from typing import Any

from sparse_jax.model.config import ModelConfig

ARCHITECTURE = "Gemma2ForCausalLM"
MODEL_TYPE = "gemma2"
HF_LAYER_TYPES = {"local": "sliding_attention", "global": "full_attention"}
LIBRARY_LAYER_TYPES = {v: k for k, v in HF_LAYER_TYPES.items()}
# Gemma-2's tanh-approximated gelu under the names transformers gives it.
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")

# HF field -> ModelConfig field, copied as they are.
COPIED = {
    "vocab_size": "vocab_size",
    "hidden_size": "model_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "ffn_dim",
    "sliding_window": "sliding_window",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "attn_logit_softcapping": "attn_logit_softcap",
    "final_logit_softcapping": "final_logit_softcap",
}
# Fields read by :func:`config_from_hf` other than the copied ones.
READ = (
    "architectures",
    "model_type",
    "query_pre_attn_scalar",
    "layer_types",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "hidden_activation",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "use_bidirectional_attention",
    "dtype",
    "torch_dtype",
)
# Fields that change nothing the model computes at inference, or only name things.
IGNORED = (
    "attention_dropout",
    "initializer_range",
    "use_cache",
    "cache_implementation",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "transformers_version",
    "_name_or_path",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
)
HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ConversionError(ValueError):
    """A Hugging Face checkpoint or config the library cannot represent, or a bad directory."""


def _field(hf: dict[str, Any], name: str) -> Any:
    if name not in hf:
        raise ConversionError(f"config.json has no {name!r}, which a Gemma-2 config must give")
    return hf[name]


def _check(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ConversionError(f"config.json: {field}={value!r} cannot be represented: {why}")


def checkpoint_dtype(hf: dict[str, Any]) -> str | None:
    """The dtype the config says the weights are stored in (``dtype`` or ``torch_dtype``)."""
    value = hf.get("dtype", hf.get("torch_dtype"))
    if value is None:
        return None
    value = str(value).removeprefix("torch.")
    if value not in HF_DTYPES:
        raise ConversionError(f"config.json: dtype={value!r} is not one of {sorted(HF_DTYPES)}")
    return HF_DTYPES[value]


def rope_base(hf: dict[str, Any]) -> float:
    """RoPE's base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4)."""
    params = hf.get("rope_parameters")
    if params is None:
        scaling = hf.get("rope_scaling")
        _check(
            scaling is None or scaling.get("rope_type", scaling.get("type")) == "default",
            "rope_scaling",
            scaling,
            "the library's RoPE has no scaling",
        )
        return float(hf.get("rope_theta", 10_000.0))
    _check(
        isinstance(params, dict) and params.get("rope_type", "default") == "default",
        "rope_parameters",
        params,
        "the library's RoPE has no scaling (rope_type must be 'default')",
    )
    extra = sorted(set(params) - {"rope_type", "rope_theta"})
    _check(not extra, "rope_parameters", params, f"unknown entries {extra}")
    return float(params.get("rope_theta", 10_000.0))


def config_from_hf(
    hf: dict[str, Any], *, param_dtype: str | None = None, name: str = "gemma2"
) -> ModelConfig:
    """The dense ``ModelConfig`` of a Gemma-2 ``config.json``.

    Args:
      hf: the parsed ``config.json``.
      param_dtype: dtype to store the weights in; default: the config's ``dtype`` (float32 if
        it names none). Activations are computed in float32.
      name: the config's name.

    Raises:
      ConversionError: the config is not Gemma-2's, lacks a field, or holds a field or value the
        library cannot represent (the message names it).
    """
    if not isinstance(hf, dict):
        raise ConversionError(f"config.json must hold a JSON object, not {type(hf).__name__}")
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or [ARCHITECTURE]
    if model_type != MODEL_TYPE or list(architectures) != [ARCHITECTURE]:
        raise ConversionError(
            f"unsupported architecture: config.json has model_type={model_type!r}, "
            f"architectures={architectures!r}; only {MODEL_TYPE!r} ({ARCHITECTURE}) imports"
        )
    unknown = sorted(set(hf) - set(COPIED) - set(READ) - set(IGNORED))
    if unknown:
        raise ConversionError(
            f"config.json has field(s) {unknown} that the library cannot represent"
        )
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or GELU_TANH[0]
    _check(
        activation in GELU_TANH,
        "hidden_activation",
        activation,
        f"the FFN's gelu is the tanh approximation ({GELU_TANH[0]})",
    )
    tied = hf.get("tie_word_embeddings", True)
    _check(tied is True, "tie_word_embeddings", tied, "the output projection is the embedding")
    bias = hf.get("attention_bias", False)
    _check(bias is False, "attention_bias", bias, "attention has no biases")
    bidirectional = hf.get("use_bidirectional_attention")
    _check(not bidirectional, "use_bidirectional_attention", bidirectional, "attention is causal")

    kwargs = {ours: _field(hf, theirs) for theirs, ours in COPIED.items()}
    for field in ("attn_logit_softcap", "final_logit_softcap"):
        if kwargs[field] is not None:
            kwargs[field] = float(kwargs[field])
    kwargs["norm_eps"] = float(kwargs["norm_eps"])
    scalar = _field(hf, "query_pre_attn_scalar")
    _check(
        isinstance(scalar, int | float) and not isinstance(scalar, bool) and scalar > 0,
        "query_pre_attn_scalar",
        scalar,
        "must be a number > 0",
    )
    kwargs["query_scale"] = float(scalar) ** -0.5
    layers = kwargs["num_layers"]
    types = hf.get("layer_types")
    if types is None:  # transformers 4: even layers slide
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    bad = sorted({t for t in types if t not in LIBRARY_LAYER_TYPES})
    _check(not bad, "layer_types", bad, f"entries must be in {sorted(LIBRARY_LAYER_TYPES)}")
    kwargs["layer_types"] = tuple(LIBRARY_LAYER_TYPES[t] for t in types)
    kwargs["rope_base"] = rope_base(hf)
    stored = checkpoint_dtype(hf) or "float32"
    dtype = stored if param_dtype is None else param_dtype
    try:
        return ModelConfig(
            name=name,
            ffn_kind="gated",
            attn_kind="dense",
            param_dtype=dtype,
            dtype="float32",
            **kwargs,
        )
    except ValueError as err:
        raise ConversionError(f"config.json does not make a valid model: {err}") from None


def query_pre_attn_scalar(cfg: ModelConfig) -> int | float:
    """``query_pre_attn_scalar`` whose inverse square root is ``cfg``'s query scale (an int
    when it is one to float precision)."""
    scalar = cfg.resolved_query_scale**-2
    nearest = round(scalar)
    if nearest >= 1 and math.isclose(nearest**-0.5, cfg.resolved_query_scale, rel_tol=1e-12):
        return nearest
    return scalar


def config_to_hf(cfg: ModelConfig, special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a dense ``ModelConfig`` as ``Gemma2ForCausalLM``.

    Args:
      cfg: a dense model (``ffn_kind="gated"``, ``attn_kind="dense"``).
      special_ids: ``pad``, ``bos`` and ``eos`` token ids to record (the tokenizer's).

    Raises:
      ConversionError: ``cfg`` is a Spark model, which has no Hugging Face architecture.
    """
    if cfg.ffn_kind != "gated" or cfg.attn_kind != "dense":
        raise ConversionError(
            f"{cfg.name} is a Spark model (ffn_kind={cfg.ffn_kind!r}, attn_kind="
            f"{cfg.attn_kind!r}): Hugging Face has no architecture for it; only dense Gemma-2 "
            "checkpoints (ffn_kind='gated', attn_kind='dense') export"
        )
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "dtype": cfg.param_dtype,
        "hidden_activation": GELU_TANH[0],
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": query_pre_attn_scalar(cfg),
        "layer_types": [HF_LAYER_TYPES[t] for t in cfg.layer_types],
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        "use_cache": True,
    }
    for theirs, ours in COPIED.items():
        out[theirs] = getattr(cfg, ours)
    for name, value in (special_ids or {}).items():
        out[f"{name}_token_id"] = value
    return dict(sorted(out.items()))
