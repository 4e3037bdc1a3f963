"""The jitted training step: masked cross-entropy, gradient accumulation, one AdamW update.

``make_train_step`` returns one pure function ``(state, batch) -> (state, metrics)`` compiled
with the state donated. A batch of ``grad_accum * b`` rows is split into ``grad_accum``
micro-batches scanned in sequence; their summed token losses are divided by the total token
count, so the update equals one step on the whole batch (up to float summation order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sparse_jax.config import ModelConfig
from sparse_jax.model import Params, forward, init_params

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: step count, parameters, optimizer state and RNG key."""

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array


def init_train_state(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = init_params(cfg, init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=jax.jit(optimizer.init)(params),
        rng=jax.random.key_data(rng),
    )


def token_loss_sum(
    cfg: ModelConfig, params: Params, batch: Batch
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """Sum of masked next-token cross-entropies, the token count, and sparsity stats."""
    logits, stats = forward(cfg, params, batch["inputs"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), (jnp.sum(mask), stats)


def make_train_step(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, grad_accum: int
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted step; ``batch`` arrays are [grad_accum * b, T]."""
    grad_fn = jax.value_and_grad(lambda p, mb: token_loss_sum(cfg, p, mb), has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        micro = jax.tree.map(lambda a: a.reshape(grad_accum, -1, *a.shape[1:]), batch)

        def accumulate(carry, mb):
            grads, loss_sum, count = carry
            (loss, (n, stats)), g = grad_fn(state.params, mb)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, loss_sum + loss, count + n), stats

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, count), stats = jax.lax.scan(accumulate, init, micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": optax.global_norm(grads),
            "tokens": count,
            "ffn_active_fraction": jnp.mean(stats["ffn_active_fraction"], axis=0),
            "attn_keys_per_query": jnp.mean(stats["attn_keys_per_query"], axis=0),
        }
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(cfg: ModelConfig) -> Callable[[Params, Batch], tuple[jax.Array, jax.Array]]:
    """Jitted ``(params, batch) -> (summed loss, token count)``."""

    def evaluate(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        loss, (count, _) = token_loss_sum(cfg, params, batch)
        return loss, count

    return jax.jit(evaluate)
