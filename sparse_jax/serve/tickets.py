"""What passes between a caller and the batching engine: requests, events and tickets.

A :class:`Request` is one generation in token ids; :meth:`Engine.submit
<sparse_jax.serve.engine.Engine.submit>` returns a :class:`Ticket` for it, and the engine
reports each new token and the end of the request as an :class:`Event` through the ticket's
callback. Cancelling the ticket (a client that went away, a stop string found) ends the
request before the engine's next step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from sparse_jax.serve.row_sampling import RowSettings

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, in token ids.

    Attributes:
      prompt: the prompt's ids (BOS included if wanted), non-empty.
      max_tokens: most new tokens, >= 1; the prompt plus ``max_tokens - 1`` must fit the
        context.
      settings: temperature, top-k, top-p and seed.
      stop_tokens: ids that end the request (not emitted).
    """

    prompt: tuple[int, ...]
    max_tokens: int
    settings: RowSettings = dataclasses.field(default_factory=RowSettings)
    stop_tokens: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """What the engine reports: a new token, or the end of the request (``finish_reason`` set).

    Attributes:
      token: a new token id, or None.
      finish_reason: None until the last event, then "stop" (a stop token), "length",
        "cancelled" or "error".
      message: what went wrong, for "error".
    """

    token: int | None = None
    finish_reason: str | None = None
    message: str = ""


class EngineBusy(RuntimeError):
    """The queue is full or the engine is shutting down; try again later."""


class Ticket:
    """A submitted request: :meth:`cancel` it to free its slot (or drop it from the queue)."""

    def __init__(self, request: Request, on_event):
        self.request = request
        self.generated = 0
        self.finish_reason: str | None = None
        self._on_event = on_event
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Asks the engine to end the request before its next step (no-op once finished)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        if self.finish_reason is not None:
            return
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        try:
            self._on_event(event)
        except Exception:  # a consumer that cannot take events any more has gone away
            log.exception("event callback failed; cancelling the request")
            self.cancel()
