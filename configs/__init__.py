"""Named presets: ``get_model_config(name)`` returns a validated :class:`ModelConfig`.

One module per model family (``tiny``, ``small``, ``gemma2_2b``); each defines the dense and the
Spark variant at equal parameter count and says in its docstring how to run it.
"""

from __future__ import annotations

from collections.abc import Callable

from configs import gemma2_2b, small, tiny
from sparse_jax.model.config import ModelConfig
from sparse_jax.train.config import TrainConfig

MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny.spark,
    "tiny_dense": tiny.dense,
    "small": small.spark,
    "small_dense": small.dense,
    "gemma2_2b": gemma2_2b.dense,
    "spark_gemma2_2b": gemma2_2b.spark,
}


def get_model_config(name: str) -> ModelConfig:
    """Returns the preset called ``name``; raises ValueError listing the known presets."""
    try:
        factory = MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"preset={name!r} is unknown; known presets: {sorted(MODEL_PRESETS)}"
        ) from None
    return factory()


def get_train_config(name: str) -> TrainConfig:
    """Training settings that go with preset ``name`` (defaults for the 2B presets)."""
    get_model_config(name)  # validates the name
    module = {"tiny": tiny, "small": small}.get(name.removesuffix("_dense"))
    return module.train() if module is not None else TrainConfig()
