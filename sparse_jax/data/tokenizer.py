"""SentencePiece subword tokenizer: train on a corpus, save, load, encode and decode.

The special ids are the model file's own. A tokenizer trained here is a byte-fallback BPE
model with pad=0, bos=1, eos=2, unk=3; Gemma's ``tokenizer.model`` has pad=0, eos=1, bos=2,
unk=3 and the turn markers ``<start_of_turn>`` / ``<end_of_turn>`` that chat formatting uses
(:attr:`Tokenizer.turn_ids`). A trained tokenizer has identity normalization and whitespace
kept as written, so ``decode(encode(text))``
returns ``text`` exactly, unicode outside the training corpus included (it falls back to byte
pieces). The one exception is SentencePiece's own space mark U+2581 ("▁"), which decodes as a
space. Training is deterministic: the same texts and arguments give the same model bytes,
because the BPE trainer gives the same pieces on every run (the tests check it), the sentence
sample is drawn by a seeded NumPy generator here rather than by SentencePiece, and the thread
count (which is recorded in the model file) is fixed. The model is held as its serialized
bytes, so ``save`` writes exactly what was trained or loaded.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

# The special ids of the tokenizers :meth:`Tokenizer.train` makes.
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
FILENAME = "tokenizer.model"
# The pieces that open and close a chat turn in Gemma's tokenizer.
TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")

# Lines longer than this many characters are cut at spaces before training: the SentencePiece
# trainer skips sentences over ``max_sentence_length`` bytes instead of using them.
_MAX_TRAIN_CHARS = 1024
_MAX_SENTENCE_BYTES = 4 * _MAX_TRAIN_CHARS


def _training_sentences(texts: Iterable[str]) -> list[str]:
    """Splits texts into non-empty lines of at most ``_MAX_TRAIN_CHARS`` characters."""
    sentences = []
    for text in texts:
        for line in text.splitlines():
            while len(line) > _MAX_TRAIN_CHARS:
                # Cut at the last space and drop it: the trainer adds a leading space (the
                # dummy prefix) to every sentence, as if the chunk continued the line.
                cut = line.rfind(" ", 1, _MAX_TRAIN_CHARS)
                if cut <= 0:
                    sentences.append(line[:_MAX_TRAIN_CHARS])
                    line = line[_MAX_TRAIN_CHARS:]
                else:
                    sentences.append(line[:cut])
                    line = line[cut + 1 :]
            if line.strip():
                sentences.append(line)
    return sentences


def _spm_message(error: RuntimeError) -> str:
    """Keeps the human-readable tail of a SentencePiece error, dropping the C++ location."""
    text = str(error)
    return text.rsplit("] ", 1)[-1] if "] " in text else text


class Tokenizer:
    """A SentencePiece model; its pad, bos, eos and unk ids are the ones the model file defines.

    Build one with :meth:`train` or :meth:`load`; the constructor takes serialized model bytes.

    Attributes:
      model_proto: the serialized SentencePiece model, as written by :meth:`save`.
    """

    def __init__(self, model_proto: bytes):
        """Wraps serialized SentencePiece model bytes.

        Args:
          model_proto: the bytes of a ``.model`` file.

        Raises:
          ValueError: if the bytes are not a SentencePiece model, or it lacks a pad, bos or eos
            piece, or two of pad, bos, eos and unk share an id.
        """
        self.model_proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError as e:
            raise ValueError(f"not a SentencePiece model: {_spm_message(e)}") from e
        ids = {
            "pad": self._sp.pad_id(),
            "bos": self._sp.bos_id(),
            "eos": self._sp.eos_id(),
            "unk": self._sp.unk_id(),
        }
        missing = [name for name, i in ids.items() if i < 0]
        if missing:
            raise ValueError(
                f"tokenizer special ids are {ids}: it defines no {' or '.join(missing)} piece, "
                "which this library needs (padding, document start and end)"
            )
        if len(set(ids.values())) < len(ids):
            raise ValueError(f"tokenizer special ids are {ids}: two of them share an id")
        self._special = ids
        turns = tuple(self._sp.piece_to_id(piece) for piece in TURN_PIECES)
        self._turns = turns if all(i != ids["unk"] for i in turns) else None

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        max_sentences: int = 300_000,
        seed: int = 0,
        character_coverage: float = 0.9995,
    ) -> Tokenizer:
        """Trains a byte-fallback BPE tokenizer on ``texts``.

        Each text is split into lines (long lines are cut at spaces); when there are more than
        ``max_sentences`` lines, a uniform sample of that many, drawn with ``seed``, is used.
        The whole King James Bible (31k verses) trains in well under a second.

        Args:
          texts: training documents.
          vocab_size: V, the number of pieces including the 4 special and 256 byte pieces.
          max_sentences: the most lines handed to the SentencePiece trainer.
          seed: seed of the line sample; unused when all lines fit.
          character_coverage: fraction of characters that get their own piece; the rarest
            characters beyond it are spelled as UTF-8 byte pieces.

        Returns:
          The trained tokenizer.

        Raises:
          ValueError: if the texts hold no non-blank line, ``max_sentences`` < 1, or
            SentencePiece rejects ``vocab_size`` as too small or too large for the texts.
        """
        if max_sentences < 1:
            raise ValueError(f"max_sentences={max_sentences} is invalid: must be >= 1")
        sentences = _training_sentences(texts)
        if not sentences:
            raise ValueError("cannot train a tokenizer: the texts contain no non-blank line")
        if len(sentences) > max_sentences:
            rng = np.random.default_rng(seed)
            keep = np.sort(rng.choice(len(sentences), size=max_sentences, replace=False))
            sentences = [sentences[i] for i in keep]
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type="bpe",
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                character_coverage=character_coverage,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"SentencePiece could not train vocab_size={vocab_size}: {_spm_message(e)}"
            ) from e
        return cls(writer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads a ``.model`` file, or ``tokenizer.model`` inside a directory.

        Args:
          path: a SentencePiece model file, or a directory written by :meth:`save`.

        Returns:
          The loaded tokenizer.

        Raises:
          FileNotFoundError: if the file (or ``tokenizer.model`` in the directory) is missing.
          ValueError: if the file is not a SentencePiece model the library can use (see
            the constructor).
        """
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer model at {path}")
        try:
            return cls(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        """Writes ``tokenizer.model`` into ``directory`` (created if missing).

        Args:
          directory: where to write, e.g. a checkpoint directory.

        Returns:
          The path of the written file; :meth:`load` accepts it or ``directory``.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        path.write_bytes(self.model_proto)
        return path

    @property
    def vocab_size(self) -> int:
        """V, the number of token ids; valid ids are ``0 .. V - 1``."""
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        """Id of the padding token."""
        return self._special["pad"]

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token."""
        return self._special["bos"]

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token."""
        return self._special["eos"]

    @property
    def unk_id(self) -> int:
        """Id of the unknown token; with byte fallback encoding never produces it."""
        return self._special["unk"]

    @property
    def turn_ids(self) -> tuple[int, int] | None:
        """Ids of ``<start_of_turn>`` and ``<end_of_turn>``, or None if the model lacks them."""
        return self._turns

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes one string into token ids.

        Args:
          text: the string to encode.
          add_bos: prepend ``bos_id``.
          add_eos: append ``eos_id``.

        Returns:
          The token ids.

        Raises:
          TypeError: if ``text`` is not a ``str``.
          ValueError: if ``text`` is not valid Unicode (holds a lone surrogate).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = False,
        add_eos: bool = False,
        num_threads: int = 1,
    ) -> list[list[int]]:
        """Encodes many strings at once through SentencePiece's C++ batch path.

        Args:
          texts: the strings to encode.
          add_bos: prepend ``bos_id`` to each.
          add_eos: append ``eos_id`` to each.
          num_threads: encoder threads.

        Returns:
          One id list per text.

        Raises:
          TypeError: if a text is not a ``str``.
          ValueError: if a text is not valid Unicode (holds a lone surrogate).
        """
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_batch expects str texts, got {type(text).__name__}")
        try:
            return self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
        except (RuntimeError, TypeError) as e:  # what pybind11 raises for lone surrogates
            raise ValueError(f"cannot encode text that is not valid Unicode: {e}") from e

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes token ids into a string; pad, bos and eos decode to nothing.

        Args:
          ids: token ids, e.g. a list or a 1-D integer array.

        Returns:
          The decoded string.

        Raises:
          ValueError: if an id is outside ``[0, vocab_size)`` or the ids are not integers.
        """
        ids = np.asarray(ids if hasattr(ids, "__len__") else list(ids)).reshape(-1)
        if ids.size and ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            raise ValueError(
                f"token id {ids[bad[0]]} at position {bad[0]} is out of range: "
                f"ids must be in [0, {self.vocab_size})"
            )
        return self._sp.decode(ids.tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.model_proto == other.model_proto

    def __hash__(self) -> int:
        return hash(self.model_proto)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
