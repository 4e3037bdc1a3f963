"""The jitted training step: masked cross-entropy, gradient accumulation, one AdamW update.

``make_train_step`` returns one pure function ``(state, batch) -> (state, metrics)`` compiled
with the state donated. A batch of ``grad_accum * b`` rows is split into ``grad_accum``
micro-batches scanned in sequence (:func:`accumulate_gradients`); their summed token losses and
gradients are divided by the total token count, so the gradient equals the whole batch's up to
float summation order. The update can differ more: Adam divides by ``sqrt(v)``, which magnifies
the summation-order noise of a near-zero gradient.

With a :class:`~sparse_jax.parallel.sharding.ShardingPlan` the state is created already sharded
(:func:`init_train_state` compiles the initializer with ``out_shardings``), the step keeps it
in that layout, and batch rows are split over the plan's batch axes; without one every function
here is the single-device original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sparse_jax.kernels import DEFAULT_KERNELS, Kernels
from sparse_jax.model.config import ModelConfig
from sparse_jax.model.transformer import Params, forward, init_params
from sparse_jax.parallel.sharding import TOKENS, ShardingPlan

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: step count, parameters and optimizer state.

    The step draws no random numbers (no dropout), so the state holds no RNG key.
    """

    step: jax.Array
    params: Params
    opt_state: Any


def init_train_state(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    seed: int,
    plan: ShardingPlan | None = None,
) -> TrainState:
    """Step 0: parameters from ``seed`` and a fresh optimizer state.

    With a ``plan`` every array is created in its sharded layout (see :func:`state_shardings`);
    the values equal the unsharded ones.
    """
    return state_initializer(cfg, optimizer, seed, plan)()


def state_initializer(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    seed: int,
    plan: ShardingPlan | None = None,
) -> Callable[[], TrainState]:
    """The function that :func:`init_train_state` calls.

    With a ``plan`` it is one program jitted with the state's shardings as ``out_shardings``,
    so each device computes only its own shards.
    """

    def build() -> TrainState:
        # The first half of the seed's split, as when the state also held a key: a seed
        # gives the same initial parameters as it always did.
        init_key = jax.random.split(jax.random.key(seed))[0]
        params = init_params(cfg, init_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=jax.jit(optimizer.init)(params),
        )

    if plan is None:
        return build
    return jax.jit(build, out_shardings=state_shardings(jax.eval_shape(build), plan))


def state_shardings(state: TrainState, plan: ShardingPlan) -> TrainState:
    """NamedShardings for a (possibly abstract) state.

    Parameters and optimizer moments follow the plan's rules; the step is replicated.
    """
    return TrainState(
        step=plan.replicated,
        params=plan.tree_shardings(state.params),
        opt_state=plan.tree_shardings(state.opt_state),
    )


def abstract_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state, without allocating it."""
    return jax.eval_shape(lambda: init_train_state(cfg, optimizer, 0))


def batch_sharding(plan: ShardingPlan, batch_size: int, seq_len: int) -> NamedSharding:
    """Layout of [batch_size, seq_len] batch arrays: rows split over the batch axes.

    Raises:
      ValueError: ``batch_size`` is not a multiple of the number of batch shards.
    """
    if batch_size % plan.batch_shards:
        raise ValueError(
            f"batch of {batch_size} rows does not split over the mesh's batch axes "
            f"({dict(plan.mesh.shape)}: {plan.batch_shards} shards); make the batch (per "
            "micro-batch) a multiple of data * fsdp"
        )
    return plan.sharding(TOKENS, (batch_size, seq_len))


def token_loss_sum(
    cfg: ModelConfig,
    params: Params,
    batch: Batch,
    plan: ShardingPlan | None = None,
    kernels: Kernels = DEFAULT_KERNELS,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """Sum of masked next-token cross-entropies, the token count, and sparsity stats."""
    logits, stats = forward(cfg, params, batch["inputs"], plan=plan, kernels=kernels)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), (jnp.sum(mask), stats)


def accumulate_gradients(
    cfg: ModelConfig,
    params: Params,
    batch: Batch,
    grad_accum: int,
    plan: ShardingPlan | None = None,
    grad_shardings: Any = None,
    kernels: Kernels = DEFAULT_KERNELS,
) -> tuple[Params, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Mean token-loss gradient of ``batch``, taken over ``grad_accum`` micro-batches in turn.

    Token losses and their gradients are summed over the micro-batches and divided once by the
    total token count, so the result is the gradient of the whole batch's mean loss (up to
    float summation order) whatever ``grad_accum`` is.

    Args:
      cfg: the model.
      params: the parameters to differentiate at.
      batch: ``inputs``, ``targets`` and ``mask`` arrays of [grad_accum * b, T].
      grad_accum: number of micro-batches; must divide the batch's rows.
      plan: optional sharding plan of the model.
      grad_shardings: optional shardings the running gradient sum is constrained to.
      kernels: implementation of the sparse ops (:class:`sparse_jax.kernels.Kernels`).

    Returns:
      (grads, loss, count, stats): the mean gradient (a tree like ``params``), the mean token
      loss, the token count (at least 1) and per-micro-batch sparsity stats ([grad_accum, L]).
    """
    grad_fn = jax.value_and_grad(
        lambda p, mb: token_loss_sum(cfg, p, mb, plan, kernels), has_aux=True
    )
    micro = jax.tree.map(lambda a: a.reshape(grad_accum, -1, *a.shape[1:]), batch)
    if plan is not None:
        # Rows of every micro-batch split over the batch axes (a cheap shuffle of tokens).
        micro = jax.tree.map(lambda a: plan.constrain(a, (None, *TOKENS)), micro)

    def accumulate(carry, mb):
        grads, loss_sum, count = carry
        (loss, (n, stats)), g = grad_fn(params, mb)
        grads = jax.tree.map(jnp.add, grads, g)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return (grads, loss_sum + loss, count + n), stats

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss_sum, count), stats = jax.lax.scan(accumulate, init, micro)
    count = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g / count, grads), loss_sum / count, count, stats


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    grad_accum: int,
    plan: ShardingPlan | None = None,
    kernels: Kernels = DEFAULT_KERNELS,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted step; ``batch`` arrays are [grad_accum * b, T].

    With a ``plan`` the state must be laid out as :func:`init_train_state` lays it out; the
    new state comes back in the same layout and the metrics replicated.
    """
    shardings = None
    if plan is not None:
        shardings = state_shardings(abstract_train_state(cfg, optimizer), plan)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_shardings = None if shardings is None else shardings.params
        grads, loss, count, stats = accumulate_gradients(
            cfg, state.params, batch, grad_accum, plan, grad_shardings, kernels
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        # Soft-capped logits keep the loss finite after an update has already overflowed the
        # parameters, so the loss alone cannot tell the trainer a state is unfit to save.
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        metrics = {
            "loss": loss,
            "params_finite": finite,
            "grad_norm": optax.global_norm(grads),
            "tokens": count,
            "ffn_active_fraction": jnp.mean(stats["ffn_active_fraction"], axis=0),
            "attn_keys_per_query": jnp.mean(stats["attn_keys_per_query"], axis=0),
        }
        return new_state, metrics

    if plan is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, out_shardings=(shardings, plan.replicated), donate_argnums=0)


def make_eval_step(
    cfg: ModelConfig, plan: ShardingPlan | None = None, kernels: Kernels = DEFAULT_KERNELS
) -> Callable[[Params, Batch], tuple[jax.Array, jax.Array]]:
    """Jitted ``(params, batch) -> (summed loss, token count)``."""

    def evaluate(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        loss, (count, _) = token_loss_sum(cfg, params, batch, plan, kernels)
        return loss, count

    if plan is None:
        return jax.jit(evaluate)
    return jax.jit(evaluate, out_shardings=plan.replicated)
