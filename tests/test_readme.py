"""The README's Python blocks run as written, in order, as a reader pasting them would.

A checkpoint of the tiny preset's shape (few steps) stands at ``runs/tiny`` in a scratch
directory, the blocks run there in one namespace, and the OpenAI-client block runs against
the real server on that checkpoint (its port swapped for a free one). The chat-client block
runs against a server on a tiny random Gemma-2 imported from transformers.
"""

import contextlib
import io
import pathlib
import re
import subprocess
import sys

import pytest
from micro_configs import MICRO_TRAIN
from serve_cases import serving

from sparse_jax.serve.app import ServerSettings, create_app
from sparse_jax.serve.engine import Engine
from sparse_jax.serve.loading import load

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
README_PORT = "127.0.0.1:8000"


def readme_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def _is_client(block: str) -> bool:
    return "OpenAI(" in block and not _is_chat(block)


def _is_chat(block: str) -> bool:
    return "OpenAI(" in block and "chat.completions" in block


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A tiny random Gemma-2 built with transformers and imported (the chat block's model)."""
    pytest.importorskip("torch")
    from hf_models import hf_model, save_hf

    from sparse_jax.hf import import_checkpoint

    root = tmp_path_factory.mktemp("gemma")
    model = hf_model(seed=3, max_position_embeddings=128)
    import_checkpoint(save_hf(model, root / "hf"), root / "run")
    return load(root / "run")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory holding ``runs/tiny``: the tiny preset trained for a few steps."""
    root = tmp_path_factory.mktemp("readme")
    train = [t for t in MICRO_TRAIN if t.split("=")[0] not in ("steps", "checkpoint_every")]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny"]
    cmd += ["--workdir", str(root / "runs" / "tiny")]
    cmd += ["--set", *train, "steps=4", "checkpoint_every=4", "seq_len=64"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return root


def test_the_readme_has_the_blocks_this_test_runs():
    blocks = readme_blocks()
    assert len(blocks) >= 4
    assert sum(_is_client(b) for b in blocks) == 1
    assert sum(_is_chat(b) for b in blocks) == 1


def test_python_blocks_run_in_order(scratch, gemma, monkeypatch):
    monkeypatch.chdir(scratch)
    monkeypatch.syspath_prepend(str(ROOT))  # `from configs import ...`, as from a clone
    namespace: dict = {}
    printed = io.StringIO()

    def run(block: str) -> None:
        with contextlib.redirect_stdout(printed):
            exec(compile(block, "README.md", "exec"), namespace)

    def against_server(block: str, loaded, name: str) -> None:
        settings = ServerSettings(model_name=name, api_key="KEY")
        engine = Engine(loaded.config, loaded.params, slots=1)
        with serving(create_app(engine, loaded.tokenizer, settings)) as url:
            run(block.replace(README_PORT, url.removeprefix("http://")))

    for block in readme_blocks():
        if _is_chat(block):
            against_server(block, gemma, "gemma2")
            assert namespace["reply"].choices[0].message.role == "assistant"
        elif _is_client(block):
            against_server(block, load(scratch / "runs" / "tiny"), "tiny")
        else:
            run(block)
    assert namespace["logits"].shape[-1] == namespace["cfg"].vocab_size
    assert namespace["prompt_ids"][0] == namespace["model"].tokenizer.bos_id
    assert len(namespace["out"].tokens[0]) == 40
    assert printed.getvalue().strip()
