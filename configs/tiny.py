"""``tiny`` / ``tiny_dense``: about 1.6M parameters, trains in minutes on 2 CPU cores.

Run: ``python train.py --config tiny`` (the README's main command does this and then decodes).
A good result after the default few minutes: eval loss well below the corpus's unigram entropy
(about 6 nats with the 4096-piece tokenizer) and text with English word order.
"""

from sparse_jax.data.pipeline import DataConfig
from sparse_jax.model.config import ModelConfig
from sparse_jax.train.config import TrainConfig

_BASE = dict(
    vocab_size=4096,
    model_dim=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    sliding_window=128,
    max_seq_len=256,
    attn_top_k=32,
    ffn_keep_fraction=0.08,
)
DENSE_FFN_DIM = 512


def spark() -> ModelConfig:
    return ModelConfig(
        name="tiny", ffn_kind="spark", attn_kind="spark", ffn_dim=DENSE_FFN_DIM * 3 // 2, **_BASE
    )


def dense() -> ModelConfig:
    return ModelConfig(
        name="tiny_dense", ffn_kind="gated", attn_kind="dense", ffn_dim=DENSE_FFN_DIM, **_BASE
    )


def train() -> TrainConfig:
    return TrainConfig(
        steps=300,
        data=DataConfig(batch_size=16, seq_len=128),
        learning_rate=3e-3,
        warmup_steps=30,
        eval_every=100,
        log_every=10,
        checkpoint_every=100,
    )
