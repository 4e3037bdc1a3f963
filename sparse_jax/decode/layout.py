"""Decode-time parameter layout: every weight stored one output row per contiguous row.

At batch 1 decoding reads each weight once per token, so the layout decides the speed: on
this project's 2-core CPU a float32 matvec whose weight is stored [out, in] (contracting the
minor axis) streams at 23-28 GB/s, against 15-21 GB/s for the training layout's [in, out]
(measured on Gemma-2 2B shapes, weights larger than the caches). :func:`to_decode_params`
re-lays the model's parameters (scanned or not) into a plain dict ``{"embedding" [V, D],
"lookup" [V, D], "final_norm" [D], "blocks": (per layer dict, ...)}``. ``lookup`` is the tied
table ``embedding`` again (one array under two keys): as two XLA parameters, the token lookup
and the output projection each have one user, and a bfloat16 table is upcast inside the
projection's single pass instead of being converted whole every step. Per layer: the four
norm scales [D], ``wqkv`` [(N + 2K) * H, D] (q, k and v projections fused), ``wo``
[D, N * H], and either ``w_gate_up`` [2F, D] and ``w_down`` [D, F] (gated FFN) or ``k1``
[F, R], ``k2`` [F, D-R] and ``v`` [F, D] (Spark FFN; K2 and V keep one neuron per row for the
gathers). :func:`random_decode_params` builds random weights directly in this layout (for
benchmarks), and :func:`linear` / :func:`linear_rows` are the products every decode block uses.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from sparse_jax.decode.policy import policy_for
from sparse_jax.model.config import ModelConfig

DecodeParams = dict[str, Any]
NORMS = ("pre_attn_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w.T`` in float32 for a weight stored [out, in].

    The formulation is the backend policy's (:mod:`sparse_jax.decode.policy`): on CPU, narrow
    weights (bfloat16) at few rows are read through an elementwise product and sum, which
    fuses the upcast into the one pass over the weight; XLA's CPU dot is many times slower
    in bfloat16. On TPU and GPU every product is a dot.

    Args:
      x: [M, in] activations.
      w: [out, in] weight, float32 or narrower.

    Returns:
      [M, out] float32.
    """
    x = x.astype(jnp.float32)
    form = _form(x.shape[0], w.dtype)
    if form != "dot":
        x = _fence(x)  # producers fused into the product would be recomputed per output
    if form == "one_narrow_row":
        return _fence(jnp.sum(w.astype(jnp.float32) * x[0], axis=-1)[None])
    if form == "few_rows":
        return _fence(jnp.sum(w[None].astype(jnp.float32) * x[:, None, :], axis=-1))
    return jnp.einsum("mi,oi->mo", x, w.astype(jnp.float32))


def linear_rows(a: jax.Array, w: jax.Array) -> jax.Array:
    """``a @ w`` in float32 for a weight stored [in, out] (one input per row, as Spark's V).

    Args:
      a: [M, in] activations.
      w: [in, out] weight, float32 or narrower.

    Returns:
      [M, out] float32.
    """
    a = a.astype(jnp.float32)
    form = _form(a.shape[0], w.dtype)
    if form != "dot":
        a = _fence(a)
    if form == "one_narrow_row":
        return _fence(jnp.sum(a[0][:, None] * w.astype(jnp.float32), axis=0)[None])
    if form == "few_rows":
        return _fence(jnp.sum(a[:, :, None] * w[None].astype(jnp.float32), axis=1))
    return jnp.einsum("mi,io->mo", a, w.astype(jnp.float32))


def _form(rows: int, weight_dtype) -> str:
    """The backend policy's formulation for a product of ``rows`` rows with a weight.

    Where the policy allows it (CPU): a single row of a narrow (bfloat16) weight and 2 to
    ``elementwise_max_rows`` rows take an elementwise product and sum; a single float32 row
    stays a dot (a matvec, which XLA streams; the elementwise form on one row is orders of
    magnitude slower). Elsewhere every product is a dot.
    """
    policy = policy_for()
    if not policy.elementwise:
        return "dot"
    if rows == 1:
        return "one_narrow_row" if weight_dtype != jnp.float32 else "dot"
    return "few_rows" if rows <= policy.elementwise_max_rows else "dot"


def _fence(y: jax.Array) -> jax.Array:
    """Returns y unchanged, behind a conditional that XLA cannot fuse across.

    XLA's CPU backend fuses elementwise producers and consumers (softcap's tanh, gelu) into
    an elementwise product-and-sum, and the fused loop then runs about 10x slower (a bfloat16
    [256000, 2304] matvec followed by a tanh: 3.4 s fused, 0.25 s fenced); optimisation
    barriers do not stop it. Both branches are the same, so the predicate does not matter.
    """
    return jax.lax.cond(y.ravel()[0] > 0, _plus_zero, _plus_zero, y)


def _plus_zero(y: jax.Array) -> jax.Array:
    return y + 0.0


def _layer(params: dict[str, Any], index: int) -> dict[str, Any]:
    if "layers" in params:
        return jax.tree.map(lambda a: a[index], params["layers"])
    return params[f"layers_{index}"]


def to_decode_params(cfg: ModelConfig, params: dict[str, Any]) -> DecodeParams:
    """Model parameters (scanned or ``layers_i``) -> the decode layout; dtypes are kept.

    Args:
      cfg: the model config the parameters belong to.
      params: the ``params`` collection of :class:`sparse_jax.model.transformer.Transformer`.

    Returns:
      The decode-layout dict described in the module docstring (new arrays: for a while both
      layouts are held in memory).

    Raises:
      ValueError: the tree does not match ``cfg`` (missing layers or wrong FFN kind).
    """
    if "layers" not in params and f"layers_{cfg.num_layers - 1}" not in params:
        raise ValueError(f"params have neither 'layers' nor layers_0..{cfg.num_layers - 1}")
    expected = "k1" if cfg.ffn_kind == "spark" else "w_gate"
    ffn = params["layers"]["ffn"] if "layers" in params else params["layers_0"]["ffn"]
    if expected not in ffn:
        raise ValueError(f"params have FFN weights {sorted(ffn)}, not a {cfg.ffn_kind} FFN")
    return _with_lookup(_convert(cfg, params))


@functools.partial(jax.jit, static_argnums=0)
def _convert(cfg: ModelConfig, params: dict[str, Any]) -> DecodeParams:
    d, n, kv, h = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    blocks = []
    for i in range(cfg.num_layers):
        layer = _layer(params, i)
        attn, ffn = layer["attn"], layer["ffn"]
        block = {name: layer[name]["scale"] for name in NORMS}
        block["wqkv"] = jnp.concatenate(
            [
                attn["wq"].reshape(d, n * h).T,
                attn["wk"].reshape(d, kv * h).T,
                attn["wv"].reshape(d, kv * h).T,
            ]
        )
        block["wo"] = attn["wo"].reshape(n * h, d).T
        if cfg.ffn_kind == "spark":
            block.update(k1=ffn["k1"].T, k2=ffn["k2"], v=ffn["v"])
        else:
            block["w_gate_up"] = jnp.concatenate([ffn["w_gate"].T, ffn["w_up"].T])
            block["w_down"] = ffn["w_down"].T
        blocks.append(block)
    return {
        "embedding": params["embedder"]["embedding"],
        "final_norm": params["final_norm"]["scale"],
        "blocks": tuple(blocks),
    }


def _with_lookup(params: DecodeParams) -> DecodeParams:
    return {**params, "lookup": params["embedding"]}


def decode_param_shapes(cfg: ModelConfig) -> DecodeParams:
    """Shape tuples of one decode-layout tree (no arrays), for builders and byte counts."""
    d, n, kv, h, f = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    block: dict[str, tuple[int, ...]] = {name: (d,) for name in NORMS}
    block["wqkv"] = ((n + 2 * kv) * h, d)
    block["wo"] = (d, n * h)
    if cfg.ffn_kind == "spark":
        r = cfg.ffn_predictor_dim
        block.update(k1=(f, r), k2=(f, d - r), v=(f, d))
    else:
        block.update(w_gate_up=(2 * f, d), w_down=(d, f))
    return {
        "embedding": (cfg.vocab_size, d),
        "final_norm": (d,),
        "blocks": tuple(dict(block) for _ in range(cfg.num_layers)),
        "lookup": (cfg.vocab_size, d),
    }


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    """Fan-in of a decode-layout weight: its minor axis, except K2 and V (rows are neurons)."""
    if name == "embedding":
        return shape[1] ** 2  # the model's embedding init has std D^-1/2
    if name in ("k2", "v"):
        return shape[1] if name == "k2" else shape[0]
    return shape[-1]


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


def random_decode_params(cfg: ModelConfig, seed: int = 0) -> DecodeParams:
    """Random weights built leaf by leaf in the decode layout, in ``cfg.param_dtype``.

    Weights are uniform with std ``fan_in^-1/2`` (the model's variance scaling), from a hash
    of (seed, leaf, element index); norm scales are zero as at initialisation. No second copy
    is ever materialised, so a 2B-parameter float32 model needs its 10.5 GB and little more.

    Args:
      cfg: model config.
      seed: seed of the hash.

    Returns:
      A decode-layout parameter dict.
    """
    shapes = decode_param_shapes(cfg)
    counter = iter(range(1 << 30))

    def leaf(name: str, shape: tuple[int, ...]) -> jax.Array:
        if len(shape) == 1:
            return jnp.zeros(shape, cfg.param_dtype)
        leaf_seed = jnp.uint32((seed * 1_000_003 + next(counter)) % (1 << 32))
        return _hashed_uniform(shape, leaf_seed, _fan_in(name, shape) ** -0.5, cfg.param_dtype)

    blocks = tuple({name: leaf(name, shape) for name, shape in b.items()} for b in shapes["blocks"])
    return _with_lookup(
        {
            "embedding": leaf("embedding", shapes["embedding"]),
            "final_norm": leaf("final_norm", shapes["final_norm"]),
            "blocks": blocks,
        }
    )
