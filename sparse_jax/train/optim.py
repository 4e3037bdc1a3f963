"""AdamW with warm-up and cosine decay, global-norm clipping, and no decay on norms/embeddings."""

from __future__ import annotations

from typing import Any

import jax
import optax

from sparse_jax.train.config import TrainConfig


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``min_lr_ratio`` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: every leaf outside norms and the embedding."""

    def decays(path: tuple[Any, ...], _leaf: Any) -> bool:
        names = [str(getattr(p, "key", p)) for p in path]
        return not any("norm" in n or n == "embedder" for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(
            learning_rate_schedule(tc),
            b1=tc.beta1,
            b2=tc.beta2,
            weight_decay=tc.weight_decay,
            mask=decay_mask,
        ),
    )
