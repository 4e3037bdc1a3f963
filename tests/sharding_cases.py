"""Shared by the sharded-equals-single-device tests: a small model, a batch, and the check.

The step uses SGD with momentum: its update is linear in the gradient, so parameters agree to
the gradients' tolerance. (One AdamW step moves every weight by about the learning rate times
the sign of its gradient, which summation order can flip where a gradient is ~0.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from micro_configs import MICRO_MODEL_GQA
from tolerances import SHARDED, SHARDED_LOGITS

from configs import get_model_config
from sparse_jax.model.config import override
from sparse_jax.model.transformer import forward
from sparse_jax.parallel.sharding import ShardingPlan, make_mesh
from sparse_jax.train.step import batch_sharding, init_train_state, make_train_step, state_shardings

CFG = override(get_model_config("tiny"), MICRO_MODEL_GQA)
ROWS, SEQ, GRAD_ACCUM = 16, 16, 2
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


def batch():
    tokens = jax.random.randint(jax.random.key(1), (ROWS, SEQ + 1), 0, CFG.vocab_size)
    mask = jnp.ones((ROWS, SEQ), jnp.float32).at[0, :5].set(0.0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def forward_and_step(plan):
    """Jitted (state, batch) -> (logits, new state, metrics), one compile."""
    step = make_train_step(CFG, OPTIMIZER, GRAD_ACCUM, plan)

    def both(state, batch):
        logits, _ = forward(CFG, state.params, batch["inputs"], plan=plan)
        return (logits, *step(state, batch))

    return jax.jit(both)


def initial_state():
    return init_train_state(CFG, OPTIMIZER, 0)


def single_device_result(state):
    return jax.device_get(forward_and_step(None)(state, batch()))


def check_sharded_equals_single_device(mesh, num_devices, state, reference):
    """Runs the forward and one step on ``mesh`` and compares every output with ``reference``."""
    plan = ShardingPlan(make_mesh(mesh, jax.devices()[:num_devices]))
    state = jax.device_put(state, state_shardings(state, plan))
    sharded_batch = jax.device_put(batch(), batch_sharding(plan, ROWS, SEQ))
    logits, new_state, metrics = forward_and_step(plan)(state, sharded_batch)
    want_logits, want_state, want_metrics = reference
    np.testing.assert_allclose(logits, want_logits, **SHARDED_LOGITS)
    for key in ("loss", "grad_norm", "tokens", "ffn_active_fraction", "attn_keys_per_query"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], **SHARDED, err_msg=key)
    paths = jax.tree_util.tree_leaves_with_path(want_state)
    for (path, want), got in zip(paths, jax.tree.leaves(new_state), strict=True):
        np.testing.assert_allclose(got, want, **SHARDED, err_msg=jax.tree_util.keystr(path))
    wq = new_state.params["layers"]["attn"]["wq"]
    assert wq.sharding == state_shardings(new_state, plan).params["layers"]["attn"]["wq"]


# The micro model (as in test_training) with a bigger batch and no evals or checkpoints.
MICRO_TRAIN = [
    "data.batch_size=8",
    "data.seq_len=32",
    "log_every=1",
    "eval_every=100",
    "checkpoint_every=100",
    "data.eval_batches=1",
]
