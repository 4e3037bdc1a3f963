"""Every weight of the model, described once: shape, logical axes and initialiser.

The modules create their parameters from these descriptions (:func:`declare`); the sharding
rules read each leaf's logical axes from :data:`LOGICAL_AXES`; parameter counts, the decode
byte counts and the random weights of the benchmarks (:func:`random_params`) derive from
:func:`layer_weights`. A weight's ``dims`` name its sizes (:func:`dim_sizes`), its ``axes``
name the logical axes that shard it, and its ``fan_in`` lists the axes its inputs run over.

The layout is the one every path computes with (:mod:`sparse_jax.model.products`): inputs
last, outputs before them (``wq`` [N, H, D], ``wo`` [D, N, H], ``w_down`` [D, F], ``k1``
[F, R]), except Spark's K2 [F, D-R] and V [F, D], which hold one FFN neuron per row so that
decoding gathers the active neurons' rows.

Parameter tree of :class:`sparse_jax.model.transformer.Transformer`::

    embedder/embedding [V, D]         final_norm/scale [D]
    layers/... (scanned: a leading L axis) or layers_0/..., layers_1/... (unstacked):
      pre_attn_norm/scale, post_attn_norm/scale, pre_ffn_norm/scale, post_ffn_norm/scale [D]
      attn/wq [N, H, D], attn/wk [K, H, D], attn/wv [K, H, D], attn/wo [D, N, H]
      ffn/w_gate [F, D], ffn/w_up [F, D], ffn/w_down [D, F]        (Gemma-2's gated FFN)
      ffn/k1 [F, R], ffn/k2 [F, D-R], ffn/v [F, D]                 (Spark FFN)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.model.config import ModelConfig

NORMS = ("pre_attn_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter leaf.

    Attributes:
      dims: size names, one per axis (see :func:`dim_sizes`).
      axes: logical axis names, one per axis (see :mod:`sparse_jax.parallel.sharding`).
      init: "fan_in" (truncated normal, variance 1 / fan-in), "embedding" (normal, std
        D^-1/2) or "zeros".
      fan_in: the axes the fan-in runs over (``init="fan_in"`` only).
    """

    dims: tuple[str, ...]
    axes: tuple[str, ...]
    init: str = "fan_in"
    fan_in: tuple[int, ...] = ()

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        sizes = dim_sizes(cfg)
        return tuple(sizes[d] for d in self.dims)

    def initializer(self, cfg: ModelConfig) -> Any:
        if self.init == "zeros":
            return nn.initializers.zeros_init()
        if self.init == "embedding":
            return nn.initializers.normal(stddev=cfg.model_dim**-0.5)
        out = tuple(a for a in range(len(self.dims)) if a not in self.fan_in)
        return nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=self.fan_in, out_axis=out
        )

    def std(self, cfg: ModelConfig) -> float:
        """Standard deviation of the initial values (0 for zeros)."""
        if self.init == "zeros":
            return 0.0
        if self.init == "embedding":
            return cfg.model_dim**-0.5
        shape = self.shape(cfg)
        return math.prod(shape[a] for a in self.fan_in) ** -0.5


def dim_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Size of every dimension name used by :class:`Weight`."""
    d = cfg.model_dim
    sizes = {
        "vocab": cfg.vocab_size,
        "embed": d,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp": cfg.ffn_dim,
    }
    if cfg.ffn_kind == "spark":
        sizes["ffn_predictor"] = cfg.ffn_predictor_dim
        sizes["ffn_rest"] = d - cfg.ffn_predictor_dim
    return sizes


NORM = Weight(("embed",), ("norm",), init="zeros")
EMBEDDING = Weight(("vocab", "embed"), ("vocab", "embed"), init="embedding")
ATTENTION = {
    "wq": Weight(("heads", "head_dim", "embed"), ("heads", "head_dim", "embed"), fan_in=(2,)),
    "wk": Weight(("kv_heads", "head_dim", "embed"), ("kv_heads", "head_dim", "embed"), fan_in=(2,)),
    "wv": Weight(("kv_heads", "head_dim", "embed"), ("kv_heads", "head_dim", "embed"), fan_in=(2,)),
    "wo": Weight(("embed", "heads", "head_dim"), ("embed", "heads", "head_dim"), fan_in=(1, 2)),
}
GATED_FFN = {
    "w_gate": Weight(("mlp", "embed"), ("mlp", "embed"), fan_in=(1,)),
    "w_up": Weight(("mlp", "embed"), ("mlp", "embed"), fan_in=(1,)),
    "w_down": Weight(("embed", "mlp"), ("embed", "mlp"), fan_in=(1,)),
}
SPARK_FFN = {
    # K1 reads the first R entries of the model dimension: its inputs shard like "embed".
    "k1": Weight(("mlp", "ffn_predictor"), ("mlp", "embed"), fan_in=(1,)),
    "k2": Weight(("mlp", "ffn_rest"), ("mlp", "embed"), fan_in=(1,)),
    "v": Weight(("mlp", "embed"), ("mlp", "embed"), fan_in=(0,)),
}

# Logical axes of every leaf, keyed by leaf name (leaf names are unique across the model).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embedding": EMBEDDING.axes,
    "scale": NORM.axes,
    **{name: w.axes for name, w in {**ATTENTION, **GATED_FFN, **SPARK_FFN}.items()},
}


def ffn_weights(cfg: ModelConfig) -> dict[str, Weight]:
    return SPARK_FFN if cfg.ffn_kind == "spark" else GATED_FFN


def layer_weights(cfg: ModelConfig) -> dict[str, dict[str, Weight]]:
    """One block's weights, as nested in the parameter tree."""
    out: dict[str, dict[str, Weight]] = {name: {"scale": NORM} for name in NORMS}
    out["attn"] = dict(ATTENTION)
    out["ffn"] = dict(ffn_weights(cfg))
    return out


def model_weights(cfg: ModelConfig, scanned: bool | None = None) -> dict[str, Any]:
    """Every weight of the model, as nested in the parameter tree.

    Args:
      cfg: the model.
      scanned: one ``layers`` entry (the scanned stack; its leaves get a leading L axis) or
        ``layers_0 ...``; defaults to ``cfg.scan_layers``.
    """
    scanned = cfg.scan_layers if scanned is None else scanned
    out: dict[str, Any] = {"embedder": {"embedding": EMBEDDING}, "final_norm": {"scale": NORM}}
    if scanned:
        out["layers"] = layer_weights(cfg)
    else:
        out.update({f"layers_{i}": layer_weights(cfg) for i in range(cfg.num_layers)})
    return out


def declare(module: nn.Module, cfg: ModelConfig, name: str, weight: Weight) -> jax.Array:
    """Creates (or reads) ``weight`` as parameter ``name`` of ``module``."""
    return module.param(name, weight.initializer(cfg), weight.shape(cfg), cfg.param_dtype)


def declare_all(module: nn.Module, cfg: ModelConfig, weights: dict[str, Weight]) -> None:
    """Creates every weight of ``weights`` as a parameter and attribute of the same name."""
    for name, weight in weights.items():
        setattr(module, name, declare(module, cfg, name, weight))


def param_count(cfg: ModelConfig) -> int:
    """Exact number of scalars in the model's parameters."""
    layer = sum(
        math.prod(w.shape(cfg)) for group in layer_weights(cfg).values() for w in group.values()
    )
    return math.prod(EMBEDDING.shape(cfg)) + math.prod(NORM.shape(cfg)) + cfg.num_layers * layer


def group_size(cfg: ModelConfig, group: str) -> int:
    """Scalars of one block's ``group`` ("attn", "ffn" or a norm name)."""
    return sum(math.prod(w.shape(cfg)) for w in layer_weights(cfg)[group].values())


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _hashed_uniform(shape: tuple[int, ...], seed: jax.Array, std: float, dtype: str) -> jax.Array:
    """Uniform values of standard deviation ``std`` from a counter hash (murmur3's finaliser).

    A hash of the element index is several times faster on CPU than ``jax.random``'s
    generators, which matters for the 2.6B values of a 2B model.
    """
    x = jax.lax.iota(jnp.uint32, math.prod(shape)) * jnp.uint32(0x9E3779B1)
    x = x + seed.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    centred = (x >> 8).astype(jnp.float32) * (1.0 / (1 << 24)) - 0.5
    return (centred * (std * 12**0.5)).astype(dtype).reshape(shape)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Random weights built leaf by leaf, unstacked (``layers_i``), in ``cfg.param_dtype``.

    Each weight is uniform with its initialiser's standard deviation, from a hash of (seed,
    leaf, element index); norm scales are zero as at initialisation. No second copy is ever
    materialised, so a 2B-parameter float32 model needs its 10.5 GB and little more. For
    benchmarks, where building a 2B model through ``init_params`` would take minutes.
    """
    counter = iter(range(1 << 30))

    def leaf(weight: Weight) -> jax.Array:
        shape = weight.shape(cfg)
        if weight.init == "zeros":
            return jnp.zeros(shape, cfg.param_dtype)
        leaf_seed = jnp.uint32((seed * 1_000_003 + next(counter)) % (1 << 32))
        return _hashed_uniform(shape, leaf_seed, weight.std(cfg), cfg.param_dtype)

    return jax.tree.map(
        leaf, model_weights(cfg, scanned=False), is_leaf=lambda w: isinstance(w, Weight)
    )
