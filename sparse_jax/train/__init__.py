"""Training: configuration, the jitted step, the loop with checkpoints and metrics.

``config`` (:class:`TrainConfig`), ``optim`` (AdamW and its schedule), ``step`` (loss,
gradient accumulation, one update), ``checkpoint`` (Orbax checkpoints and recovery),
``metrics`` (JSONL, TensorBoard, progress) and ``loop`` (:func:`train`).
"""

from sparse_jax.train.config import TrainConfig
from sparse_jax.train.loop import TrainingDiverged, train

__all__ = ["TrainConfig", "TrainingDiverged", "train"]
