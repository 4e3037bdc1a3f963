"""``small`` / ``small_dense``: about 21M parameters, for quality studies on CPU.

Run: ``python benchmarks/quality.py`` trains both variants on the same tokens and compares
eval loss (see the README for the command, the token budget and the result).
"""

from sparse_jax.data.pipeline import DataConfig
from sparse_jax.model.config import ModelConfig
from sparse_jax.train.config import TrainConfig

_BASE = dict(
    vocab_size=8192,
    model_dim=384,
    num_layers=8,
    num_heads=6,
    num_kv_heads=3,
    head_dim=64,
    sliding_window=128,
    max_seq_len=256,
    attn_top_k=32,
    ffn_keep_fraction=0.08,
)
DENSE_FFN_DIM = 1536


def spark() -> ModelConfig:
    return ModelConfig(
        name="small", ffn_kind="spark", attn_kind="spark", ffn_dim=DENSE_FFN_DIM * 3 // 2, **_BASE
    )


def dense() -> ModelConfig:
    return ModelConfig(
        name="small_dense", ffn_kind="gated", attn_kind="dense", ffn_dim=DENSE_FFN_DIM, **_BASE
    )


def train() -> TrainConfig:
    return TrainConfig(
        steps=600,
        data=DataConfig(batch_size=16, seq_len=256),
        learning_rate=1e-3,
        warmup_steps=60,
        eval_every=100,
        log_every=10,
        checkpoint_every=200,
    )
