"""Serving: a continuous-batching engine and an OpenAI-compatible HTTP server around it.

:class:`Engine` decodes many token-id :class:`Request` s together on a background thread;
:func:`create_app` puts the FastAPI routes of ``serve.py`` in front of it.
"""

from sparse_jax.server.app import ServerSettings, create_app
from sparse_jax.server.engine import Engine
from sparse_jax.server.row_sampling import RowSettings
from sparse_jax.server.tickets import EngineBusy, Event, Request, Ticket

__all__ = [
    "Engine",
    "EngineBusy",
    "Event",
    "Request",
    "RowSettings",
    "ServerSettings",
    "Ticket",
    "create_app",
]
