"""TensorBoard output of the metrics writer, read back by a reader written here from the
TFRecord framing (length, masked CRC-32C of the length, record, masked CRC-32C of the record)
and TensorBoard's ``Event`` protocol buffer."""

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
from tensorboardX.proto.event_pb2 import Event

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _events(path: pathlib.Path) -> list[Event]:
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        (length_crc,) = struct.unpack_from("<I", data, at + 8)
        assert length_crc == _masked(_crc32c(data[at : at + 8]))
        record = data[at + 12 : at + 12 + length]
        (record_crc,) = struct.unpack_from("<I", data, at + 12 + length)
        assert record_crc == _masked(_crc32c(record))
        events.append(Event.FromString(record))
        at += 16 + length
    return events


def _scalars(logdir: pathlib.Path) -> dict[tuple[int, str], float]:
    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in _events(path):
            for value in event.summary.value:
                out[(event.step, value.tag)] = value.simple_value
    return out


WRITE = """
import pathlib, sys
from sparse_jax.train.metrics import MetricsWriter
with MetricsWriter(pathlib.Path(sys.argv[1]), 3, 0, True) as writer:
    writer.write(1, "train", {"loss": 2.5, "ffn_active": [0.125, 0.25]})
    writer.write(2, "eval", {"loss": float("nan"), "tokens": 64})
print("torch" in sys.modules)
"""


def test_scalars_reach_tensorboard_without_importing_torch(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", WRITE, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    if importlib.util.find_spec("torch") is not None:  # installed, yet not imported
        assert out.stdout.strip().splitlines()[-1] == "False"
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars == {
        (1, "train/loss"): 2.5,
        (1, "train/ffn_active/layer_0"): 0.125,
        (1, "train/ffn_active/layer_1"): 0.25,
        (2, "eval/tokens"): 64.0,  # the NaN loss is in metrics.jsonl only
    }
    assert np.isnan(_jsonl_loss(tmp_path, 2))


def _jsonl_loss(workdir: pathlib.Path, step: int) -> float:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r["step"] == step)
