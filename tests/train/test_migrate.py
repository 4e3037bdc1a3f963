"""Checkpoints of format 1 (written by the previous layout's code) load and resume.

``tests/golden/checkpoint_format1`` was written by ``train.py`` of the format-1 code with the
settings below (4 steps); ``logits.npz`` holds that code's forward logits of its step 4 on
fixed tokens, and ``resumed.json`` the losses that code logged when resuming the same
checkpoint to 6 steps.
"""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_VS_F64

from sparse_jax import forward, load
from sparse_jax.decode.generate import generate
from sparse_jax.parallel.sharding import ShardingPlan, make_mesh
from sparse_jax.train import migrate
from sparse_jax.train.checkpoint import Checkpointer, CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "checkpoint_format1"
SETTINGS = [
    "vocab_size=512",
    "model_dim=32",
    "num_layers=2",
    "num_heads=4",
    "num_kv_heads=2",
    "head_dim=16",
    "ffn_dim=96",
    "attn_top_k=8",
    "max_seq_len=32",
    "sliding_window=16",
    "data.batch_size=4",
    "data.seq_len=32",
    "log_every=1",
    "eval_every=2",
    "checkpoint_every=2",
    "data.eval_batches=1",
]


def _digest(directory: pathlib.Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _copy(tmp_path: pathlib.Path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(GOLDEN / "checkpoints", workdir / "checkpoints")
    return workdir


def test_format1_checkpoint_gives_the_logits_of_the_code_that_wrote_it(tmp_path):
    workdir = _copy(tmp_path)
    before = _digest(workdir)
    model = load(workdir / "checkpoints")
    assert model.step == 4
    golden = np.load(GOLDEN / "logits.npz")
    logits, _ = forward(model.config, model.params, jnp.asarray(golden["tokens"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], **F32_VS_F64)
    # Decoding (cache, sparse path) runs on the converted weights too.
    out = generate(model.config, model.params, [golden["tokens"][0, :6].tolist()], max_new_tokens=3)
    assert len(out.tokens[0]) == 3
    assert _digest(workdir) == before  # reading never rewrites the files


def test_format1_checkpoint_loads_sharded(tmp_path):
    plan = ShardingPlan(make_mesh("data=2,fsdp=2,tensor=2"))
    whole = load(GOLDEN / "checkpoints")
    split = load(GOLDEN / "checkpoints", shardings=plan.tree_shardings)
    want = plan.tree_shardings(split.params)
    for got, ref, sharding in zip(
        jax.tree.leaves(split.params),
        jax.tree.leaves(whole.params),
        jax.tree.leaves(want),
        strict=True,
    ):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("leaf", ["wq", "wo", "k1", "w_down"])
def test_format1_targets_invert_the_conversion(leaf):
    path = (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey(leaf))
    perm = migrate.PERMUTATIONS[leaf]
    old_shape = (2, *(3 + i for i in range(len(perm))))  # a leading layer axis
    old = jnp.arange(np.prod(old_shape), dtype=jnp.float32).reshape(old_shape)
    new = migrate.from_format1({"layers": {leaf: old}})["layers"][leaf]
    target = migrate.format1_targets({"layers": {leaf: jax.ShapeDtypeStruct(new.shape, new.dtype)}})
    assert target["layers"][leaf].shape == old_shape
    # Today's axis i holds format 1's axis perm[i] (after the layer axis).
    assert new.shape == (2, *(old_shape[1 + a] for a in perm))
    np.testing.assert_array_equal(new, jnp.transpose(old, (0, *(1 + a for a in perm))))
    assert migrate._leaf_permutation(path, len(old_shape)) is not None


def test_training_resumes_a_format1_checkpoint_as_the_old_code_did(tmp_path):
    workdir = _copy(tmp_path)
    old_step = workdir / "checkpoints" / "4"
    before = _digest(old_step)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", str(workdir)]
    out = subprocess.run(
        [*cmd, "--set", *SETTINGS, "steps=6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "format sparse_jax/1: converted to sparse_jax/2" in out.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    got = {f"{r['step']}/{r['kind']}": r["loss"] for r in rows if r["step"] > 4}
    want = json.loads((GOLDEN / "resumed.json").read_text())["losses"]
    assert got.keys() == want.keys()
    # Bit-equal on the CPU that wrote the golden losses; rtol 1e-4 leaves room for another
    # CPU's last bits after two steps (a layout error moves the loss by far more).
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4)
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        assert ckpt.read_meta(6)["format"] == migrate.FORMAT
    assert _digest(old_step) == before


def test_an_unknown_format_is_refused_and_left_in_place(tmp_path):
    workdir = _copy(tmp_path)
    meta = workdir / "checkpoints" / "4" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace("sparse_jax/1", "sparse_jax/9"))
    with pytest.raises(CheckpointError, match="sparse_jax/9"):
        load(workdir / "checkpoints" / "4")
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        with pytest.raises(CheckpointError, match="sparse_jax/9"):
            ckpt.read_meta(4)
    assert (workdir / "checkpoints" / "4").is_dir()
