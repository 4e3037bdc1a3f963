"""The decoder: Gemma-2 blocks stacked (scanned or not), dense or Spark by config.

``Transformer(cfg).apply({"params": params}, tokens)`` returns ``(logits, stats)``: logits
[B, T, V] in float32 and per-layer sparsity statistics ``{"ffn_active_fraction": [L],
"attn_keys_per_query": [L]}``. Local/global windows and per-layer sparsity switches enter the
layer stack as scanned arrays, so one compiled block serves every layer. The same blocks,
unrolled, run prefill and the decode step over a KV cache (:meth:`Transformer.extend`, driven
by :mod:`sparse_jax.decode.step`). Every weight is described once in
:mod:`sparse_jax.model.weights`.

With ``scan_layers`` the block parameters live under ``params["layers"]`` with a leading L
axis; without it under ``params["layers_0"] ...``. :func:`stack_layers` and
:func:`unstack_layers` convert between the two.

``Transformer(cfg, plan, kernels)`` runs statistical top-k through ``kernels``
(:class:`sparse_jax.kernels.Kernels`, the seam to the Pallas kernels; the default ``"auto"``
runs them on TPU and GPU and the XLA path elsewhere).

On a mesh, ``Transformer(cfg, plan)`` constrains the residual stream and the logits to the
logical axes of :mod:`sparse_jax.parallel.sharding` at every block boundary; parameters are
laid out by :func:`param_shardings`. Without a plan nothing changes from the single-device model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.kernels import DEFAULT_KERNELS, Kernels
from sparse_jax.model.attention import Attention
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.ffn import FFN_MODES, make_ffn
from sparse_jax.model.layers import Embedder, RMSNorm, softcap
from sparse_jax.parallel.sharding import LOGITS, RESIDUAL, ShardingPlan, constrain

Params = dict[str, Any]


def remat_policy(name: str) -> Any:
    """The ``jax.checkpoint`` policy for ``ModelConfig.remat_policy``."""
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.dots_with_no_batch_dims_saveable,
        "names": policies.save_only_these_names("qkv", "ffn_pre"),
    }[name]


@dataclasses.dataclass(frozen=True)
class DecodeChoice:
    """How one layer runs in a cached step (static: part of the compiled program).

    Attributes:
      attn_capacity: gathered keys per query head of Spark attention's sparse path; None
        reads every cached key (the masked path).
      ffn_mode: "masked", "per_token", "union" or "block" (see :mod:`sparse_jax.model.ffn`).
      ffn_capacity: gathered neurons per selection of the sparse FFN modes.
    """

    attn_capacity: int | None = None
    ffn_mode: str = "masked"
    ffn_capacity: int = 0

    def __post_init__(self) -> None:
        if self.ffn_mode not in FFN_MODES:
            raise ValueError(f"DecodeChoice.ffn_mode={self.ffn_mode!r} must be one of {FFN_MODES}")


MASKED = DecodeChoice()


class Block(nn.Module):
    """Pre- and post-normed attention and FFN with residuals (Gemma-2).

    The one block definition of every path: scanned over the layers in training (``layer``
    holds traced per-layer values), unrolled for prefill and decoding (static values, a cache
    and a :class:`DecodeChoice`).
    """

    cfg: ModelConfig
    plan: ShardingPlan | None = None
    kernels: Kernels = DEFAULT_KERNELS

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        layer: dict[str, Any],
        positions: jax.Array,
        cache: dict[str, jax.Array] | None = None,
        choice: DecodeChoice = MASKED,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One layer over x [B, T, D] at positions [B, T] (-1: padding).

        Returns the new x and ``{"stats": ..., "entries": ...}``: per-layer statistics
        (``attn_keys``, mean kept keys per query head, and ``ffn_active``, mean active
        neurons per token, both over real tokens; the two overflow flags) and, with a cache,
        this block's key and value entries (the caller writes them into the cache).
        """
        cfg = self.cfg
        norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        with jax.named_scope("attention"):
            h = RMSNorm(**norm, name="pre_attn_norm")(x)
            attn = Attention(cfg, self.kernels, name="attn")
            h, entries, kept, attn_over = attn(
                h, positions, layer["window"], layer["attn_on"], cache, choice.attn_capacity
            )
            x = constrain(x + RMSNorm(**norm, name="post_attn_norm")(h), RESIDUAL, self.plan)
        with jax.named_scope("ffn"):
            h = RMSNorm(**norm, name="pre_ffn_norm")(x)
            ffn = make_ffn(cfg, "ffn", self.kernels)
            h, active, ffn_over = ffn(h, layer["ffn_on"], choice.ffn_mode, choice.ffn_capacity)
            x = constrain(x + RMSNorm(**norm, name="post_ffn_norm")(h), RESIDUAL, self.plan)
        real = (positions >= 0).astype(jnp.float32)
        tokens = jnp.maximum(jnp.sum(real), 1.0)
        stats = {
            "attn_keys": jnp.sum(kept * real[:, None]) / (tokens * cfg.num_heads),
            "ffn_active": jnp.sum(active * real) / tokens,
            "attn_overflow": attn_over,
            "ffn_overflow": ffn_over,
        }
        out = {"stats": stats}
        if cache is not None:
            out["entries"] = entries
        return x, out


def layer_inputs(cfg: ModelConfig) -> dict[str, jax.Array]:
    """Per-layer scanned inputs: window [L], attention and FFN sparsity switches [L]."""
    return {
        "window": jnp.asarray(cfg.layer_windows, jnp.int32),
        "attn_on": jnp.asarray(cfg.attn_sparse_layers, bool),
        "ffn_on": jnp.asarray(cfg.ffn_sparse_layers, bool),
    }


class Transformer(nn.Module):
    """Token ids [B, T] -> (logits [B, T, V] float32, per-layer stats); one model for every path.

    ``__call__`` is training and evaluation (the block attends to itself); :meth:`extend` is
    prefill and the decode step (the blocks attend to a KV cache first and return their new
    entries). Both run the same :class:`Block`.

    Attributes:
      cfg: the model.
      plan: mesh and sharding rules; activations at block boundaries are constrained to it.
        ``None`` (one device) adds no constraint.
      kernels: implementation of the sparse ops (:mod:`sparse_jax.kernels`). With a plan and
        a Pallas implementation, kernel calls run per shard over the plan's mesh, their
        operands split by the plan's rules (batch, FFN width, heads).
      unrolled: the cached-step form that :meth:`extend` needs: one block per layer
        (parameters ``layers_i``) even when ``cfg.scan_layers`` (each layer's cache and
        choices are static), and no rematerialisation (nothing is differentiated).
    """

    cfg: ModelConfig
    plan: ShardingPlan | None = None
    kernels: Kernels = DEFAULT_KERNELS
    unrolled: bool = False

    def setup(self) -> None:
        cfg = self.cfg
        kernels = self.kernels
        if self.plan is not None and kernels.mesh is None and kernels.resolved() != "xla":
            kernels = dataclasses.replace(
                kernels,
                mesh=self.plan.mesh,
                batch_axes=self.plan.rules.mesh_axes("batch"),
                rules=self.plan.rules,
            )
        scanned = cfg.scan_layers and not self.unrolled
        block = Block
        if cfg.remat_policy != "none" and not self.unrolled:
            block = nn.remat(Block, policy=remat_policy(cfg.remat_policy), prevent_cse=not scanned)
        self.embedder = Embedder(cfg, kernels)
        if scanned:
            scanned_block = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast),
                length=cfg.num_layers,
            )
            self.layers = scanned_block(cfg, self.plan, kernels)
        else:
            self.blocks = [
                block(cfg, self.plan, kernels, name=f"layers_{i}") for i in range(cfg.num_layers)
            ]
        self.final_norm = RMSNorm(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        embeddings: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Forward pass.

        Args:
          tokens: [B, T] int token ids, T at most ``cfg.max_seq_len``.
          positions: [B, T] positions; defaults to 0..T-1 per row.
          embeddings: optional [B, T, D] input embeddings used instead of looking ``tokens``
            up (for gradient-based tests and soft prompts).

        Returns:
          logits [B, T, V] float32 and {"ffn_active_fraction": [L], "attn_keys_per_query": [L]}.

        Raises:
          ValueError: ``tokens`` is not [B, T], or T exceeds ``cfg.max_seq_len``.
        """
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        b, t = tokens.shape
        if t > cfg.max_seq_len:
            # Past the context the global layers would run windowed at max_seq_len, which is
            # not the model's attention: refuse instead of silently computing something else.
            raise ValueError(
                f"the sequence has {t} tokens: it exceeds the model's context of "
                f"{cfg.max_seq_len} tokens (max_seq_len)"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        with jax.named_scope("embed"):
            x = self.embedder.encode(tokens) if embeddings is None else embeddings
            x = constrain(x, RESIDUAL, self.plan)
        per_layer = layer_inputs(cfg)
        if cfg.scan_layers and not self.unrolled:
            x, out = self.layers(x, per_layer, positions)
            stats = out["stats"]
        else:
            collected = []
            for i, blk in enumerate(self.blocks):
                with jax.named_scope(f"layer_{i}"):
                    layer = jax.tree.map(lambda a, i=i: a[i], per_layer)
                    x, out = blk(x, layer, positions)
                collected.append(out["stats"])
            stats = jax.tree.map(lambda *a: jnp.stack(a), *collected)
        with jax.named_scope("unembed"):
            x = self.final_norm(x)
            logits = softcap(self.embedder.decode(x), cfg.final_logit_softcap)
            logits = constrain(logits, LOGITS, self.plan)
        return logits, {
            "ffn_active_fraction": stats["ffn_active"] / cfg.ffn_dim,
            "attn_keys_per_query": stats["attn_keys"],
        }

    def extend(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: tuple[dict[str, jax.Array], ...],
        choices: tuple[DecodeChoice, ...],
        lookup: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], ...], dict[str, jax.Array]]:
        """Prefill or decode: tokens [B, T] at positions [B, T] (-1: padding) after a cache.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] positions, -1 for left padding.
          cache: one dict of cached entries per layer (see :mod:`sparse_jax.decode.cache`).
          choices: one static :class:`DecodeChoice` per layer.
          lookup: optional embedding table for the token lookup (the same values as the
            parameters'; passed as a second argument so that the lookup and the output
            projection each read their own program input).

        Returns:
          logits [B, V] float32 at the last position, each layer's new entries (the caller
          writes them into the cache) and per-layer stats ``attn_keys``, ``ffn_active``,
          ``attn_overflow``, ``ffn_overflow`` [L].
        """
        cfg = self.cfg
        if not hasattr(self, "blocks"):
            raise ValueError("Transformer.extend needs unrolled=True (one block per layer)")
        x = self.embedder.encode(tokens, lookup)
        entries, collected = [], []
        for i, (blk, layer_cache) in enumerate(zip(self.blocks, cache, strict=True)):
            layer = {
                "window": cfg.layer_windows[i],
                "attn_on": cfg.attn_sparse_layers[i],
                "ffn_on": cfg.ffn_sparse_layers[i],
            }
            with jax.named_scope(f"layer_{i}"):
                x, out = blk(x, layer, positions, layer_cache, choices[i])
            entries.append(out["entries"])
            collected.append(out["stats"])
        last = self.final_norm(x[:, -1:])
        logits = softcap(self.embedder.decode(last), cfg.final_logit_softcap)[:, 0]
        stats = jax.tree.map(lambda *a: jnp.stack(a), *collected)
        return logits, tuple(entries), stats


def init_params(
    cfg: ModelConfig, rng: jax.Array, seq_len: int = 8, plan: ShardingPlan | None = None
) -> Params:
    """Initialises parameters (a plain nested dict) without running a full forward.

    With a ``plan`` each parameter is created already sharded by the plan's rules (no device
    ever holds a whole one that the rules split); the values equal the unsharded ones.
    """
    tokens = jnp.zeros((1, min(seq_len, cfg.max_seq_len)), jnp.int32)

    def init(r: jax.Array) -> Params:
        return Transformer(cfg).init(r, tokens)["params"]

    if plan is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=plan.tree_shardings(jax.eval_shape(init, rng)))(rng)


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters, without allocating them."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))


def param_shardings(cfg: ModelConfig, plan: ShardingPlan) -> Params:
    """The ``NamedSharding`` of every parameter under ``plan`` (a tree like the params)."""
    return plan.tree_shardings(abstract_params(cfg))


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    plan: ShardingPlan | None = None,
    kernels: Kernels = DEFAULT_KERNELS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pure function: (logits [B, T, V], stats) for ``tokens`` [B, T].

    With a ``plan``, call it under ``jax.jit``: activations at block boundaries are constrained
    to the plan's mesh (parameters keep whatever sharding they come with). ``kernels`` picks
    the implementation of the sparse ops (:class:`sparse_jax.kernels.Kernels`).
    """
    return Transformer(cfg, plan, kernels).apply({"params": params}, tokens, positions)


def stack_layers(params: Params, num_layers: int) -> Params:
    """Unscanned ``layers_i`` subtrees -> one scanned ``layers`` subtree with a leading L axis."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    blocks = [params[f"layers_{i}"] for i in range(num_layers)]
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    return out


def unstack_layers(params: Params, num_layers: int) -> Params:
    """Scanned ``layers`` subtree -> ``layers_0 ... layers_{L-1}``."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    return out


def count_params(params: Params) -> int:
    """Total number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
