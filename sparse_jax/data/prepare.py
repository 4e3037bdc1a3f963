"""Tokenize a corpus once into shards of token ids: ``python -m sparse_jax.data.prepare``.

    python -m sparse_jax.data.prepare --input corpus/ more.jsonl.gz --tokenizer train \\
        --vocab-size 4096 --out data/prepared
    python train.py --config small --set data.paths=data/prepared     # trains from the shards

The documents (``.txt``, ``.jsonl``, ``.jsonl.gz``, ``.parquet``; files, directories or globs)
are split into training and held-out documents exactly as the in-memory path splits them
(:func:`sparse_jax.data.corpus.split_documents`: the smallest seeded hashes are held out),
tokenized as ``[bos] + ids + [eos]`` in worker processes, and written in order as
``train-NNNNN.npy`` and ``eval-NNNNN.npy``: NumPy arrays of token ids (uint16 when the vocabulary
fits, else uint32), each closed at the first document end after ``--shard-tokens`` tokens.
Concatenated, the shards are the in-memory path's token streams, so training on them sees the
same batches. NumPy's ``.npy`` is the format because the reader memory-maps it: a window of
packed tokens is a slice, read from disk when a batch needs it, with no decoding and no index
(a record format would store what is one flat array as many records).

``manifest.json`` marks a finished directory: the format version, the tokenizer (a copy as
``tokenizer.model`` and its SHA-256), the split, the per-shard document and token counts and
checksums, the inputs' sizes and modification times. ``unigram_counts.npy`` holds the training
tokens' counts. An interrupted prepare resumes from ``progress.json`` (the shards written so
far and the documents they hold) when run again with the same arguments; a finished one is
never overwritten. ``--verify DIR`` checks every shard against its checksum.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from sparse_jax.data import corpus
from sparse_jax.data.tokenizer import FILENAME as TOKENIZER_FILE
from sparse_jax.data.tokenizer import Tokenizer, _training_sentences

FORMAT = "sparse_jax.prepared/1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
UNIGRAM_FILE = "unigram_counts.npy"
SPLITS = ("train", "eval")
DEFAULT_SHARD_TOKENS = 1 << 24
CHUNK_DOCS = 256
MAX_TOKENIZER_SENTENCES = 300_000


class PrepareError(ValueError):
    """A prepare that cannot start or continue: the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a prepared directory was made from; a resumed prepare must match it."""

    inputs: tuple[str, ...]
    text_field: str = "text"
    tokenizer: str = "train"
    vocab_size: int = 4096
    seed: int = 0
    eval_fraction: float = 0.05
    shard_tokens: int = DEFAULT_SHARD_TOKENS

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise PrepareError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        if self.shard_tokens < 1:
            raise PrepareError(f"shard_tokens={self.shard_tokens} must be >= 1")
        if not 0 <= self.seed < 2**32:
            raise PrepareError(f"seed={self.seed} must be in [0, 2**32)")


def _write_atomic(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    _write_atomic(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def split_key(doc: str, seed: int) -> int:
    """The document's held-out key: :func:`corpus.split_documents`'s hash, as an integer
    (big-endian, so integers order as the digests do)."""
    salt = seed.to_bytes(8, "little")
    digest = hashlib.blake2b(salt + doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def eval_threshold(keys: np.ndarray, eval_fraction: float) -> int | None:
    """The largest held-out key (keys at or below it are held out), as in
    :func:`corpus.split_documents`; None when nothing is held out."""
    if eval_fraction == 0.0 or not len(keys):
        return None
    count = max(1, round(eval_fraction * len(keys)))
    return int(np.partition(keys, count - 1)[count - 1])


# Worker side: the tokenizer, set once per process.
_WORKER: dict[str, Any] = {}


def _init_worker(model_proto: bytes) -> None:
    _WORKER["tokenizer"] = Tokenizer(model_proto)


def _encode_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per document, the tokens) of a chunk of documents, each document as
    ``[bos] + ids + [eos]``, in input order."""
    ids = _WORKER["tokenizer"].encode_batch(docs, add_bos=True, add_eos=True)
    lengths = np.array([len(x) for x in ids], np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.uint32, int(lengths.sum()))
    return lengths, tokens


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _inputs_identity(settings: Settings) -> list[dict[str, Any]]:
    files = corpus.corpus_files(settings.inputs)
    return [
        {"path": os.fspath(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
        for p in files
    ]


def _tokenizer(settings: Settings, out: pathlib.Path, train_docs: Iterable[str]) -> Tokenizer:
    """The prepare's tokenizer: the saved copy when resuming, else loaded or trained."""
    saved = out / TOKENIZER_FILE
    if saved.is_file():
        return Tokenizer.load(saved)
    if settings.tokenizer != "train":
        try:
            tokenizer = Tokenizer.load(settings.tokenizer)
        except (OSError, ValueError) as err:
            raise PrepareError(f"--tokenizer: {err}") from None
    else:
        # All lines when they are few enough, as the in-memory path trains on; beyond that a
        # seeded reservoir sample, so the corpus never has to fit in memory.
        rng = np.random.default_rng(settings.seed)
        sample: list[str] = []
        lines = (line for doc in train_docs for line in _training_sentences([doc]))
        for n, line in enumerate(lines):
            if n < MAX_TOKENIZER_SENTENCES:
                sample.append(line)
            else:
                slot = int(rng.integers(0, n + 1))
                if slot < MAX_TOKENIZER_SENTENCES:
                    sample[slot] = line
        tokenizer = Tokenizer.train(sample, settings.vocab_size, seed=settings.seed)
    _write_atomic(saved, lambda f: f.write(tokenizer.model_proto))
    return tokenizer


def prepare(
    settings: Settings,
    out: str | os.PathLike[str],
    *,
    workers: int | None = None,
    show_progress: bool = False,
    _stop_after_shards: int | None = None,
) -> pathlib.Path:
    """Tokenizes ``settings.inputs`` into ``out`` (see the module docstring); returns ``out``.

    Args:
      settings: the inputs, tokenizer (a ``.model`` path or ``"train"``), split and shard size.
      out: the directory to write; an unfinished prepare there with the same settings resumes.
      workers: tokenizing processes; 0 tokenizes in this process; default: one per CPU.
      show_progress: a progress bar on stderr.

    Raises:
      PrepareError: ``out`` holds a finished prepare, or an unfinished one of other settings.
      ValueError, FileNotFoundError: bad inputs, as :func:`corpus.iter_documents` raises.
    """
    out = pathlib.Path(out).absolute()
    if (out / MANIFEST).exists():
        raise PrepareError(
            f"{out} holds a finished prepare ({MANIFEST}); it is never overwritten: choose "
            "another --out, or delete that directory first"
        )
    identity = {
        "format": FORMAT,
        "settings": dataclasses.asdict(settings),
        "inputs": _inputs_identity(settings),
    }
    identity = json.loads(json.dumps(identity))  # as it reads back from progress.json
    progress = _resume_state(out, identity)
    docs = lambda: corpus.iter_documents(settings.inputs, settings.text_field)  # noqa: E731
    # Pass 1: the split needs every document's key (8 bytes each) before it is known.
    keys = np.fromiter((split_key(d, settings.seed) for d in docs()), dtype=np.uint64)
    if not len(keys):
        raise PrepareError(f"the inputs {list(settings.inputs)} hold no non-blank document")
    threshold = eval_threshold(keys, settings.eval_fraction)
    # Held out per document, from the keys of pass 1 (no document is hashed twice).
    held_out = np.zeros(len(keys), bool) if threshold is None else keys <= np.uint64(threshold)
    del keys
    if held_out.all():
        raise PrepareError(f"eval_fraction={settings.eval_fraction} leaves no training document")
    out.mkdir(parents=True, exist_ok=True)
    progress.setdefault("documents_done", 0)
    progress.setdefault("shards", {split: [] for split in SPLITS})
    progress["documents"] = len(held_out)
    _write_json(out / PROGRESS, {**identity, **progress})
    train_docs = (d for d, held in zip(docs(), held_out, strict=True) if not held)
    tokenizer = _tokenizer(settings, out, train_docs)
    dtype = token_dtype(tokenizer.vocab_size)

    buffers: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    commits = 0

    def commit(documents_done: int) -> None:
        nonlocal commits
        for split in SPLITS:
            if not counts[split]:
                buffers[split] = []
                continue
            tokens = np.concatenate(buffers[split]).astype(dtype)
            name = f"{split}-{len(progress['shards'][split]):05d}.npy"
            _write_atomic(out / name, lambda f, t=tokens: np.save(f, t))
            progress["shards"][split].append(
                {
                    "file": name,
                    "tokens": len(tokens),
                    "documents": counts[split],
                    "sha256": _sha256(out / name),
                }
            )
            buffers[split], counts[split] = [], 0
        progress["documents_done"] = documents_done
        _write_json(out / PROGRESS, {**identity, **progress})
        commits += 1
        if _stop_after_shards is not None and commits >= _stop_after_shards:
            raise _Interrupted

    skip = progress["documents_done"]
    pending = _chunks(itertools.islice(docs(), skip, None), CHUNK_DOCS)
    args = (tokenizer.model_proto,)
    if workers is None:
        workers = os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        if workers > 0:
            pool = stack.enter_context(
                multiprocessing.get_context("spawn").Pool(workers, _init_worker, args)
            )
            results = _bounded_imap(pool, pending, 4 * workers)
        else:
            _init_worker(*args)
            results = map(_encode_chunk, pending)
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = stack.enter_context(
                tqdm(total=len(held_out), initial=skip, unit="doc", desc="tokenizing")
            )
        done, train_tokens = skip, 0
        for lengths, tokens in results:
            ends = np.cumsum(lengths)
            for start, end in zip(ends - lengths, ends, strict=True):
                is_held = held_out[done]
                done += 1
                split = "eval" if is_held else "train"
                buffers[split].append(tokens[start:end])
                counts[split] += 1
                if not is_held:
                    train_tokens += int(end - start)
                    if train_tokens >= settings.shard_tokens:
                        commit(done)
                        train_tokens = 0
            if bar is not None:
                bar.update(len(lengths))
        if any(counts.values()):
            commit(done)
    return _finish(out, identity, progress, tokenizer, dtype)


def _bounded_imap(pool: Any, chunks: Iterator[list[str]], ahead: int) -> Iterator[Any]:
    """``pool.imap(_encode_chunk, chunks)`` with at most ``ahead`` chunks in flight: ``imap``
    itself would read (and queue) the whole corpus as fast as it can."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Interrupted(Exception):
    """Raised by the test hook ``_stop_after_shards``, as a kill would stop a prepare."""


def _resume_state(out: pathlib.Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The progress of an unfinished prepare in ``out`` with these settings, else {}."""
    path = out / PROGRESS
    if not path.exists():
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise PrepareError(
                f"{out} is not empty and holds no unfinished prepare: choose an empty --out"
            )
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PrepareError(f"{path} is unreadable ({err}): delete {out} and start again") from None
    for key in identity:
        if saved.get(key) != identity[key]:
            raise PrepareError(
                f"{out} holds an unfinished prepare of other {key} ({saved.get(key)!r} against "
                f"{identity[key]!r}): rerun with its arguments to resume, or choose another --out"
            )
    listed = {s["file"] for split in SPLITS for s in saved["shards"][split]}
    for shard in out.glob("*.npy"):  # a shard written after the last progress update
        if shard.name not in listed:
            shard.unlink()
    return {k: v for k, v in saved.items() if k not in identity}


def _finish(
    out: pathlib.Path,
    identity: dict[str, Any],
    progress: dict[str, Any],
    tokenizer: Tokenizer,
    dtype: np.dtype,
) -> pathlib.Path:
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for shard in progress["shards"]["train"]:
        counts += np.bincount(np.load(out / shard["file"], mmap_mode="r"), minlength=len(counts))
    _write_atomic(out / UNIGRAM_FILE, lambda f: np.save(f, counts))
    shards = progress["shards"]
    manifest = {
        **identity,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(),
            "vocab_size": tokenizer.vocab_size,
        },
        "dtype": dtype.name,
        "documents": {s: sum(x["documents"] for x in shards[s]) for s in SPLITS},
        "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in SPLITS},
        "shards": shards,
        "unigram_counts": {"file": UNIGRAM_FILE, "sha256": _sha256(out / UNIGRAM_FILE)},
    }
    _write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_jax.data.prepare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input", nargs="+", default=[], help="files, directories or globs")
    parser.add_argument("--out", help="directory to write (resumes an unfinished one)")
    parser.add_argument("--tokenizer", default="train", help="a .model file, or 'train'")
    parser.add_argument("--vocab-size", type=int, default=4096, help="with --tokenizer train")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column")
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="the split (and tokenizer sample)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--verify", metavar="DIR", help="check a prepared directory and exit")
    args = parser.parse_args(argv)
    if args.verify is None and (not args.input or not args.out):
        parser.error("--input and --out are required (or --verify DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.verify is not None:
            from sparse_jax.data.prepared import PreparedData

            data = PreparedData(args.verify)
            data.verify()
            print(f"{args.verify}: {data.describe()}; every shard matches its checksum")
            return 0
        settings = Settings(
            inputs=tuple(args.input),
            text_field=args.text_field,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            seed=args.seed,
            eval_fraction=args.eval_fraction,
            shard_tokens=args.shard_tokens,
        )
        out = prepare(settings, args.out, workers=args.workers, show_progress=True)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = json.loads((out / MANIFEST).read_text())
    print(
        f"wrote {out}: {manifest['documents']['train']} training and "
        f"{manifest['documents']['eval']} held-out documents, {manifest['tokens']['train']} and "
        f"{manifest['tokens']['eval']} tokens in {len(manifest['shards']['train'])} + "
        f"{len(manifest['shards']['eval'])} shards"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
