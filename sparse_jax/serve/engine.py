"""Continuous batching: one background thread decodes every active request together.

The :class:`Engine` serves up to ``slots`` requests at once from one KV cache, one row per
request. Requests wait in a queue; between decode steps the engine prefills waiting requests
into free rows (see :mod:`sparse_jax.serve.slots`), then one jitted decode step advances every
row and :func:`~sparse_jax.serve.row_sampling.sample_rows` draws each row's next token with
its own request's settings and seed. A request leaves its row at a stop token, after
``max_tokens``, or once its :class:`~sparse_jax.serve.tickets.Ticket` is cancelled; the row
takes a new request before the next step. The cache has a power-of-two number of rows, the
fewest that hold the active and waiting requests (up to ``slots``): it grows when requests
arrive and is compacted when three quarters of it stand idle, so a lone request is not decoded
in a batch of empty rows. Events reach the caller through the callback given to
:meth:`Engine.submit`, called on the engine thread. A request's tokens do not depend on the
other rows: greedy requests get the tokens :func:`sparse_jax.decode.generate.generate` gives them
alone, unless two logits are within floating-point rounding (the batch shape and the cache
layout change the order of sums).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from sparse_jax.decode.cache import init_cache
from sparse_jax.decode.step import (
    DecodeOptions,
    DecodeParams,
    check_tokens,
    decode_params,
    decode_step_jit,
)
from sparse_jax.model.config import ModelConfig, as_count, check_context
from sparse_jax.serve.row_sampling import RowSettings, sample_rows, settings_arrays
from sparse_jax.serve.slots import bucket, insert_rows, prefill_group, take_rows
from sparse_jax.serve.tickets import FINISH_REASONS, EngineBusy, Event, Request, Ticket

log = logging.getLogger(__name__)

# Every prompt is padded up to whole prefill chunks, so a short chunk keeps the prefill of the
# typical short request cheap; DEFAULT_OPTIONS' 256 suits long prompts decoded alone.
SERVING_OPTIONS = DecodeOptions(prefill_chunk=32)


class Engine:
    """Decodes up to ``slots`` requests at once, on a background thread.

    Args:
      cfg: model config.
      params: the model's parameters (scanned ones are split per layer once).
      slots: most requests decoded together, >= 1; each power of two up to it is one more
        compiled decode step.
      options: decode options, used as given; prompts are prefilled in chunks of
        ``options.prefill_chunk`` tokens (padded up to whole chunks).
      max_queue: most requests waiting for a slot; more raise :class:`EngineBusy`.
      max_prefill_group: most waiting requests prefilled together, >= 1 (at most ``slots``);
        each power of two up to it is one more compiled prefill.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: DecodeParams,
        *,
        slots: int = 8,
        options: DecodeOptions = SERVING_OPTIONS,
        max_queue: int = 256,
        max_prefill_group: int = 1,
    ):
        for name, value in (
            ("slots", slots),
            ("max_queue", max_queue),
            ("max_prefill_group", max_prefill_group),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine {name}={value!r} must be an integer >= 1")
        self.options = options
        self.cfg, self.slots = cfg, slots
        self.params = decode_params(cfg, params)
        self.max_queue, self.max_prefill_group = max_queue, min(max_prefill_group, slots)
        self._rows = 1  # rows in the cache; requests sit in rows [0, self._rows)
        self._cache = init_cache(cfg, self._rows)
        self._tickets: list[Ticket | None] = [None] * slots
        self._last = np.zeros((slots,), np.int32)  # each row's newest token, fed next step
        self._steps = np.zeros((slots,), np.int32)  # index of the token each row draws next
        self._settings = [RowSettings()] * slots
        self._queue: collections.deque[Ticket] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        # Every key exists from the start: status() never sees the dict grow while it reads.
        names = ["decode_steps", "prefills", "resizes", "tokens"]
        names += [f"finished_{reason}" for reason in FINISH_REASONS]
        self.counters: collections.Counter[str] = collections.Counter(dict.fromkeys(names, 0))

    def start(self, warmup: bool = False) -> Engine:
        """Starts the decode thread (once); returns self.

        Args:
          warmup: first compile every batch size, prefill group size and the row moves between
            them, so that no request waits for a compilation; each compiled program is logged
            (INFO, with its number, the total and the seconds it took).
        """
        if self._thread is None:
            if warmup:
                self._warmup()
            self._thread = threading.Thread(target=self._run, name="sparse_jax-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stops the thread; requests still active or queued end with "cancelled"."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for ticket in [*self._queue, *self._tickets]:
            if ticket is not None:
                ticket.emit(Event(finish_reason="cancelled"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def check(self, request: Request) -> None:
        """Raises ValueError unless the engine can serve ``request``."""
        cfg = self.cfg
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError("the prompt must be a non-empty sequence of token ids")
        check_tokens(cfg, prompt)
        check_context(
            cfg.max_seq_len, prompt.size, as_count(request.max_tokens, "max_tokens"), "max_tokens"
        )
        if request.settings.top_k > cfg.vocab_size:
            raise ValueError(f"top_k={request.settings.top_k} exceeds the vocabulary")

    def submit(self, request: Request, on_event) -> Ticket:
        """Queues ``request``; ``on_event(Event)`` is called on the engine thread.

        Raises:
          ValueError: a request the engine cannot serve (see :meth:`check`).
          EngineBusy: the queue is full, or the engine is not running.
        """
        self.check(request)
        ticket = Ticket(request, on_event)
        with self._wake:
            if not self.running:
                raise EngineBusy("the engine is not running")
            if len(self._queue) >= self.max_queue:
                raise EngineBusy(f"{len(self._queue)} requests are already waiting")
            self._queue.append(ticket)
            self._wake.notify()
        return ticket

    def generate(self, request: Request) -> tuple[list[int], str]:
        """Submits ``request`` and waits: (new tokens, finish reason)."""
        tokens: list[int] = []
        done = threading.Event()

        def on_event(event: Event) -> None:
            if event.token is not None:
                tokens.append(event.token)
            if event.finish_reason is not None:
                done.set()

        ticket = self.submit(request, on_event)
        done.wait()
        return tokens, ticket.finish_reason

    def status(self) -> dict:
        """Slots, rows decoded, active and queued requests, counters (steps, tokens, ends)."""
        return {
            "running": self.running,
            "slots": self.slots,
            "rows": self._rows,
            "active": sum(t is not None for t in self._tickets),
            "queued": len(self._queue),
            **self.counters,
        }

    def _warmup(self) -> None:
        steps = self._warmup_steps()
        for index, (label, step) in enumerate(steps, 1):
            start = time.perf_counter()
            step()
            # One line per program: a first compilation takes seconds to minutes, in silence.
            log.info(
                "compiled %d/%d: %s (%.1f s)", index, len(steps), label, time.perf_counter() - start
            )

    def _warmup_steps(self) -> list[tuple[str, Callable[[], object]]]:
        """(label, call) for every program requests can need, in the order they are compiled.

        Each batch size of the cache gets its prefill group sizes and its decode step, then the
        move to the next size; the calls change ``self._rows`` as they go, so they run in order.
        """
        steps: list[tuple[str, Callable[[], object]]] = []
        rows = 1
        while True:
            group = 1
            while True:
                settings = [RowSettings(temperature=1.0)] * group
                lengths = [1]
                if self.cfg.max_seq_len % self.options.prefill_chunk:  # a last, partial chunk
                    lengths.append(self.cfg.max_seq_len)
                for length in lengths:
                    batch = [(0,) * length] * group
                    prefill = functools.partial(self._prefill, batch, settings, [self.slots])
                    label = f"prefill (group of {group}, {length}-token prompts, {rows}-row cache)"
                    steps.append((label, prefill))
                if group >= min(self.max_prefill_group, rows):
                    break
                group = min(2 * group, self.max_prefill_group)
            # Idle rows decode too; whatever this writes in them is replaced at admission.
            steps.append((f"decode step ({rows}-row cache)", self._decode_rows))
            if rows == self.slots:
                break
            grown = min(2 * rows, self.slots)
            steps.append((f"cache {rows} -> {grown} rows", functools.partial(self._resize, grown)))
            rows = grown
        # The moves back down, as requests finish.
        while rows > 1:
            shrunk = bucket(rows // 2, self.slots)
            steps.append(
                (f"cache {rows} -> {shrunk} rows", functools.partial(self._resize, shrunk))
            )
            rows = shrunk
        return steps

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._queue and not any(self._tickets):
                    self._wake.wait()
                if self._closing:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if any(self._tickets):
                    self._decode()
            except Exception as err:  # keep serving: fail the requests in flight, start afresh
                log.exception("decode failed")
                for row, ticket in enumerate(self._tickets):
                    if ticket is not None:
                        ticket.emit(Event(finish_reason="error", message=str(err)))
                        self._release(row, "error")
                self._rows = 1
                self._cache = init_cache(self.cfg, self._rows)

    def _release(self, row: int, reason: str) -> None:
        self._tickets[row] = None
        self._last[row] = 0
        self._settings[row] = RowSettings()
        self.counters[f"finished_{reason}"] += 1

    def _finish(self, row: int, reason: str) -> None:
        self._tickets[row].emit(Event(finish_reason=reason))
        self._release(row, reason)

    def _drop_cancelled(self) -> None:
        for row, ticket in enumerate(self._tickets):
            if ticket is not None and ticket.cancelled:
                self._finish(row, "cancelled")

    def _take_waiting(self, free: int) -> list[Ticket]:
        taken: list[Ticket] = []
        with self._wake:
            while self._queue and len(taken) < free:
                ticket = self._queue.popleft()
                if ticket.cancelled:
                    ticket.emit(Event(finish_reason="cancelled"))
                    self.counters["finished_cancelled"] += 1
                else:
                    taken.append(ticket)
        return taken

    def _resize_toward(self, rows: int) -> None:
        """Doubles or halves the rows until there are ``rows`` (a bucket): few compiled moves."""
        while self._rows < rows:
            self._resize(min(2 * self._rows, self.slots))
        while self._rows > rows:
            self._resize(bucket(self._rows // 2, self.slots))

    def _resize(self, rows: int) -> None:
        """Re-lays the cache out with ``rows`` rows; shrinking moves the active ones first."""
        if rows == self._rows:
            return
        kept = range(self._rows)
        if rows < self._rows:
            kept = [row for row in kept if self._tickets[row] is not None]
        source = [*kept, *[self._rows] * (rows - len(kept))]  # out of range: an empty row
        self._cache = take_rows(self._cache, jnp.asarray(source, jnp.int32))
        moved = [row if row < self._rows else None for row in source]
        moved += [None] * (self.slots - rows)
        self._tickets = [None if r is None else self._tickets[r] for r in moved]
        self._settings = [RowSettings() if r is None else self._settings[r] for r in moved]
        self._last = np.array([0 if r is None else self._last[r] for r in moved], np.int32)
        self._steps = np.array([0 if r is None else self._steps[r] for r in moved], np.int32)
        self._rows = rows
        self.counters["resizes"] += 1

    def _admit(self) -> None:
        active = sum(t is not None for t in self._tickets)
        with self._wake:
            waiting = min(len(self._queue), self.slots - active)
        rows = bucket(active + waiting, self.slots)
        if rows > self._rows or rows <= self._rows // 4:
            self._resize_toward(rows)
        free = [row for row in range(self._rows) if self._tickets[row] is None]
        group = self._take_waiting(min(len(free), self.max_prefill_group))
        if not group:
            return
        rows = free[: len(group)]
        for row, ticket in zip(rows, group, strict=True):
            self._tickets[row] = ticket
            self._settings[row] = ticket.request.settings
        first = self._prefill(
            [t.request.prompt for t in group], [t.request.settings for t in group], rows
        )
        self.counters["prefills"] += 1
        for row, token in zip(rows, first, strict=True):
            self._steps[row] = 0
            self._deliver(row, int(token))

    def _prefill(self, prompts, settings: list[RowSettings], rows: list[int]) -> np.ndarray:
        """Prefills prompts into cache rows (``self.slots`` drops one); first tokens [G]."""
        logits, fresh = prefill_group(
            self.cfg, self.params, [list(p) for p in prompts], self.options, self.max_prefill_group
        )
        padded = len(fresh.next_pos)
        arrays = settings_arrays(settings + [RowSettings()] * (padded - len(settings)))
        first = sample_rows(
            logits,
            arrays["seeds"],
            jnp.zeros((padded,), jnp.int32),
            arrays["temperature"],
            arrays["top_k"],
            arrays["top_p"],
        )
        targets = np.full((padded,), self.slots, np.int32)  # out of range: dropped
        targets[: len(rows)] = rows
        self._cache = insert_rows(self._cache, fresh, jnp.asarray(targets))
        return np.asarray(first)[: len(prompts)]

    def _deliver(self, row: int, token: int) -> None:
        ticket = self._tickets[row]
        request = ticket.request
        ticket.generated += 1
        self._steps[row] += 1
        if token in request.stop_tokens:
            self._finish(row, "stop")
            return
        self._last[row] = token
        self.counters["tokens"] += 1
        if ticket.generated >= request.max_tokens:
            ticket.emit(Event(token=token, finish_reason="length"))
            self._release(row, "length")
        else:
            ticket.emit(Event(token=token))

    def _decode_rows(self) -> np.ndarray:
        """One decode step for every row of the cache; each row's next token."""
        rows = self._rows
        arrays = settings_arrays(self._settings[:rows])
        logits, self._cache, _ = decode_step_jit(
            self.cfg, self.options, self.params, self._cache, jnp.array(self._last[:rows])
        )
        tokens = sample_rows(
            logits,
            arrays["seeds"],
            jnp.array(self._steps[:rows]),
            arrays["temperature"],
            arrays["top_k"],
            arrays["top_p"],
        )
        self.counters["decode_steps"] += 1
        return np.asarray(tokens)

    def _decode(self) -> None:
        for row, token in enumerate(self._decode_rows()):
            if self._tickets[row] is not None:
                self._deliver(row, int(token))
