"""serve.py from the command line: one prompt to the terminal, the server, and bad options."""

import importlib.util
import os
import pathlib
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_cases import PROMPTS

from sparse_jax.serve.listen import bind, url

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("serve_cli", ROOT / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)


@pytest.fixture(scope="module")
def checkpoint(served_checkpoint):
    return served_checkpoint


def _serve(checkpoint, *args, **kwargs):
    cmd = [sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint), *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "port 70000 is invalid: use 1 to 65535, or 0 for any free port"),
        (["--port", "-1"], "port -1 is invalid"),
        (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens: '0' is invalid"),
        (["--prompt", "hi", "--kernels", "triton"], "--kernels: invalid choice: 'triton'"),
        (["--prompt", "hi", "--slots", "2"], "--slots applies only to the server"),
        (["--temperature", "0.5"], "--temperature applies only to --prompt"),
    ],
    ids=["port_high", "port_negative", "max_tokens", "kernels", "slots", "temperature"],
)
def test_bad_options_exit_2_before_anything_runs(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        serve.parse_args(["--checkpoint", str(tmp_path), *args])
    out = capsys.readouterr()
    assert exited.value.code == 2 and message in out.err and out.out == "", out


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--api-key", ""], None, "--api-key is empty"),
        (["--api-key", "  "], None, "--api-key is empty"),
        (["--api-key", "key "], None, "--api-key starts or ends with whitespace"),
        ([], "", "$SPARSE_JAX_API_KEY is empty"),
    ],
    ids=["empty", "blank", "padded", "empty_env"],
)
def test_an_empty_api_key_is_refused_before_loading(tmp_path, monkeypatch, args, env, message):
    if env is not None:
        monkeypatch.setenv(serve.API_KEY_ENV, env)
    args = serve.parse_args(["--checkpoint", str(tmp_path / "nowhere"), "--port", "0", *args])
    with pytest.raises(ValueError, match=re.escape(message)):
        serve.run_server(args)


def test_a_port_in_use_is_refused_before_loading(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        args = serve.parse_args(["--checkpoint", str(tmp_path / "nowhere"), "--port", str(port)])
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            serve.run_server(args)


def test_port_0_binds_a_free_port_and_the_url_names_it():
    with bind("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        assert port > 0 and url(sock) == f"http://127.0.0.1:{port}"


def test_one_prompt_streams_to_the_terminal(checkpoint):
    args = [
        "--prompt",
        PROMPTS[0],
        "--max-tokens",
        "5",
        "--stop",
        "zzzz",
        "--decode-path",
        "sparse",
    ]
    proc = _serve(checkpoint, *args)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and output.startswith(PROMPTS[0]), output


def _main(capsys, *args):
    """serve.py's main in this process: (exit status, stdout + stderr)."""
    status = serve.main(list(map(str, args)))
    out = capsys.readouterr()
    return status, out.out + out.err


def test_the_kernel_choice_reaches_the_decode_path(checkpoint, capsys, restore_logging):
    # A GPU kernel on this CPU-only machine must fail cleanly, which shows the option is used.
    status, output = _main(
        capsys,
        *("--checkpoint", checkpoint, "--prompt", PROMPTS[0], "--max-tokens", "4"),
        *("--kernels", "pallas_gpu"),
    )
    assert status == 2 and "needs the 'gpu' backend" in output, output
    assert PROMPTS[0] not in output and "Traceback" not in output


def test_a_prompt_that_cannot_be_served_prints_only_the_error(checkpoint, capsys, restore_logging):
    prompt = "the word " * 40  # context 64
    args = ("--checkpoint", checkpoint, "--prompt", prompt, "--max-tokens", "4")
    status, output = _main(capsys, *args)
    assert status == 2 and "exceeds the model's context of 64" in output, output
    assert prompt not in output


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    # The script itself: exit status and output of a real process.
    proc = _serve(tmp_path / "nowhere", "--prompt", "x")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "does not exist" in output, output


class _Lines:
    """Collects a process's output lines on a thread, so that a wait can time out."""

    def __init__(self, proc):
        self.lines, self._queue = [], queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            assert line is not None, "".join(self.lines)
            self.lines.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no {pattern!r} in:\n" + "".join(self.lines))

    def rest(self):
        self._thread.join(timeout=60)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return "".join(self.lines)


def test_server_on_loopback_with_an_api_key_from_the_environment(checkpoint):
    env = {**os.environ, "SPARSE_JAX_API_KEY": "secret-key"}
    proc = _serve(checkpoint, "--port", "0", "--slots", "2", env=env)
    lines = _Lines(proc)
    try:
        found = lines.until(r"serving 'tiny' \(step 60\) on (http://127\.0\.0\.1:(\d+))$", 180)
        url, port = found.group(1), int(found.group(2))
        compiled = [line for line in lines.lines if "compiled " in line]
        assert compiled and re.search(r"compiled 1/\d+: prefill", compiled[0]), lines.lines
        assert port != 0 and httpx.get(f"{url}/health").json() == {"status": "ok"}
        auth = {"Authorization": "Bearer secret-key"}
        assert httpx.get(f"{url}/health", headers=auth).json()["slots"] == 2
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4}
        got = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60).json()
        assert got["object"] == "text_completion" and got["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    output = lines.rest()
    assert proc.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal
    assert "no API key" not in output, output
