"""sparse_jax.load: clear errors for bad paths, and a checkpoint from 8 devices loads on 1."""

import base64
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from micro_configs import MICRO_MODEL, MICRO_TRAIN
from xla_env import xla_flags

from sparse_jax.decode.sampling import GREEDY
from sparse_jax.parallel.sharding import ShardingPlan, make_mesh
from sparse_jax.serve.loading import load
from sparse_jax.serve.textgen import TextGenerator
from sparse_jax.train.checkpoint import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESH = "fsdp=4,tensor=2"
PROMPTS = ["And the LORD said", "Let there be"]  # one length: one compilation
TRAIN = [
    *(t for t in MICRO_TRAIN if t.split("=")[0] not in ("steps", "checkpoint_every")),
    "steps=30",
    "checkpoint_every=30",
]
# Runs in a fresh process with one device: the loaded parameters and greedy text.
ONE_DEVICE = """
import json, sys
import jax, numpy as np
from sparse_jax.serve.loading import load
from sparse_jax.decode.sampling import GREEDY
from sparse_jax.serve.textgen import TextGenerator
model = load(sys.argv[1])
leaves = jax.tree_util.tree_leaves_with_path(model.params)
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
generator = TextGenerator(model)
texts = [generator.complete(p, max_tokens=12, sampler=GREEDY).text for p in sys.argv[3:]]
print(json.dumps({"devices": jax.device_count(), "step": model.step, "texts": texts}))
"""


def _env(devices):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sharded")
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), "--mesh", MESH]
    out = subprocess.run(
        [*cmd, "--set", *MICRO_MODEL, *TRAIN],
        cwd=ROOT,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return workdir


def test_a_checkpoint_written_on_8_devices_generates_the_same_text_on_1(sharded_run, tmp_path):
    shardings = json.loads((sharded_run / "checkpoints/30/state/_sharding").read_text())
    saved = {base64.b64decode(k).decode(): json.loads(v) for k, v in shardings.items()}
    embedding = saved["params.embedder.embedding"]
    assert embedding["shape"] == [1, 4, 2] and embedding["partition_spec"]  # really sharded
    plan = ShardingPlan(make_mesh(MESH))
    model = load(sharded_run, shardings=plan.tree_shardings)  # this process has 8 devices
    assert len(model.params["embedder"]["embedding"].sharding.device_set) == 8
    generator = TextGenerator(model)
    want = [generator.complete(p, max_tokens=12, sampler=GREEDY).text for p in PROMPTS]
    npz = tmp_path / "params.npz"
    out = subprocess.run(
        [sys.executable, "-c", ONE_DEVICE, str(sharded_run), str(npz), *PROMPTS],
        cwd=ROOT,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"devices": 1, "step": 30, "texts": want}
    arrays = np.load(npz)
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        np.testing.assert_array_equal(arrays[jax.tree_util.keystr(path)], np.asarray(leaf))


def test_loading_puts_parameters_on_one_device_by_default(sharded_run):
    model = load(sharded_run / "checkpoints")
    assert model.step == 30 and model.path == sharded_run / "checkpoints" / "30"
    devices = {d for x in jax.tree.leaves(model.params) for d in x.sharding.device_set}
    assert devices == {jax.local_devices()[0]}
    assert model.tokenizer.vocab_size == model.config.vocab_size


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint path .*nowhere does not exist"):
        load(tmp_path / "nowhere")


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        load(tmp_path / "model.bin")


def test_a_directory_without_a_checkpoint_says_what_is_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)  # a step with no meta/ or state/
    with pytest.raises(CheckpointError, match=r"holds no complete sparse_jax checkpoint.*meta/"):
        load(tmp_path)


def _copy_step(sharded_run, tmp_path, name="30"):
    target = tmp_path / "run" / "checkpoints" / name
    shutil.copytree(sharded_run / "checkpoints" / "30", target)
    return target


def test_an_unfinished_save_is_reported_as_partial(sharded_run, tmp_path):
    _copy_step(sharded_run, tmp_path, "30.orbax-checkpoint-tmp-1700000000")
    with pytest.raises(CheckpointError, match=r"only unfinished saves: \['30.orbax-checkpoint"):
        load(tmp_path / "run")


def _array_files(step):
    return [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_step_with_missing_array_files_is_unreadable(sharded_run, tmp_path):
    step = _copy_step(sharded_run, tmp_path)
    for path in _array_files(step):
        path.unlink()
    with pytest.raises(CheckpointError, match=r"step 30: parameters: NOT_FOUND reading state/"):
        load(tmp_path / "run")


def test_a_damaged_newest_step_falls_back_to_the_older_one_with_one_warning(
    sharded_run, tmp_path, caplog
):
    older = _copy_step(sharded_run, tmp_path, "20")
    meta = older / "meta" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": 20}))
    for path in _array_files(_copy_step(sharded_run, tmp_path, "30")):
        _truncate(path)
    model = load(tmp_path / "run")
    assert model.step == 20 and model.path == older
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "\n" not in warning and "tensorstore_spec" not in warning
    assert warning.startswith("skipped damaged checkpoint step 30 (parameters: OUT_OF_RANGE ")
    assert "reading state/" in warning and warning.endswith("loaded step 20")


@pytest.mark.parametrize(
    ("damaged", "named"),
    [
        ("arrays", r"parameters: OUT_OF_RANGE reading state/(ocdbt\.process_0/)?d/[0-9a-f]+: "),
        ("tree metadata", r"files: state/_METADATA is not valid JSON \("),
    ],
    ids=["arrays", "tree-metadata"],
)
def test_an_unreadable_step_is_one_short_line_naming_the_step_and_file(
    sharded_run, tmp_path, damaged, named
):
    step = _copy_step(sharded_run, tmp_path)
    for path in _array_files(step) if damaged == "arrays" else [step / "state" / "_METADATA"]:
        _truncate(path)
    message = rf"no readable checkpoint in \S+/30: step 30: {named}"
    with pytest.raises(CheckpointError, match=message):
        load(step)
    with pytest.raises(CheckpointError) as err:
        load(tmp_path / "run")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400, str(err.value)


def test_a_step_without_its_parameters_is_not_a_checkpoint(sharded_run, tmp_path):
    step = _copy_step(sharded_run, tmp_path)
    shutil.rmtree(step / "state")
    with pytest.raises(CheckpointError, match="holds no complete sparse_jax checkpoint"):
        load(tmp_path / "run")


def test_metadata_of_another_format_is_refused(sharded_run, tmp_path):
    step = _copy_step(sharded_run, tmp_path)
    meta = step / "meta" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": "other/9"}))
    with pytest.raises(CheckpointError, match="is not a sparse_jax checkpoint"):
        load(step)
