"""A nats-py transport for TLS: a plain non-blocking socket on the event loop, and OpenSSL on memory.

asyncio's TLS (``loop.start_tls``, what nats-py's ``TcpTransport`` uses) makes a TLS record of every
piece written (nats-py hands it a piece per publish) and runs each socket event through its Python SSL
protocol. Here a socket event is what it is for a plain socket (one ``recv`` or ``send`` from a callback
the loop runs, as asyncio's own sockets do) plus one ``SSLObject`` call per TLS record, on memory: each
flush goes out as one record, all the records a ``recv`` brought are decrypted in the same event, and
OpenSSL never touches the socket itself (an ``SSLSocket`` reads a record in two system calls and ends
each batch with a failing one, whose exception Python builds with a formatted message).

What that buys, measured (bench/security.py against asyncio's TLS in the same run): fewer records at
both ends, so less CPU per request and much less per long stream. What it cannot remove is OpenSSL's
own cost per record, several microseconds each inside a busy process (a tight loop does one in ~1 µs).

The server is verified as before: the caller's ``ssl.SSLContext`` (its CA, ``check_hostname``) and the
server's name, so a wrong CA or name fails the handshake with the same ``ssl.SSLError``.

Until ``connect_tls`` the connection is plain TCP (nats-server sends its INFO in clear before TLS starts).
nats-py keeps one transport object for its reconnects: ``connect`` starts afresh on a closed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from urllib.parse import ParseResult

from nats.aio.transport import Transport

# What a recv asks for: several TLS records (16 KiB each at most).
READ_SIZE = 64 * 1024
# Stop reading (and let TCP push back on the server) while this much is read and not taken.
PAUSE_AT = 4 * READ_SIZE


class TlsSocketTransport(Transport):
    """nats-py's :class:`~nats.aio.transport.Transport` over a non-blocking socket, plain until
    :meth:`connect_tls` puts an ``SSLObject`` between it and nats-py."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._reset()

    def _reset(self) -> None:
        self._fd = -1
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()  # bytes from the socket, not yet decrypted
        self._outgoing = ssl.MemoryBIO()  # encrypted bytes, not yet sent
        self._chunks: list[bytes] = []  # received (and decrypted), not yet read
        self._size = 0
        self._eof = False
        self._error: OSError | None = None
        self._reader: asyncio.Future[None] | None = None  # a read() waiting for data
        self._reading = False  # our callback is registered for readable
        self._unsent = b""  # bytes the socket has not taken yet
        self._writing = False  # our callback is registered for writable
        self._drained: asyncio.Future[None] | None = None  # a drain() waiting for the socket

    # -- opening ---------------------------------------------------------------------------------

    async def connect(self, uri: ParseResult, buffer_size: int, connect_timeout: int) -> None:
        self.close()
        self._reset()  # a reconnect starts from nothing
        sock = await asyncio.wait_for(_open(uri.hostname or "localhost", uri.port or 4222), connect_timeout)
        self._sock, self._fd = sock, sock.fileno()
        self._start_reading()

    async def connect_tls(
        self, uri: str | ParseResult, ssl_context: ssl.SSLContext, buffer_size: int, connect_timeout: int
    ) -> None:
        assert self._sock is not None, f"{type(self).__name__}.connect must be called first"
        if self._size:
            raise ConnectionError("nats: the server sent more than its INFO before TLS")
        hostname = uri if isinstance(uri, str) else uri.hostname
        self._stop_reading()
        tls = ssl_context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        try:
            await asyncio.wait_for(self._handshake(tls), connect_timeout)
        except BaseException:
            self.close()
            raise
        self._tls = tls
        self._start_reading()
        if self._incoming.pending:  # what came with the handshake's last flight (session tickets)
            self._decrypt()

    async def _handshake(self, tls: ssl.SSLObject) -> None:
        loop = asyncio.get_running_loop()
        sock = self._sock
        assert sock is not None
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if self._outgoing.pending:
                await loop.sock_sendall(sock, self._outgoing.read())
            if done:
                return
            data = await loop.sock_recv(sock, READ_SIZE)
            if not data:
                raise ssl.SSLEOFError("nats: the server closed the connection during the TLS handshake")
            self._incoming.write(data)

    # -- reading ---------------------------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading and self._sock is not None and not self._eof and self._error is None:
            asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._fail(err)
            return
        if not data:
            self._eof = True
            self._stop_reading()
        elif self._tls is None:
            self._keep(data)
        else:
            self._incoming.write(data)
            self._decrypt()
        self._wake_reader()

    def _decrypt(self) -> None:
        """Every whole record the socket brought, decrypted; a partial one waits for the rest."""
        tls = self._tls
        assert tls is not None
        while self._incoming.pending or tls.pending():
            try:
                data = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:  # the rest of a record, or a record with nothing for us
                break
            except ssl.SSLZeroReturnError:  # the server's close_notify
                data = b""
            except ssl.SSLError as err:
                self._fail(err)
                return
            if not data:
                self._eof = True
                self._stop_reading()
                break
            self._keep(data)
        if self._outgoing.pending:  # OpenSSL answering the server (an alert, a key update)
            self._send(self._outgoing.read())
        self._wake_reader()

    def _keep(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= PAUSE_AT:
            self._stop_reading()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    async def _wait_readable(self) -> None:
        self._reader = asyncio.get_running_loop().create_future()
        try:
            await self._reader
        finally:
            self._reader = None

    def _take(self, n: int) -> bytes:
        if len(self._chunks) == 1 and self._size <= n:
            data = self._chunks.pop()
        else:
            joined = b"".join(self._chunks)
            data, rest = joined[:n], joined[n:]
            self._chunks = [rest] if rest else []
        self._size -= len(data)
        if self._size < READ_SIZE:
            self._start_reading()
        return data

    async def read(self, buffer_size: int) -> bytes:
        while not self._size:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait_readable()
        return self._take(buffer_size)

    async def readline(self) -> bytes:
        while True:
            joined = b"".join(self._chunks)
            self._chunks = [joined] if joined else []
            end = joined.find(b"\n")
            if end >= 0:
                return self._take(end + 1)
            if self._error is not None:
                raise self._error
            if self._eof:
                return self._take(self._size)
            await self._wait_readable()

    def at_eof(self) -> bool:
        return self._eof and not self._size

    # -- writing ---------------------------------------------------------------------------------

    def write(self, payload: bytes) -> None:
        if not payload:  # nats-py's flusher after a flush's PING, with nothing else to send
            return
        if self._sock is None or self._error is not None:
            return  # as asyncio's transports after close: nats-py flushes on its way out
        if self._tls is None:
            self._send(payload)
            return
        try:
            self._tls.write(payload)
        except ssl.SSLError as err:
            self._fail(err)
            return
        self._send(self._outgoing.read())

    def writelines(self, payload: list[bytes]) -> None:
        # One write (one TLS record up to 16 KiB) for all nats-py's flusher gathered.
        self.write(b"".join(payload))

    def _send(self, data: bytes) -> None:
        if self._unsent:
            self._unsent += data
        else:
            self._unsent = data
            self._flush()

    def _flush(self) -> None:
        """Send what waits, as far as the socket takes it; the writable callback does the rest."""
        sock = self._sock
        if sock is None:
            return
        try:
            sent = sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._fail(err)
            return
        self._unsent = self._unsent[sent:]
        if self._unsent:
            if not self._writing:
                asyncio.get_running_loop().add_writer(self._fd, self._flush)
                self._writing = True
            return
        if self._writing:
            asyncio.get_running_loop().remove_writer(self._fd)
            self._writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        while self._unsent and self._error is None:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        if self._error is not None:
            raise self._error

    # -- closing ---------------------------------------------------------------------------------

    def _fail(self, err: OSError) -> None:
        self._error = err
        self._release()

    def _release(self) -> None:
        """Stop watching the socket and wake whoever waits on it."""
        self._stop_reading()
        if self._writing:
            asyncio.get_running_loop().remove_writer(self._fd)
            self._writing = False
        self._wake_reader()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._eof = True
        self._release()
        if self._tls is not None and self._error is None:
            # A close_notify, as asyncio's TLS sends: best effort, never waiting for the answer.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            with contextlib.suppress(OSError):
                sock.send(self._unsent + self._outgoing.read())
        self._unsent = b""
        # Closed is closed: nats-py drains on its way out (also after the error it was told of).
        self._error = None
        sock.close()

    async def wait_closed(self) -> None:
        return None

    def __bool__(self) -> bool:
        # nats-py replaces a transport that is false with its own: this one is always ready to
        # (re)connect.
        return True


async def _open(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (without Nagle, as asyncio's), trying each address."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as err:
            sock.close()
            last = err
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    raise last or OSError(f"nats: no address for {host}")
