"""Training start-up from raw text against a prepared directory, as the corpus grows.

The corpus is the bundled King James Bible repeated 1x, 10x and 100x (each copy a ``.jsonl``
file of its chapters, so documents repeat). For each size:

* ``python -m sparse_jax.data.prepare`` on 2 worker processes (a tokenizer trained on the
  training text, vocabulary 4096): wall time and tokens per second;
* the start-up of training, in a fresh child process each, up to the first batch: what
  ``train.py`` does before its first step, from raw text (read, split, train the tokenizer,
  tokenize, count unigrams, build the iterator and eval batches) and from the prepared
  directory (open and check it, build the iterator and eval batches). Each child reports its
  wall time and peak resident memory.

    python -m benchmarks.data [--sizes 1,10,100] [--dir DIR]

Results: ``benchmarks/results/data.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.train_step import cpu_model

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SEQ_LEN, BATCH, VOCAB = 256, 16, 4096

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from sparse_jax.data import pipeline
from sparse_jax.data.corpus import split_documents
from sparse_jax.data.prepared import PreparedData
mode, path = sys.argv[1], sys.argv[2]
seq_len, batch, vocab = map(int, sys.argv[3:6])
cfg = pipeline.DataConfig(paths=(path,), seq_len=seq_len, batch_size=batch)
if mode == "raw":
    docs = pipeline.load_documents(cfg)
    train, held = split_documents(docs, cfg.eval_fraction, 0)
    tok = pipeline.build_tokenizer(cfg, train, vocab, 0)
    it = pipeline.train_iterator(cfg, tok, train, seed=0)
    evals = pipeline.eval_batches(cfg, tok, held)
    entropy = pipeline.unigram_entropy(pipeline.tokenize_documents(tok, train), tok.vocab_size)
else:
    data = PreparedData(path)
    it = data.train_iterator(cfg, seed=0)
    evals = data.eval_batches(cfg)
    entropy = data.unigram_entropy()
batch = next(it)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": peak,
                  "windows": it.num_windows, "entropy": entropy}))
"""


def write_corpus(directory: pathlib.Path, copies: int) -> int:
    from sparse_jax.data.corpus import kjv_documents

    directory.mkdir(parents=True)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in kjv_documents())
    for n in range(copies):
        (directory / f"kjv-{n:03d}.jsonl").write_text(lines)
    return sum(p.stat().st_size for p in directory.iterdir())


def startup(mode: str, path: pathlib.Path) -> dict:
    sizes = [str(n) for n in (SEQ_LEN, BATCH, VOCAB)]
    cmd = [sys.executable, "-c", CHILD, mode, str(path), *sizes]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode} start-up failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    scratch = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="data-bench-")).absolute()
    rows = []
    try:
        for copies in (int(s) for s in args.sizes.split(",")):
            text = scratch / f"text-{copies}"
            prepared = scratch / f"prepared-{copies}"
            nbytes = write_corpus(text, copies)
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "sparse_jax.data.prepare", "--input", str(text)]
            cmd += ["--out", str(prepared), "--vocab-size", str(VOCAB), "--workers", "2"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"prepare failed:\n{done.stderr}")
            seconds = time.perf_counter() - start
            manifest = json.loads((prepared / "manifest.json").read_text())
            tokens = manifest["tokens"]["train"] + manifest["tokens"]["eval"]
            row = {
                "copies": copies,
                "text_bytes": nbytes,
                "tokens": tokens,
                "prepare_seconds": round(seconds, 1),
                "prepare_tokens_per_s": round(tokens / seconds),
                "raw": startup("raw", text),
                "prepared": startup("prepared", prepared),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(text)
            shutil.rmtree(prepared)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "machine": {"cpu": cpu_model(), "python": platform.python_version()},
        "seq_len": SEQ_LEN,
        "batch_size": BATCH,
        "vocab_size": VOCAB,
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(report, indent=2) + "\n")
    mib = 1 << 20
    lines = [
        "# Training start-up: raw text against a prepared directory",
        "",
        f"CPU: {report['machine']['cpu']}; prepare on 2 worker processes, vocabulary {VOCAB}.",
        "",
        "| corpus | text MiB | tokens | prepare s | prepare tokens/s | raw start-up s | raw peak "
        "MiB | prepared start-up s | prepared peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['copies']}x | {r['text_bytes'] / mib:.0f} | {r['tokens']:,} | "
            f"{r['prepare_seconds']} | {r['prepare_tokens_per_s']:,} | "
            f"{r['raw']['seconds']:.1f} | {r['raw']['peak_rss_bytes'] / mib:.0f} | "
            f"{r['prepared']['seconds']:.2f} | {r['prepared']['peak_rss_bytes'] / mib:.0f} |"
        )
    (out / "data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
