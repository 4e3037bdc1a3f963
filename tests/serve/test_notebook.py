"""notebooks/quickstart.ipynb runs end to end, in a real kernel, on a checkpoint trained here."""

import json
import pathlib
import sys

import nbclient
import nbformat
import pytest
from jupyter_client.manager import KernelManager

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNEL = "sparse-jax-test"


@pytest.fixture(scope="module")
def checkpoint(served_checkpoint):
    return served_checkpoint


@pytest.fixture
def kernel_on_this_python(tmp_path, monkeypatch):
    """A kernel spec that starts ipykernel with this interpreter (the venv's python)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": KERNEL, "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_quickstart_generates_text_and_plots_sparsity(
    checkpoint, kernel_on_this_python, monkeypatch, tmp_path
):
    monkeypatch.setenv("SPARSE_JAX_CHECKPOINT", str(checkpoint))
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    # IPC sockets in a temporary directory: the kernel opens no network port.
    manager = KernelManager(
        kernel_name=kernel_on_this_python, transport="ipc", ip=str(tmp_path / "kernel")
    )
    client = nbclient.NotebookClient(
        notebook, km=manager, timeout=300, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{checkpoint}/checkpoints/60 (step 60)" in text
    assert "greedy:  In the beginning" in text and "sampled: In the beginning" in text
    assert text.count("FFN active") == 2  # one line per layer
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1
