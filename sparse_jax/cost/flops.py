"""Cost accounting: exact parameter counts and matmul FLOPs per token for any config.

Two FLOP views of one token decoded with ``context`` keys before it (itself included):

* ``dense_equivalent``: what a dense implementation of the same weights spends (every FFN
  neuron, every key in reach). Training computes Spark layers this way (masked, not gathered).
* ``sparse``: what a sparse implementation needs: the Spark FFN's predictor over all F neurons
  plus k = ``ffn_keep_count`` rows of K2 and V; Spark attention's predictor over every key in
  reach plus the other half-key and the value of min(``attn_top_k``, keys) selected keys.

Counts are multiply-adds x 2 of the matmuls; norms, softmax, RoPE and the threshold are a few
FLOPs per activation and are left out (they are under 1% at every preset). ``forward_flops``
gives the masked implementation's cost of a whole training sequence, which is what XLA's cost
analysis of the compiled forward counts.
"""

from __future__ import annotations

import dataclasses

from sparse_jax.model import weights
from sparse_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TokenFlops:
    """FLOPs per token, split by where they are spent."""

    attn_proj: int
    attn_core: int
    ffn: int
    unembed: int

    @property
    def total(self) -> int:
        return self.attn_proj + self.attn_core + self.ffn + self.unembed

    @property
    def total_without_unembed(self) -> int:
        return self.total - self.unembed


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of ``Transformer(cfg)`` (from :mod:`sparse_jax.model.weights`)."""
    return weights.param_count(cfg)


def _attn_proj(cfg: ModelConfig) -> int:
    d, n, k, h = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return 2 * d * (n * h + 2 * k * h) + 2 * n * h * d


def _keys_in_reach(cfg: ModelConfig, layer: int, context: int) -> int:
    return min(context, cfg.layer_windows[layer])


def _ffn_dense(cfg: ModelConfig) -> int:
    mats = 3 if cfg.ffn_kind == "gated" else 2
    return 2 * mats * cfg.model_dim * cfg.ffn_dim


def _ffn_sparse(cfg: ModelConfig, layer: int) -> int:
    if cfg.ffn_kind != "spark" or not cfg.ffn_sparse_layers[layer]:
        return _ffn_dense(cfg)
    d, r, f, a = cfg.model_dim, cfg.ffn_predictor_dim, cfg.ffn_dim, cfg.ffn_keep_count
    return 2 * r * f + 2 * a * (d - r) + 2 * a * d


def _attn_core_dense(cfg: ModelConfig, keys: int) -> int:
    return cfg.num_heads * 4 * keys * cfg.head_dim


def _attn_core_sparse(cfg: ModelConfig, layer: int, keys: int) -> int:
    if cfg.attn_kind != "spark" or not cfg.attn_sparse_layers[layer]:
        return _attn_core_dense(cfg, keys)
    h, r = cfg.head_dim, cfg.attn_predictor_dim
    selected = min(cfg.attn_top_k, keys)
    return cfg.num_heads * (2 * keys * r + 2 * selected * (h - r) + 2 * selected * h)


def decode_flops(cfg: ModelConfig, context: int, sparse: bool) -> TokenFlops:
    """FLOPs of one token that attends to ``context`` keys (before windowing).

    Args:
      cfg: model config.
      context: keys before the window is applied (the token's position + 1), >= 1.
      sparse: True for what a sparse implementation needs, False for the dense-equivalent.
    """
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    core = ffn = 0
    for layer in range(cfg.num_layers):
        keys = _keys_in_reach(cfg, layer, context)
        if sparse:
            core += _attn_core_sparse(cfg, layer, keys)
            ffn += _ffn_sparse(cfg, layer)
        else:
            core += _attn_core_dense(cfg, keys)
            ffn += _ffn_dense(cfg)
    return TokenFlops(
        attn_proj=cfg.num_layers * _attn_proj(cfg),
        attn_core=core,
        ffn=ffn,
        unembed=2 * cfg.model_dim * cfg.vocab_size,
    )


def flops_ratio(dense_cfg: ModelConfig, spark_cfg: ModelConfig, context: int) -> dict[str, float]:
    """Dense-model FLOPs over Spark-model sparse FLOPs per token, with and without unembed."""
    dense = decode_flops(dense_cfg, context, sparse=False)
    spark = decode_flops(spark_cfg, context, sparse=True)
    return {
        "with_unembed": dense.total / spark.total,
        "without_unembed": dense.total_without_unembed / spark.total_without_unembed,
    }


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Matmul FLOPs of the masked forward over [batch, seq_len] (full T x T attention)."""
    per_token = _attn_proj(cfg) + _ffn_dense(cfg)
    core = cfg.num_heads * 4 * seq_len * seq_len * cfg.head_dim
    return batch * (
        cfg.num_layers * (seq_len * per_token + core) + seq_len * 2 * cfg.model_dim * cfg.vocab_size
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3x forward).

    ``dense_equivalent`` is what the masked training step computes; ``sparse`` is what the
    same step would need with the Spark layers' sparsity exploited (causal attention counted at
    its average reach), for reporting next to it.
    """
    dense = 3 * forward_flops(cfg, 1, seq_len) / seq_len
    sparse = 3 * sum(decode_flops(cfg, t + 1, sparse=True).total for t in range(seq_len)) / seq_len
    return {"dense_equivalent": dense, "sparse": sparse}
