"""Small model and training configs shared by the test modules (fast on a 2-core CPU)."""

import dataclasses

from configs import get_model_config, get_train_config
from sparse_jax.model.config import ModelConfig, override

# The tiny preset shrunk for speed, as ``--set`` overrides, for runs through the trainer/CLI.
MICRO_MODEL = [
    "vocab_size=512",
    "model_dim=32",
    "num_layers=2",
    "num_heads=2",
    "num_kv_heads=1",
    "head_dim=16",
    "ffn_dim=96",
    "attn_top_k=8",
    "max_seq_len=32",
    "sliding_window=16",
]
# The same with 4 query heads over 2 kv heads, so tensor parallelism can split both.
MICRO_MODEL_GQA = [
    *(m for m in MICRO_MODEL if m.split("=")[0] not in ("num_heads", "num_kv_heads")),
    "num_heads=4",
    "num_kv_heads=2",
]
MICRO_TRAIN = [
    "steps=12",
    "data.batch_size=4",
    "data.seq_len=32",
    "log_every=1",
    "eval_every=6",
    "checkpoint_every=2",
    "data.eval_batches=1",
]


def model_variants(
    attn_sparse_layers: tuple[bool, ...], ffn_sparse_layers: tuple[bool, ...]
) -> dict[str, ModelConfig]:
    """Spark, dense and mixed variants of one small model, one layer per switch given.

    A local window of 6 against test sequences of 16-20 tokens makes the local rings wrap.
    """
    base = ModelConfig(
        vocab_size=97,
        model_dim=32,
        num_layers=len(attn_sparse_layers),
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_dim=96,
        attn_top_k=4,
        sliding_window=6,
        max_seq_len=32,
        ffn_keep_fraction=0.1,
    )
    return {
        "spark": base,
        "dense": dataclasses.replace(base, ffn_kind="gated", attn_kind="dense", ffn_dim=64),
        "mixed": dataclasses.replace(
            base, attn_sparse_layers=attn_sparse_layers, ffn_sparse_layers=ffn_sparse_layers
        ),
    }


def micro_train_configs(data=None, **train_changes):
    """The micro model and its training config (``TrainConfig`` fields changed as given).

    ``data``: a dict of :class:`DataConfig` fields to change in ``TrainConfig.data``.
    """
    model = override(get_model_config("tiny"), MICRO_MODEL)
    tc = override(get_train_config("tiny"), MICRO_TRAIN)
    tc = dataclasses.replace(tc, data=dataclasses.replace(tc.data, **(data or {})))
    return model, dataclasses.replace(tc, **train_changes)
