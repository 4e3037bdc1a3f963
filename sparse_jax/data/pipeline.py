"""Training data: Grain pipelines of packed token windows over a corpus.

Documents come from :mod:`sparse_jax.data.corpus` (the bundled King James Bible or user files).
They are tokenized once as ``[bos] + ids + [eos]``, concatenated into one stream and cut into
windows of ``seq_len + 1`` tokens every ``seq_len`` tokens (each token after the first is a
target once per epoch, but a tail shorter than a window is dropped). Windows cross document
boundaries and carry no segment ids: attention is not reset at a document's start, where
bos/eos are the only marks.
Grain shuffles window indices (a new seeded order each epoch) and batches them, so the
iterator state is a global batch count::

    cfg = DataConfig(paths=(), seq_len=256, batch_size=16)  # () -> bundled KJV
    docs = load_documents(cfg)
    train_docs, eval_docs = corpus.split_documents(docs, cfg.eval_fraction, seed=0)
    tokenizer = build_tokenizer(cfg, train_docs, vocab_size=4096, seed=0)
    it = train_iterator(cfg, tokenizer, train_docs, seed=0, shard_index=0, shard_count=1)
    batch = next(it)  # {"inputs", "targets": int32 [B, T], "mask": float32 [B, T]}
    state = it.get_state()  # a JSON-serializable dict; it.set_state(state) resumes exactly
    held_out = eval_batches(cfg, tokenizer, eval_docs)  # the same list on every call
    unigram_entropy(tokenize_documents(tokenizer, train_docs), tokenizer.vocab_size)

Orbax checkpoints take ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``
(one ``process_<i>-of-<n>.json`` each), or ``orbax.checkpoint.args.JsonSave(it.get_state())``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import zlib
from typing import Any

import grain
import numpy as np

from sparse_jax.data.corpus import read_documents
from sparse_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"DataConfig.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized and how it is cut into batches.

    The seed (split, tokenizer sample, shuffle) and the vocabulary size are the run's and the
    model's; the functions below take them as arguments. ``TrainConfig.data`` holds one.

    Attributes:
      paths: ``.txt``/``.jsonl`` files, directories or glob patterns; empty means the bundled
        King James Bible.
      text_field: the key holding a document's text in ``.jsonl`` lines.
      tokenizer_path: a SentencePiece ``.model`` file (or a directory holding
        ``tokenizer.model``) to use; None trains one on the training documents.
      seq_len: T, tokens per row.
      batch_size: B, rows per global batch (summed over processes and micro-batches).
      eval_fraction: fraction of documents held out for evaluation, in ``[0, 1)``; 0 means no
        eval set.
      eval_batches: the most evaluation batches to build.
    """

    paths: tuple[str, ...] = ()
    text_field: str = "text"
    tokenizer_path: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    eval_fraction: float = 0.05
    eval_batches: int = 8

    def __post_init__(self):
        if not isinstance(self.paths, tuple | list) or not all(
            isinstance(p, str | os.PathLike) for p in self.paths
        ):
            _fail("paths", self.paths, "must be a sequence of paths, e.g. ('corpus.txt',)")
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))
        if not isinstance(self.text_field, str) or not self.text_field:
            _fail("text_field", self.text_field, "must be a non-empty string")
        if self.tokenizer_path is not None and not isinstance(
            self.tokenizer_path, str | os.PathLike
        ):
            _fail(
                "tokenizer_path",
                self.tokenizer_path,
                "must be a path (a string) to a SentencePiece .model file, or None to train one",
            )
        if self.tokenizer_path is not None:
            object.__setattr__(self, "tokenizer_path", os.fspath(self.tokenizer_path))
        for field in ("seq_len", "batch_size", "eval_batches"):
            if not _is_int(getattr(self, field)) or getattr(self, field) < 1:
                _fail(field, getattr(self, field), "must be an integer >= 1")
        if not (
            isinstance(self.eval_fraction, int | float)
            and not isinstance(self.eval_fraction, bool)
            and 0 <= self.eval_fraction < 1
        ):
            _fail("eval_fraction", self.eval_fraction, "must be in [0, 1); 0 means no eval set")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (``paths`` as a list)."""
        return {**dataclasses.asdict(self), "paths": list(self.paths)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_seed(seed: Any) -> None:
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is invalid: must be an integer in [0, 2**32)")


def load_documents(cfg: DataConfig) -> list[str]:
    """The documents of ``cfg.paths`` (the King James Bible when empty), in file order.

    See :func:`sparse_jax.data.corpus.read_documents` for the formats and errors.
    """
    return read_documents(cfg.paths, cfg.text_field)


def build_tokenizer(cfg: DataConfig, docs: list[str], vocab_size: int, seed: int = 0) -> Tokenizer:
    """Loads ``cfg.tokenizer_path``, or trains a ``vocab_size`` tokenizer on ``docs``.

    The path is a ``.model`` file or a directory holding ``tokenizer.model``. Pass the training
    documents, so the held-out text stays unseen by the tokenizer too; ``seed`` picks the
    sample of lines it trains on.

    Raises:
      ValueError: if a loaded tokenizer's vocab size differs from ``vocab_size``.
    """
    _check_seed(seed)
    if not _is_int(vocab_size) or vocab_size < 260:
        raise ValueError(
            f"vocab_size={vocab_size!r} is invalid: must be an integer >= 260 (4 special and "
            "256 byte pieces)"
        )
    if cfg.tokenizer_path is None:
        return Tokenizer.train(docs, vocab_size, seed=seed)
    tokenizer = Tokenizer.load(cfg.tokenizer_path)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer at {cfg.tokenizer_path} has vocab_size={tokenizer.vocab_size} but the "
            f"model has vocab_size={vocab_size}; set vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def tokenize_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """Encodes documents into one int32 stream of ``[bos] + ids + [eos]`` per document."""
    encoded = tokenizer.encode_batch(docs, add_bos=True, add_eos=True)
    return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32)


def _shard_rows(batch_size: int, shard_index: int, shard_count: int) -> slice:
    """The rows of a global batch that belong to shard ``shard_index``."""
    if shard_count < 1 or batch_size % shard_count or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index={shard_index}, shard_count={shard_count} is invalid: need "
            f"0 <= shard_index < shard_count and shard_count dividing batch_size={batch_size}"
        )
    rows = batch_size // shard_count
    return slice(shard_index * rows, (shard_index + 1) * rows)


def check_stream_length(num_tokens: int, seq_len: int, split: str) -> None:
    """Raises unless a stream of ``num_tokens`` holds one window of ``seq_len + 1``."""
    if num_tokens < seq_len + 1:
        raise ValueError(
            f"the {split} documents hold {num_tokens} tokens, fewer than one window of "
            f"DataConfig.seq_len + 1 = {seq_len + 1}; add text or lower seq_len"
        )


def _stream(tokenizer: Tokenizer, docs: list[str], seq_len: int, split: str) -> np.ndarray:
    tokens = tokenize_documents(tokenizer, docs)
    check_stream_length(len(tokens), seq_len, split)
    return tokens


class _GatherRows:
    """Maps a global batch of window indices to this shard's rows; index -1 is a padding row.

    ``tokens`` is an array, or any stream with ``windows(starts, length)`` (the memory-mapped
    shards of :mod:`sparse_jax.data.prepared`): only this shard's rows are read.
    """

    def __init__(self, tokens: Any, seq_len: int, rows: slice):
        self.tokens, self.seq_len, self.rows = tokens, seq_len, rows

    def __call__(self, window_indices: np.ndarray) -> Batch:
        index = np.asarray(window_indices, dtype=np.int64)[self.rows]
        real = (index >= 0)[:, None]
        starts = np.maximum(index, 0) * self.seq_len
        if isinstance(self.tokens, np.ndarray):
            read = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        else:
            read = self.tokens.windows(starts, self.seq_len + 1)
        windows = np.where(real, read, 0)
        return {
            "inputs": windows[:, :-1].astype(np.int32),
            "targets": windows[:, 1:].astype(np.int32),
            "mask": np.broadcast_to(real, [len(index), self.seq_len]).astype(np.float32),
        }


class TrainIterator(grain.DatasetIterator):
    """Endless iterator of training batches whose state restores to the exact next batch.

    The state holds the number of global batches consumed plus a fingerprint of the token
    stream and config, which ``set_state`` checks. The count is global, so a run may resume
    with another ``shard_count`` as long as ``batch_size`` is unchanged.

    Attributes:
      num_windows: packed windows per epoch (an epoch ends mid-batch when B does not divide it).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokens: Any,
        rows: slice,
        seed: int,
        fingerprint: dict[str, Any] | None = None,
    ):
        """Wraps the Grain pipeline; build it with :func:`train_iterator` (or
        :meth:`sparse_jax.data.prepared.PreparedData.train_iterator`, which passes the token
        stream's ``fingerprint`` in place of a checksum of every token)."""
        self.num_windows = (len(tokens) - 1) // cfg.seq_len
        dataset = (
            grain.MapDataset.range(self.num_windows)
            .shuffle(seed=seed)
            .repeat(None)
            .batch(cfg.batch_size, drop_remainder=True)
            .map(_GatherRows(tokens, cfg.seq_len, rows))
        )
        # Data is in memory and a batch is one gather: threads would only contend for the GIL.
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        super().__init__(iter(dataset.to_iter_dataset(options)))
        if fingerprint is None:
            fingerprint = {"tokens_crc32": zlib.crc32(tokens.tobytes()), "num_tokens": len(tokens)}
        self._fingerprint = {
            **fingerprint,
            "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size,
            "seed": seed,
        }

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        """Returns a JSON-serializable dict: the consumed global batches and a fingerprint."""
        return {"next_batch": self._parent.get_state()["next_index"], **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`get_state` dict; the next batch is the one that followed it.

        Raises:
          ValueError: if the state came from another token stream, seq_len, batch_size or seed.
        """
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise ValueError(
                    f"iterator state has {key}={state.get(key)!r} but this pipeline has "
                    f"{value!r}: it was saved with another corpus, tokenizer or DataConfig"
                )
        self._parent.set_state({"next_index": int(state["next_batch"])})


def train_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    docs: list[str],
    shard_index: int = 0,
    shard_count: int = 1,
    *,
    seed: int = 0,
) -> TrainIterator:
    """Builds the endless, reshuffled-each-epoch iterator of training batches over ``docs``.

    Args:
      cfg: supplies ``seq_len`` and ``batch_size``.
      tokenizer: encodes ``docs``, once, here.
      docs: the training documents.
      shard_index: this process's index; it gets rows ``shard_index * B / shard_count`` up to
        ``(shard_index + 1) * B / shard_count`` of every global batch.
      shard_count: number of processes; must divide ``cfg.batch_size``.
      seed: seeds the shuffle, in ``[0, 2**32)``; each epoch has a new order.

    Returns:
      An iterator of dicts with ``inputs`` and ``targets`` (int32 [B / shard_count, T],
      ``targets[:, t] == inputs[:, t + 1]``) and ``mask`` (float32 ones).

    Raises:
      ValueError: for a bad shard or seed, or a corpus shorter than ``seq_len + 1`` tokens.
    """
    _check_seed(seed)
    rows = _shard_rows(cfg.batch_size, shard_index, shard_count)
    return TrainIterator(cfg, _stream(tokenizer, docs, cfg.seq_len, "training"), rows, seed)


def eval_batches(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    docs: list[str],
    shard_index: int = 0,
    shard_count: int = 1,
) -> list[Batch]:
    """Builds the fixed evaluation batches: the first windows of the eval stream, in order.

    Up to ``cfg.eval_batches`` batches; when the windows run out, the last batch is completed
    with pad rows whose ``mask`` is 0, so a masked mean counts every held-out window once.
    Empty ``docs`` give an empty list; shard arguments select rows as in :func:`train_iterator`.

    Raises:
      ValueError: for a bad shard, or non-empty ``docs`` shorter than ``seq_len + 1`` tokens.
    """
    _shard_rows(cfg.batch_size, shard_index, shard_count)
    if not docs:
        return []
    tokens = _stream(tokenizer, docs, cfg.seq_len, "eval")
    return eval_batches_of(cfg, tokens, shard_index, shard_count)


def eval_batches_of(
    cfg: DataConfig, tokens: Any, shard_index: int = 0, shard_count: int = 1
) -> list[Batch]:
    """:func:`eval_batches` over a held-out token stream (an array or sharded tokens); an
    empty stream gives no batches."""
    rows = _shard_rows(cfg.batch_size, shard_index, shard_count)
    if not len(tokens):
        return []
    check_stream_length(len(tokens), cfg.seq_len, "eval")
    num_windows = min((len(tokens) - 1) // cfg.seq_len, cfg.eval_batches * cfg.batch_size)
    index = np.full([-(-num_windows // cfg.batch_size) * cfg.batch_size], -1)
    index[:num_windows] = np.arange(num_windows)
    gather = _GatherRows(tokens, cfg.seq_len, rows)
    return [gather(batch) for batch in index.reshape(-1, cfg.batch_size)]


def unigram_entropy(token_ids: np.ndarray, vocab_size: int) -> float:
    """``-sum_v p_v log p_v`` over the token frequencies ``p_v`` of ``token_ids``, in nats.

    This is the loss of a model that ignores context and predicts corpus frequencies: a
    language model's eval loss should fall well below it.

    Raises:
      ValueError: if ``token_ids`` is empty or holds an id outside ``[0, vocab_size)``.
    """
    ids = np.asarray(token_ids).reshape(-1)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"unigram_entropy needs one or more token ids in [0, {vocab_size})")
    counts = np.bincount(ids, minlength=vocab_size)
    p = counts[counts > 0] / ids.size
    return float(-(p * np.log(p)).sum())
