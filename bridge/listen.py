"""Listening sockets for the HTTP edges: bound before the server starts, refused in one line."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bus.errors import ConfigError

# How long the bridge keeps an idle kept-alive connection open. Longer than HTTP clients keep idle
# pooled connections (aiohttp 15 s, httpx 5 s): with uvicorn's 5 s a client reusing a connection just
# as the server closed it got "connection reset" / "server disconnected" mid-burst.
HTTP_KEEP_ALIVE_S = 75


def http_socket(host: str, port: int) -> socket.socket:
    """Listening before uvicorn starts, so port 0 works and the chosen port is known; connections
    made before uvicorn serves wait in the backlog (uvicorn's default length)."""
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and with Nagle on, a kept-alive HTTP connection waits ~40 ms per response.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as err:
        sock.close()
        raise listen_error(host, port, err) from None
    return sock


def listen_error(host: str, port: int, err: Exception) -> ConfigError:
    """One line for a port we cannot listen on (taken, privileged, a host not of this machine)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return ConfigError(f"cannot listen on {host}:{port}: {reason}")


def http_server(app: Any, *, shutdown_s: int, tls: tuple[Path | None, Path | None] | None = None) -> Any:
    """A uvicorn server for ``app`` (run it with ``serve([http_socket(...)])``) that leaves SIGINT and
    SIGTERM to tekton, which tells it when to exit; ``tls``: its certificate and key files."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    cert, key = tls or (None, None)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_keep_alive=HTTP_KEEP_ALIVE_S,
        timeout_graceful_shutdown=shutdown_s,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    return Server(config)
