"""serve.py from the command line: one prompt to the terminal, and the server with an API key."""

import os
import pathlib
import signal
import subprocess
import sys

import httpx
import portpicker
import pytest
from test_serve import PROMPTS, train_checkpoint, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("serve_cli"))


def _serve(checkpoint, *args, **kwargs):
    cmd = [sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint), *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def test_one_prompt_streams_to_the_terminal(checkpoint):
    proc = _serve(checkpoint, "--prompt", PROMPTS[0], "--max-tokens", "5", "--stop", "zzzz")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and output.startswith(PROMPTS[0]), output


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = _serve(tmp_path / "nowhere", "--prompt", "x")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "does not exist" in output, output


def _healthy(url, proc):
    assert proc.poll() is None, proc.stdout.read()
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_server_on_loopback_with_an_api_key_from_the_environment(checkpoint):
    port = portpicker.pick_unused_port()
    env = {**os.environ, "SPARSE_JAX_API_KEY": "secret-key"}
    proc = _serve(checkpoint, "--port", str(port), "--slots", "2", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url, proc), timeout=120)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        auth = {"Authorization": "Bearer secret-key"}
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4}
        got = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60).json()
        assert got["object"] == "text_completion" and got["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal
    assert f"serving 'tiny' (step 60) on http://127.0.0.1:{port}" in output, output
