"""Text in, text out: prompts through the tokenizer, :mod:`sparse_jax.decode.generate`, and back.

:class:`TextGenerator` wraps a loaded checkpoint. ``stream`` yields the completion as text
pieces while it is generated; ``complete`` returns it whole. Prompts that are empty, too long
for the model's context, or leave no room for ``max_tokens`` raise ValueError.
:class:`TextStream` is the token-to-text step on its own (the HTTP server feeds it tokens
from its batching engine): SentencePiece pieces are decoded with their context, so spaces and
multi-byte characters come out right, and the text is cut at the first stop string (text that
may be the start of one is held back until it is known not to be).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.decode.generate import stream as stream_tokens
from sparse_jax.decode.sampling import Sampler
from sparse_jax.decode.step import DEFAULT_OPTIONS, DecodeOptions, decode_params
from sparse_jax.model.config import as_count, check_context
from sparse_jax.serve.loading import LoadedModel


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or stop string) or "length"


def encode_prompt(tokenizer: Tokenizer, context: int, prompt: str, max_tokens: int) -> list[int]:
    """Prompt ids with a leading BOS; checks the context has room for ``max_tokens``.

    Args:
      tokenizer: the model's tokenizer.
      context: the model's context length (``max_seq_len``).
      prompt: non-empty text.
      max_tokens: tokens to generate, >= 1.

    Returns:
      The token ids, BOS first.

    Raises:
      ValueError: an empty prompt, a bad ``max_tokens``, or prompt plus ``max_tokens`` longer
        than the context.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    max_tokens = as_count(max_tokens, "max_tokens")
    ids = tokenizer.encode(prompt, add_bos=True)
    check_context(context, len(ids), max_tokens, "max_tokens")
    return ids


class TextStream:
    """Turns generated token ids into text pieces, one :meth:`push` per token.

    Args:
      tokenizer: the model's tokenizer.
      stop: strings that end the completion; the text is cut before the first one found.

    Attributes:
      tokens: the ids pushed so far.
      text: the text emitted so far.
      stopped: whether a stop string was found (push nothing more).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # The prompt's last token, decoded with the completion: SentencePiece drops a leading
        # space from the first piece it decodes, which would glue the completion to the prompt.
        self._context = [int(t) for t in context[-1:]]
        self._context_text = tokenizer.decode(self._context)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False

    def _decode(self) -> str:
        full = self.tokenizer.decode(self._context + self.tokens)
        if full.startswith(self._context_text):
            return full[len(self._context_text) :]
        return self.tokenizer.decode(self.tokens)

    def _emit(self, text: str) -> str:
        if text.startswith(self.text) and len(text) > len(self.text):
            piece, self.text = text[len(self.text) :], text
            return piece
        return ""

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes (often "", never past a stop string)."""
        self.tokens.append(int(token))
        text = self._decode()
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        # Hold back a trailing replacement character (the bytes of a multi-byte character may
        # still be arriving) and any ending that could be the start of a stop string.
        text = text.rstrip("\ufffd")
        return self._emit(text[: len(text) - self._partial_stop(text)])

    def _partial_stop(self, text: str) -> int:
        """Length of the longest ending of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        if self.stopped:
            return ""
        return self._emit(self._decode())


class TextGenerator:
    """Generates text from a loaded model, one request at a time."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.params = decode_params(model.config, model.params)

    def encode_prompt(self, prompt: str, max_tokens: int) -> list[int]:
        """Prompt ids with a leading BOS; see :func:`encode_prompt`."""
        return encode_prompt(self.tokenizer, self.config.max_seq_len, prompt, max_tokens)

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        sampler: Sampler,
        seed: int = 0,
        stop: Sequence[str] = (),
        options: DecodeOptions = DEFAULT_OPTIONS,
    ) -> Iterator[str]:
        """Yields the completion's text as it grows; stops at EOS, a stop string or the limit.

        ``options`` picks the decode path and kernels
        (:class:`sparse_jax.decode.step.DecodeOptions`).
        After the generator is exhausted, ``self.last`` holds the :class:`Completion`.
        """
        ids = self.encode_prompt(prompt, max_tokens)
        yield from self._stream_ids(
            ids, (self.tokenizer.eos_id,), max_tokens, sampler, seed, stop, options
        )

    def stream_chat(
        self,
        messages: Sequence[tuple[str, str]],
        *,
        max_tokens: int,
        sampler: Sampler,
        seed: int = 0,
        stop: Sequence[str] = (),
        options: DecodeOptions = DEFAULT_OPTIONS,
    ) -> Iterator[str]:
        """Yields the model's reply to a conversation of (role, text) messages, in Gemma's chat
        format (:mod:`sparse_jax.serve.chat`); it ends at ``<end_of_turn>``, EOS, a stop
        string or the limit. Other arguments as :meth:`stream`.

        Raises:
          ValueError: the tokenizer has no chat format, the roles break its rules, or the
            conversation plus ``max_tokens`` exceeds the context.
        """
        from sparse_jax.serve import chat

        max_tokens = as_count(max_tokens, "max_tokens")
        ids = chat.conversation_ids(self.tokenizer, messages)
        check_context(self.config.max_seq_len, len(ids), max_tokens, "max_tokens")
        yield from self._stream_ids(
            ids, chat.stop_ids(self.tokenizer), max_tokens, sampler, seed, stop, options
        )

    def _stream_ids(
        self,
        ids: list[int],
        stop_tokens: tuple[int, ...],
        max_tokens: int,
        sampler: Sampler,
        seed: int,
        stop: Sequence[str],
        options: DecodeOptions,
    ) -> Iterator[str]:
        text = TextStream(self.tokenizer, stop, context=ids)
        reason = "length"
        for out in stream_tokens(
            self.config,
            self.params,
            [ids],
            max_new_tokens=max_tokens,
            sampler=sampler,
            seeds=seed,
            stop_tokens=stop_tokens,
            options=options,
        ):
            token = int(out.tokens[0])
            if token < 0:
                reason = "stop"
                break
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                reason = "stop"
                break
        tail = text.finish()
        if tail:
            yield tail
        self.last = Completion(text.text, len(ids), len(text.tokens), reason)

    def complete(self, prompt: str, **kwargs) -> Completion:
        """The whole completion at once; arguments as :meth:`stream`."""
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.last
