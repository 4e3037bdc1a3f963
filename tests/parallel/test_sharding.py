"""Sharding rules on 8 CPU devices: mesh strings, the golden parameter layout, sharded state
creation, and the collectives of the tensor-parallel Spark FFN (no all-gather of activations).

Regenerate the golden listings after an intended change of the rules with
``PYTHONPATH=tests python tests/parallel/test_sharding.py``.
"""

import collections
import importlib.util
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro_configs import MICRO_MODEL_GQA
from tolerances import SHARDED

from configs import get_model_config
from sparse_jax.kernels import Kernels
from sparse_jax.model.config import override
from sparse_jax.model.ffn import SparkFFN
from sparse_jax.model.transformer import abstract_params, forward, init_params
from sparse_jax.parallel.sharding import (
    RESIDUAL,
    TOKENS,
    ShardingPlan,
    ShardingRules,
    describe_shardings,
    make_mesh,
    mesh_shape,
    parse_mesh,
)
from sparse_jax.train.config import TrainConfig
from sparse_jax.train.optim import make_optimizer
from sparse_jax.train.step import (
    abstract_train_state,
    batch_sharding,
    init_train_state,
    state_initializer,
    state_shardings,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
GOLDEN_MESH = {"data": 2, "fsdp": 2, "tensor": 2}
PRESETS = ("tiny", "tiny_dense")


def _listing(preset: str) -> str:
    return describe_shardings(
        abstract_params(get_model_config(preset)), ShardingRules(), GOLDEN_MESH
    )


def test_mesh_strings():
    assert parse_mesh("data=2, fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh_shape("", 8) == (8, 1, 1)
    assert mesh_shape("tensor=2", 8) == (4, 1, 2)
    assert mesh_shape("fsdp=-1,tensor=2", 8) == (1, 4, 2)
    for bad, message in [
        ("model=2", "AXIS=SIZE"),
        ("data=two", "integer >= 1 or -1"),
        ("data=0", "integer >= 1 or -1"),
        ("data=2,data=4", "given twice"),
        ("data=-1,tensor=-1", "at most one"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="spans 4 devices but 8 are available"):
        mesh_shape("data=2,tensor=2", 8)
    with pytest.raises(ValueError, match="do not divide"):
        mesh_shape("tensor=3", 8)
    with pytest.raises(ValueError, match=r"TrainConfig.mesh='dat=2' is invalid"):
        TrainConfig(mesh="dat=2")


@pytest.mark.parametrize("preset", PRESETS)
def test_param_shardings_match_golden_listing(preset):
    want = (GOLDEN / f"param_shardings_{preset}.txt").read_text()
    assert _listing(preset) == want, (
        "rules changed: rerun PYTHONPATH=tests python tests/parallel/test_sharding.py"
    )


def test_unknown_parameter_and_indivisible_dims():
    rules = ShardingRules()
    with pytest.raises(ValueError, match="no logical axes declared"):
        describe_shardings({"blocks": {"gate": jnp.zeros((4, 4))}}, rules, GOLDEN_MESH)
    # 2 kv heads cannot split 4 ways: that dimension stays replicated.
    sizes = {"data": 1, "fsdp": 1, "tensor": 4}
    assert rules.spec(("embed", "kv_heads", "head_dim"), (32, 2, 16), sizes) == jax.P()
    assert rules.spec(("embed", "heads", "head_dim"), (32, 4, 16), sizes) == jax.P(None, "tensor")


def test_train_state_is_created_sharded():
    cfg = override(get_model_config("tiny"), MICRO_MODEL_GQA)
    optimizer = make_optimizer(TrainConfig(warmup_steps=0))
    plan = ShardingPlan(make_mesh("data=2,fsdp=2,tensor=2"))
    state = init_train_state(cfg, optimizer, 0, plan)
    want = state_shardings(state, plan)
    for array, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
        assert array.sharding == sharding
    k1 = state.params["layers"]["ffn"]["k1"]
    assert k1.addressable_shards[0].data.shape == (2, 48, 8)  # [L, F/tensor, R/fsdp]
    mu = state.opt_state[1][0].mu["layers"]["ffn"]["k1"]
    assert mu.sharding == k1.sharding
    reference = init_train_state(cfg, optimizer, 0)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_device_materializes_a_whole_state():
    cfg = get_model_config("tiny")
    optimizer = make_optimizer(TrainConfig())
    plan = ShardingPlan(make_mesh("data=2,fsdp=2,tensor=2"))
    total = sum(
        a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract_train_state(cfg, optimizer))
    )
    memory = state_initializer(cfg, optimizer, 0, plan).lower().compile().memory_analysis()
    # Weights and moments split 4 ways (fsdp x tensor): a device's outputs are about a
    # quarter of the state, and with its scratch space it never holds half.
    assert memory.output_size_in_bytes < total / 3
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < total / 2


def test_batch_that_does_not_split_is_a_clear_error():
    plan = ShardingPlan(make_mesh("data=4,tensor=2"))
    with pytest.raises(ValueError, match="does not split over the mesh's batch axes"):
        batch_sharding(plan, 6, 16)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mesh", "data=3"], "spans 3 devices but 8 are available"),
        (["--mesh", "data=2,model=4"], "AXIS=SIZE with AXIS one of"),
        (["--mesh", "data=8", "--set", "batch_size=4"], "does not split over the mesh's batch"),
        (["--coordinator", "127.0.0.1:1234"], "must be given together"),
    ],
)
def test_cli_rejects_bad_mesh_and_process_flags(tmp_path, flags, message, capsys, restore_logging):
    # train.py's main in this process (8 devices); the training tests run the script itself.
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    status = script.main(["--workdir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err


COLLECTIVE = re.compile(
    r"= (?P<shape>\(.*?\)|\S+) (?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\("
)


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, operand shapes) of every collective in compiled HLO text."""
    found = []
    for match in COLLECTIVE.finditer(hlo):
        shapes = [
            tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match["shape"])
        ]
        found.append((match["op"], shapes))
    return found


# The Pallas variant is slow: the whole-model test below runs the Pallas path under TP.
@pytest.mark.parametrize(
    "implementation", ["xla", pytest.param("pallas_tpu", marks=pytest.mark.slow)]
)
def test_tensor_parallel_spark_ffn_reduces_moments_and_never_gathers_activations(implementation):
    cfg = override(get_model_config("tiny"), MICRO_MODEL_GQA)
    plan = ShardingPlan(make_mesh("tensor=8"))
    b, t, d, r = 4, 16, cfg.model_dim, cfg.ffn_predictor_dim
    kernels = Kernels()
    if implementation != "xla":
        # The Pallas path with the plan's rules, as Transformer(cfg, plan, kernels) sets it.
        kernels = Kernels(
            implementation,
            interpret=True,
            mesh=plan.mesh,
            batch_axes=plan.rules.mesh_axes("batch"),
            rules=plan.rules,
        )
    ffn = SparkFFN(cfg, kernels)
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    params = ffn.init(jax.random.key(1), x, True)["params"]
    params = jax.device_put(params, plan.tree_shardings({"ffn": params})["ffn"])
    assert params["k1"].addressable_shards[0].data.shape == (cfg.ffn_dim // 8, r)

    def forward(p, x):
        y, active, _ = ffn.apply({"params": p}, x, True)
        return plan.constrain(y, RESIDUAL), active

    def loss(p, x):
        return jnp.sum(jnp.sin(forward(p, x)[0]))

    fwd = collectives(jax.jit(forward).lower(params, x).compile().as_text())
    grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    bwd = collectives(grad)
    # Forward: the two moments per token, one pass each (the sum, then the centred sum of
    # squares), and the down projection's partial sums; the backward adds the moments'
    # cotangent and the input gradient.
    moments = [c for c in fwd if c[0] == "all-reduce" and c[1] in ([(b, t)], [(b, t, 1)])]
    assert len(moments) == 2, fwd
    allowed = {(), (b, t), (b, t, 1), (b, t, d), (b, t, r), (b, t, d - r)}
    for op, shapes in fwd + bwd:
        assert op == "all-reduce", (op, shapes)
        assert set(shapes) <= allowed, shapes
    np.testing.assert_allclose(
        jax.jit(forward)(params, x)[0],
        ffn.apply({"params": jax.device_get(params)}, x, True)[0],
        **SHARDED,
    )


def test_tensor_parallel_model_moves_no_ffn_activation_and_the_kernels_move_nothing_more():
    cfg = override(get_model_config("tiny"), MICRO_MODEL_GQA)
    plan = ShardingPlan(make_mesh("data=2,tensor=4"))
    params = init_params(cfg, jax.random.key(0), plan=plan)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    tokens = jax.device_put(tokens, plan.sharding(TOKENS, tokens.shape))
    single = jax.jit(lambda p, t: forward(cfg, p, t)[0])
    want = single(jax.device_get(params), jax.device_get(tokens))
    found = {}
    for implementation in ("xla", "pallas_tpu"):
        kernels = Kernels(implementation, interpret=implementation != "xla")

        def logits(p, tokens, kernels=kernels):
            return forward(cfg, p, tokens, plan=plan, kernels=kernels)[0]

        def loss(p, tokens, logits=logits):
            return jnp.sum(jnp.sin(logits(p, tokens)))

        if implementation != "xla":
            # The Pallas kernels run per shard, operands split by the plan's rules.
            program = str(jax.make_jaxpr(logits)(params, tokens))
            assert "pallas_call" in program and "shard_map" in program
        fwd = collectives(jax.jit(logits).lower(params, tokens).compile().as_text())
        bwd = collectives(jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text())
        assert all(op == "all-reduce" for op, _ in fwd), fwd
        widths = {cfg.ffn_dim, cfg.ffn_dim // 4}
        for op, shapes in fwd + bwd:
            for shape in shapes:
                # Activations start [B / data, T]; none of them may carry the FFN width.
                assert shape[:2] != (4, 16) or not widths & set(shape[2:]), (op, shape)
        # Each operand moved, by op, without unit axes (the per-shard moments keep a trailing
        # axis of 1; XLA combines all-reduces into tuples differently around custom calls).
        found[implementation] = tuple(
            collections.Counter(
                (op, tuple(n for n in sh if n != 1)) for op, shapes in c for sh in shapes
            )
            for c in (fwd, bwd)
        )
        np.testing.assert_allclose(jax.jit(logits)(params, tokens), want, **SHARDED)
    # Forward: the kernels move exactly what the XLA path moves (the FFN moments are two
    # per-token scalars). Backward: nothing gathered that XLA does not gather; the reference
    # VJP of the attention mask may add a reduction of one [B, T, S] block, never one that
    # carries the heads or the FFN width.
    assert found["pallas_tpu"][0] == found["xla"][0]
    extra = found["pallas_tpu"][1] - found["xla"][1]
    assert all(op == "all-reduce" and len(shape) <= 3 for op, shape in extra), extra
    assert not any(widths & set(shape) for _, shape in extra), extra


if __name__ == "__main__":
    for name in PRESETS:
        (GOLDEN / f"param_shardings_{name}.txt").write_text(_listing(name))
    sys.exit(0)
