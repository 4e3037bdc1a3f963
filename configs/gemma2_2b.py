"""``gemma2_2b`` (dense, the paper's base) and ``spark_gemma2_2b`` (same parameter count).

Shapes from Gemma-2 2B: D 2304, 26 layers alternating local (window 4096) and global, 8 query
and 4 kv heads of width 256, gated FFN width 9216 (Spark: 13824 with 8% kept, predictor width
1024), 256k vocabulary, 8k context; Spark attention keeps 256 keys per query with a 128-wide
predictor. About 2.6B parameters, 10.5 GB in float32: used for cost accounting and decode
benchmarks (``python benchmarks/decode.py``), not trained on CPU.
"""

from sparse_jax.model.config import ModelConfig

_BASE = dict(
    vocab_size=256_000,
    model_dim=2304,
    num_layers=26,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    sliding_window=4096,
    max_seq_len=8192,
    attn_top_k=256,
    attn_predictor_dim=128,
    ffn_keep_fraction=0.08,
    ffn_predictor_dim=1024,
)
DENSE_FFN_DIM = 9216


def spark() -> ModelConfig:
    return ModelConfig(
        name="spark_gemma2_2b",
        ffn_kind="spark",
        attn_kind="spark",
        ffn_dim=DENSE_FFN_DIM * 3 // 2,
        **_BASE,
    )


def dense() -> ModelConfig:
    return ModelConfig(
        name="gemma2_2b", ffn_kind="gated", attn_kind="dense", ffn_dim=DENSE_FFN_DIM, **_BASE
    )
