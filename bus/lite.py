"""A small blocking NATS client for one request: what a one-shot `aish NAME "question"` needs, and no more.

Why not nats-py here: importing it costs ~0.25 s (asyncio, aiohttp, its JetStream modules) where the whole
one-shot has a budget of about four times `python -c pass` (~0.1 s), and no kept lighter client fits
(nats-python, the synchronous one on PyPI, was last released in 2020 and has neither headers nor nkeys;
nats-core, the NATS team's lean client, is asyncio-based and needs Python 3.13). So this speaks the
subset of the NATS client protocol the server documents
(https://docs.nats.io/reference/reference-protocols/nats-protocol): INFO, CONNECT, PING/PONG, SUB, PUB,
MSG/HMSG, +OK/-ERR; nkey sign-in (the server's nonce signed with the ``nkeys`` package); TLS with ``ssl``.
Everything else (several servers, reconnects, WebSocket, JetStream, a server asking for what this does
not speak) raises :class:`Unsupported`, and the caller hands the request to the full client.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import ssl


CRLF = b"\r\n"
# "NATS/1.0 503" with no body: nobody subscribes to the subject a request went to (docs/protocol.md).
NO_RESPONDERS = "503"


class Unsupported(Exception):
    """Something this client does not do (or a server it could not reach or sign in to): the caller
    hands over to the full client, which does it, or reports it properly."""


def tls_context(url: str, tls_ca: Path | None, data_dir: Path) -> ssl.SSLContext | None:
    """A context that verifies the server against ``tls_ca`` (or the data dir's generated CA) when the
    URL asks for TLS (``tls://``, ``wss://``) or a CA is given; None for plain connections."""
    ca = tls_ca
    generated = data_dir / "tls" / "ca.pem"
    if ca is None and url.startswith(("tls://", "wss://")) and generated.exists():
        ca = generated
    if ca is None and not url.startswith(("tls://", "wss://")):
        return None
    import ssl  # only TLS connections pay for it

    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except OSError as err:  # missing, unreadable, or not a certificate (ssl.SSLError is an OSError)
        from bus.errors import ConfigError

        why = (err.reason or str(err)) if isinstance(err, ssl.SSLError) else (err.strerror or str(err))
        given = " (--tls-ca, TEKTON_TLS_CA or the config's tls_ca)" if ca == tls_ca else ""
        raise ConfigError(f"cannot use the TLS CA certificate {ca}{given}: {why}") from None


class Message(NamedTuple):
    subject: str
    reply: str
    data: bytes
    status: str = ""  # the status code of a header-only message ("503": no responders)


def _host_port(url: str) -> tuple[str, int]:
    """``nats://host:port`` -> (host, port); anything fancier (users, paths, IPv6) is Unsupported."""
    rest = url.split("://", 1)[1].rstrip("/")
    host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "4222")
    if not host or "@" in rest or "/" in rest or "[" in rest or not host.isascii() or not port.isdigit():
        raise Unsupported(f"{url}: only nats://HOST:PORT")
    return host, int(port)


class LiteConnection:
    """One blocking connection: ``publish``, ``subscribe``, ``next_msg``. Use it as a context manager."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        seed: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 2.0,
    ):
        if "," in url.strip(",") or not url.startswith(("nats://", "tls://")):
            raise Unsupported(f"{url}: only one nats:// or tls:// server")
        host, port = _host_port(url)
        try:
            # An ASCII host as bytes: a str would be IDNA-encoded, which imports unicodedata and stringprep.
            sock = socket.create_connection((host.encode("ascii"), port), timeout=connect_timeout)  # type: ignore[arg-type]
        except OSError as err:
            raise Unsupported(f"cannot reach {url}: {err}") from err
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock: socket.socket | ssl.SSLSocket = sock
        self._buf = bytearray()
        self._sids = 0
        try:
            info = self._info()
            if info.get("tls_required") or url.startswith("tls://"):
                if tls is None:
                    raise Unsupported("the server asks for TLS and no CA is configured")
                try:
                    self._sock = tls.wrap_socket(sock, server_hostname=host)
                except OSError as err:  # ssl.SSLError is one
                    raise Unsupported(f"TLS: {err}") from err
            self.max_payload = int(str(info.get("max_payload", 1024 * 1024)))
            self._send(b"CONNECT " + json.dumps(self._connect_options(name, info, seed)).encode() + CRLF)
            self._send(b"PING" + CRLF)
            self._pong()
        except BaseException:
            self.close()
            raise

    def _connect_options(self, name: str, info: dict[str, object], seed: str | None) -> dict[str, object]:
        options: dict[str, object] = {
            "verbose": False,
            "pedantic": False,
            "tls_required": bool(info.get("tls_required")),
            "name": name,
            "lang": "python",
            "version": "tekton-lite",
            "protocol": 1,
            "headers": True,
            "no_responders": True,
        }
        if info.get("auth_required"):
            nonce = info.get("nonce")
            if seed is None or not isinstance(nonce, str):
                raise Unsupported("the server asks for credentials this client has not got")
            import nkeys  # type: ignore[import-untyped]  # only a server with users pays for it

            key = nkeys.from_seed(seed.encode())
            options["nkey"] = key.public_key.decode()
            options["sig"] = base64.b64encode(key.sign(nonce.encode())).decode()
        return options

    def _info(self) -> dict[str, object]:
        op, _, rest = self._line().partition(b" ")
        if op.upper() != b"INFO":
            raise Unsupported(f"not a NATS server (it said {op[:20]!r})")
        info = json.loads(rest)
        if not isinstance(info, dict):
            raise Unsupported("a malformed INFO")
        return info

    def _pong(self) -> None:
        while True:
            line = self._line()
            op = line.split(b" ", 1)[0].upper()
            if op == b"PONG":
                return
            if op == b"-ERR":
                raise Unsupported(line.decode(errors="replace"))
            if op == b"PING":
                self._send(b"PONG" + CRLF)
            # +OK, INFO (a cluster's news): nothing to do before the PONG

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buf += chunk

    def _line(self) -> bytes:
        while (end := self._buf.find(CRLF)) < 0:
            self._fill()
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n + 2:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[: n + 2]
        return data

    def subscribe(self, subject: str) -> None:
        self._sids += 1
        self._send(f"SUB {subject} {self._sids}".encode() + CRLF)

    def publish(self, subject: str, data: bytes, reply: str = "", *, flush: bool = False) -> None:
        """Publish; with ``flush`` wait for the server's PONG, so it has seen everything before."""
        head = f"PUB {subject} {reply} {len(data)}" if reply else f"PUB {subject} {len(data)}"
        self._send(head.encode() + CRLF + data + CRLF + (b"PING" + CRLF if flush else b""))
        if flush:
            self._pong()

    def next_msg(self, timeout: float) -> Message:
        """The next message on one of our subscriptions; TimeoutError after ``timeout`` s of silence."""
        deadline = time.monotonic() + timeout
        while True:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                line = self._line()
            except TimeoutError:
                raise TimeoutError from None
            op, _, args = line.partition(b" ")
            op = op.upper()
            if op == b"MSG":
                parts = args.decode().split(" ")
                subject, size = parts[0], int(parts[-1])
                return Message(subject, parts[2] if len(parts) == 4 else "", self._take(size))
            if op == b"HMSG":
                parts = args.decode().split(" ")
                subject, head_size, size = parts[0], int(parts[-2]), int(parts[-1])
                raw = self._take(size)
                status = raw[:head_size].split(CRLF, 1)[0].split(b" ")
                return Message(
                    subject,
                    parts[2] if len(parts) == 5 else "",
                    raw[head_size:],
                    status[1].decode() if len(status) > 1 else "",
                )
            if op == b"PING":
                self._send(b"PONG" + CRLF)
            elif op == b"-ERR":  # e.g. a permissions violation: the full client says it its way
                raise Unsupported(args.decode(errors="replace"))
            # +OK, PONG, INFO: nothing to do

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> LiteConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
