"""Peak host memory and time of the Hugging Face import and export at the Gemma-2 2B shape.

Writes a random ``Gemma2ForCausalLM`` directory of the ``gemma2_2b`` preset's shape (config
through :func:`sparse_jax.hf.config_to_hf`, tensors written shard by shard as
``save_pretrained`` lays them out, with ``model.safetensors.index.json``, and a tokenizer of
256000 pieces), then runs ``python -m sparse_jax.hf import`` and ``export`` each in a child
process and reads the child's peak resident memory (``getrusage(RUSAGE_CHILDREN)``, the child
being the only one). The report sets it against the model's bytes and its largest tensor (the
256000 x 2304 embedding): a streaming import holds one copy of the model plus the tensor being
read; a naive one (every tensor read into a dict, then converted) holds two. The exported
tensors are checked bitwise against the originals.

    python -m benchmarks.hf_convert [--dtype float32|bfloat16] [--dir DIR]

``--dir`` needs about three times the model's bytes free (about 31 GB in float32). Results go
to ``benchmarks/results/hf_convert.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from benchmarks.train_step import cpu_model
from configs import get_model_config
from sparse_jax.hf import config_to_hf
from sparse_jax.hf.tensors import tensors

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
SHARD_BYTES = 4 << 30  # google/gemma-2-2b's shards are about 4.6 GB


def gemma_tokenizer_bytes(vocab_size: int) -> bytes:
    """A SentencePiece model of ``vocab_size`` pieces in Gemma's id layout, built piece by piece
    (training one that large would take minutes and need far more text)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    specials = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)]
    specials += [("<start_of_turn>", 4), ("<end_of_turn>", 4)]
    for piece, kind in specials:
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    for byte in range(256):
        proto.pieces.add(piece=f"<0x{byte:02X}>", score=0.0, type=6)
    for n in range(vocab_size - len(proto.pieces)):
        proto.pieces.add(piece=f"▁p{n}", score=-float(n), type=1)
    spec = proto.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.BPE
    spec.vocab_size = vocab_size
    spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id = 0, 1, 2, 3
    spec.pad_piece, spec.eos_piece, spec.bos_piece = "<pad>", "<eos>", "<bos>"
    spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    return proto.SerializeToString()


def write_random_hf(directory: pathlib.Path, dtype: str, seed: int = 0) -> dict:
    """A random HF directory of the ``gemma2_2b`` shape; returns its sizes."""
    cfg = get_model_config("gemma2_2b")
    config = config_to_hf(cfg, {"pad": 0, "eos": 1, "bos": 2})
    config["dtype"] = dtype
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.model").write_bytes(gemma_tokenizer_bytes(cfg.vocab_size))
    rng = np.random.default_rng(seed)
    plan = tensors(cfg)
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    shards: list[list] = [[]]
    size = 0
    for t in plan:
        nbytes = int(np.prod(t.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        arrays = {
            t.name: (rng.standard_normal(t.hf_shape, np.float32) * 0.02).astype(DTYPES[dtype])
            for t in shard
        }
        safetensors.numpy.save_file(arrays, str(directory / name), metadata={"format": "pt"})
        del arrays
        weight_map.update(dict.fromkeys((t.name for t in shard), name))
    total = sum(int(np.prod(t.hf_shape)) * itemsize for t in plan)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    largest = max(int(np.prod(t.hf_shape)) * itemsize for t in plan)
    return {"model_bytes": total, "largest_tensor_bytes": largest, "shards": len(shards)}


def run_child(args: list[str]) -> dict:
    """Runs ``python -m sparse_jax.hf ARGS``; its wall time and peak resident bytes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "sparse_jax.hf", *args], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"sparse_jax.hf {args[0]} failed:\n{out.stdout}{out.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("the child's peak is not above an earlier child's: run one at a time")
    return {"seconds": round(seconds, 1), "peak_rss_bytes": peak * 1024}


def same_tensors(a: pathlib.Path, b: pathlib.Path) -> int:
    """Checks every tensor of HF directory ``b`` bitwise against ``a``; returns the count."""

    def where(d: pathlib.Path) -> dict[str, pathlib.Path]:
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        return {name: d / file for name, file in index.items()}

    left, right = where(a), where(b)
    if sorted(left) != sorted(right):
        raise RuntimeError("the export holds other tensor names than the original")
    for name in left:
        with safetensors.safe_open(str(left[name]), "numpy") as f:
            x = f.get_tensor(name)
        with safetensors.safe_open(str(right[name]), "numpy") as f:
            y = f.get_tensor(name)
        if x.dtype != y.dtype or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
            raise RuntimeError(f"tensor {name} differs after import and export")
    return len(left)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    scratch = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="hf_convert-")).absolute()
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        sizes = write_random_hf(scratch / "hf", args.dtype)
        written = time.perf_counter() - start
        imported = run_child(["import", str(scratch / "hf"), str(scratch / "run")])
        exported = run_child(["export", str(scratch / "run"), str(scratch / "exported")])
        checked = same_tensors(scratch / "hf", scratch / "exported")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    gib = 1 << 30
    report = {
        "machine": {"cpu": cpu_model(), "python": platform.python_version()},
        "dtype": args.dtype,
        **sizes,
        "write_random_seconds": round(written, 1),
        "import": imported,
        "export": exported,
        "tensors_checked_bitwise": checked,
    }
    for step in ("import", "export"):
        peak = report[step]["peak_rss_bytes"]
        report[step]["peak_over_model"] = round(peak / sizes["model_bytes"], 3)
        report[step]["peak_minus_model_gib"] = round((peak - sizes["model_bytes"]) / gib, 2)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_convert.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Hugging Face import and export, Gemma-2 2B shape, {args.dtype}",
        "",
        f"CPU: {report['machine']['cpu']}. Model {sizes['model_bytes'] / gib:.2f} GiB in "
        f"{sizes['shards']} shards; largest tensor {sizes['largest_tensor_bytes'] / gib:.2f} GiB.",
        "",
        "| step | wall s | peak resident GiB | peak / model | peak - model GiB |",
        "|---|---|---|---|---|",
    ]
    for step in ("import", "export"):
        r = report[step]
        lines.append(
            f"| {step} | {r['seconds']} | {r['peak_rss_bytes'] / gib:.2f} | "
            f"{r['peak_over_model']} | {r['peak_minus_model_gib']} |"
        )
    lines += ["", f"All {checked} tensors equal bitwise after import and export."]
    (out / "hf_convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
