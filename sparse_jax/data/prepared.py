"""Reading a prepared directory (:mod:`sparse_jax.data.prepare`): memory-mapped token shards.

:class:`PreparedData` opens ``manifest.json``, checks the format, the tokenizer copy against its
checksum, and every shard's presence, dtype and length against the manifest (from the ``.npy``
headers: the cost is per shard, not per token). The shards are memory-mapped: a batch reads
its own windows from disk and nothing else, so start-up time and resident memory do not grow
with the corpus. :meth:`PreparedData.train_iterator` and :meth:`PreparedData.eval_batches` give
the same batches as :func:`sparse_jax.data.pipeline.train_iterator` and
:func:`~sparse_jax.data.pipeline.eval_batches` give over the same token stream, with the same
per-process rows and the same checkpointable state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from sparse_jax.data import pipeline
from sparse_jax.data.prepare import FORMAT, MANIFEST, SPLITS, _sha256
from sparse_jax.data.tokenizer import Tokenizer


class PreparedDataError(ValueError):
    """A prepared directory that is incomplete, damaged, or does not fit the run."""


def is_prepared(paths: tuple[str, ...]) -> bool:
    """Whether ``DataConfig.paths`` names one prepared directory (it holds ``manifest.json``)."""
    return len(paths) == 1 and (pathlib.Path(paths[0]) / MANIFEST).is_file()


class ShardedTokens:
    """One split's shards as one read-only token stream with random access to windows."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.offsets = np.cumsum([0, *(len(a) for a in arrays)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ``tokens[s : s + length]`` for each start (int64 [len(starts), length])."""
        out = np.empty((len(starts), length), np.int64)
        for row, start in enumerate(np.asarray(starts, np.int64).reshape(-1)):
            pos, filled = int(start), 0
            while filled < length:
                shard = int(np.searchsorted(self.offsets, pos, side="right")) - 1
                local = pos - int(self.offsets[shard])
                take = min(length - filled, len(self.arrays[shard]) - local)
                out[row, filled : filled + take] = self.arrays[shard][local : local + take]
                filled += take
                pos += take
        return out


class PreparedData:
    """A prepared directory, checked and memory-mapped.

    Attributes:
      path: the directory.
      manifest: its ``manifest.json``.
      tokenizer: the tokenizer its tokens were made with.

    Raises:
      PreparedDataError: no or an unreadable manifest, another format, a missing, truncated or
        mismatched shard or tokenizer (the message names the file).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path).absolute()
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            partial = (
                " (an unfinished prepare: rerun it)"
                if (self.path / "progress.json").exists()
                else ""
            )
            raise PreparedDataError(f"{self.path} holds no {MANIFEST}{partial}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PreparedDataError(f"{manifest_path} is unreadable: {err}") from None
        if self.manifest.get("format") != FORMAT:
            raise PreparedDataError(
                f"{manifest_path} has format {self.manifest.get('format')!r}; this version "
                f"reads {FORMAT!r}"
            )
        info = self.manifest["tokenizer"]
        tokenizer_path = self.path / info["file"]
        try:
            blob = tokenizer_path.read_bytes()
        except OSError as err:
            raise PreparedDataError(f"the tokenizer copy is unreadable: {err}") from None
        if hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise PreparedDataError(f"{tokenizer_path} does not match the manifest's checksum")
        self.tokenizer = Tokenizer(blob)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.streams = {split: ShardedTokens(self._open(split)) for split in SPLITS}

    def _open(self, split: str) -> list[np.ndarray]:
        arrays = []
        for shard in self.manifest["shards"][split]:
            path = self.path / shard["file"]
            try:
                array = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise PreparedDataError(f"shard {path.name} of {self.path} is missing") from None
            except (OSError, ValueError) as err:
                raise PreparedDataError(f"shard {path.name} is unreadable: {err}") from None
            if array.dtype != self.dtype or array.shape != (shard["tokens"],):
                raise PreparedDataError(
                    f"shard {path.name} holds {array.dtype} {array.shape}, the manifest says "
                    f"{self.dtype} ({shard['tokens']},)"
                )
            arrays.append(array)
        return arrays

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def describe(self) -> str:
        docs, tokens = self.manifest["documents"], self.manifest["tokens"]
        return (
            f"{docs['train']} training / {docs['eval']} held-out documents, {tokens['train']} / "
            f"{tokens['eval']} tokens"
        )

    def verify(self) -> None:
        """Checks every shard and the unigram counts against their SHA-256 (reads them all)."""
        files = [s for split in SPLITS for s in self.manifest["shards"][split]]
        files.append(self.manifest["unigram_counts"])
        for item in files:
            if _sha256(self.path / item["file"]) != item["sha256"]:
                raise PreparedDataError(f"{item['file']} does not match its checksum: damaged")

    def check_tokenizer(self, tokenizer: Tokenizer, where: str) -> None:
        """Raises unless ``tokenizer`` (of a checkpoint or a config, ``where``) is this data's."""
        theirs = hashlib.sha256(tokenizer.model_proto).hexdigest()
        if theirs != self.tokenizer_sha256:
            raise PreparedDataError(
                f"the tokenizer of {where} (sha256 {theirs[:12]}, {tokenizer.vocab_size} "
                f"pieces) is not the one {self.path} was prepared with (sha256 "
                f"{self.tokenizer_sha256[:12]}, {self.tokenizer.vocab_size} pieces)"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What a training iterator's state must match: the training shards' checksums."""
        digest = hashlib.sha256()
        for shard in self.manifest["shards"]["train"]:
            digest.update(shard["sha256"].encode())
        return {
            "prepared_sha256": digest.hexdigest()[:16],
            "num_tokens": len(self.streams["train"]),
        }

    def train_iterator(
        self,
        cfg: pipeline.DataConfig,
        shard_index: int = 0,
        shard_count: int = 1,
        *,
        seed: int = 0,
    ) -> pipeline.TrainIterator:
        """As :func:`sparse_jax.data.pipeline.train_iterator` over the training shards."""
        pipeline._check_seed(seed)
        rows = pipeline._shard_rows(cfg.batch_size, shard_index, shard_count)
        tokens = self.streams["train"]
        pipeline.check_stream_length(len(tokens), cfg.seq_len, "training")
        return pipeline.TrainIterator(cfg, tokens, rows, seed, fingerprint=self.fingerprint())

    def eval_batches(
        self, cfg: pipeline.DataConfig, shard_index: int = 0, shard_count: int = 1
    ) -> list[pipeline.Batch]:
        """As :func:`sparse_jax.data.pipeline.eval_batches` over the held-out shards."""
        return pipeline.eval_batches_of(cfg, self.streams["eval"], shard_index, shard_count)

    def unigram_entropy(self) -> float:
        """The training tokens' unigram entropy, from the counts written at prepare time."""
        counts = np.load(self.path / self.manifest["unigram_counts"]["file"])
        total = counts.sum()
        p = counts[counts > 0] / total
        return float(-(p * np.log(p)).sum()) if total else math.nan
