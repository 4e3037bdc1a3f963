"""The listening socket: bound before the engine compiles, served by uvicorn once it is ready.

:func:`bind` takes the address at once, so that a port already in use or a host that cannot be
listened on fails in a second instead of after minutes of compilation; the socket does not
accept connections until :func:`serve` hands it to uvicorn, so clients are refused (not left
waiting) while the engine compiles. :func:`serve` prints its banner only once uvicorn listens.
"""

from __future__ import annotations

import socket
import sys

import uvicorn

MAX_PORT = 65535


def check_port(port: int) -> int:
    """``port`` if it is 0 (any free port) or 1..65535.

    Raises:
      ValueError: anything else, naming the allowed range.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        raise ValueError(f"port {port!r} is invalid: use 1 to {MAX_PORT}, or 0 for any free port")
    return port


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not yet listening.

    Raises:
      ValueError: a bad port, a host that does not resolve, or an address that cannot be
        bound (in use, not local, not permitted), with the operating system's reason.
    """
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise ValueError(f"cannot listen on host {host!r}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may take the port while old connections time out.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (the port it got, if it asked for 0)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, banner: str):
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.banner, file=sys.stderr, flush=True)


def serve(app, sock: socket.socket, banner: str) -> None:
    """Serves ``app`` on the bound ``sock`` until interrupted; prints ``banner`` once listening."""
    config = uvicorn.Config(app, log_level="warning")
    _Server(config, banner).run(sockets=[sock])
