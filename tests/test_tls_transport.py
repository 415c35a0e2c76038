"""bus.tls.TlsSocketTransport, the TLS transport every Tekton process connects with, against a real
nats-server with TLS: the handshake and its verification, messages larger than a TLS record both ways,
the server going away mid-stream and coming back."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import anyio
import anyio.lowlevel
import pytest
from nats.aio.msg import Msg

from bus.client import Bus
from bus.errors import NatsUnavailable
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.tls import TlsSocketTransport
from tekton import certs
from tests.helpers import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.fast]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tls_files(tmp_path: Path) -> certs.TlsFiles:
    return certs.generate(tmp_path / "tls")


@pytest.fixture
def server(tmp_path: Path, tls_files: certs.TlsFiles) -> Iterator[EmbeddedNats]:
    # A fixed port, so that a restarted server is found where the client left it.
    server = EmbeddedNats(tmp_path / "store", port=free_port(), tls=tls_files)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(server: EmbeddedNats, tls_files: certs.TlsFiles, tmp_path: Path) -> TektonSettings:
    return TektonSettings(nats_url=server.url, data_dir=tmp_path / "none", tls_ca=tls_files.ca)


async def subscribed(bus: Bus) -> None:
    """The server has the subscriptions ``bus`` made: nats-py writes a flush's PING ahead of commands
    still queued (a SUB), so the first PONG may come before the server saw the SUB; the second PING
    goes after it."""
    await bus.nc.flush()
    await bus.nc.flush()


def transport_of(bus: Bus) -> TlsSocketTransport:
    transport = bus.nc._transport
    assert isinstance(transport, TlsSocketTransport)
    return transport


async def test_a_tls_connection_is_ours_and_verified(settings: TektonSettings) -> None:
    async with Bus.connect(settings, name="test") as bus:
        tls = transport_of(bus)._tls
        assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
        # The server proved the name we asked for with a certificate from our CA.
        names = [value for _, value in tls.getpeercert()["subjectAltName"]]
        assert "127.0.0.1" in names

        async def echo(msg: Msg) -> None:
            await msg.respond(b"back: " + msg.data)

        await bus.nc.subscribe("echo", cb=echo)
        reply = await bus.nc.request("echo", b"sealed", timeout=10)
        assert reply.data == b"back: sealed"


async def test_a_wrong_ca_or_a_wrong_name_fails_the_handshake(
    server: EmbeddedNats, settings: TektonSettings, tmp_path: Path, tls_files: certs.TlsFiles
) -> None:
    other = certs.generate(tmp_path / "other")
    with pytest.raises(NatsUnavailable) as refused:
        async with Bus.connect(settings.model_copy(update={"tls_ca": other.ca}), name="test"):
            pass
    assert "TLS handshake failed" in str(refused.value)
    # The right CA, but a name the server's certificate does not carry.
    transport = TlsSocketTransport()
    await transport.connect(urlparse(server.url), 32768, 5)
    assert (await transport.readline()).startswith(b"INFO ")
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await transport.connect_tls("elsewhere.example", context, 32768, 5)
    assert transport._sock is None  # closed, not left half open


async def test_messages_larger_than_a_record_cross_intact_both_ways(settings: TektonSettings) -> None:
    """Each message is ~55 TLS records: sent in pieces the socket takes as it can, read back while the
    records arrive split across reads (and reading pauses while nats-py has not taken them)."""
    payloads = [os.urandom(900_000) for _ in range(6)]
    got: list[bytes] = []
    all_there = anyio.Event()

    async def heard(msg: Msg) -> None:
        got.append(msg.data)
        if len(got) == len(payloads):
            all_there.set()

    async with Bus.connect(settings, name="sender") as sender, Bus.connect(settings, name="taker") as taker:
        tls = transport_of(taker)._tls
        assert tls is not None
        reads = 0
        read = tls.read

        def counted(n: int) -> bytes:
            nonlocal reads
            reads += 1
            return read(n)

        tls.read = counted  # type: ignore[method-assign]
        await taker.nc.subscribe("big", cb=heard)
        await subscribed(taker)
        for payload in payloads:
            await sender.nc.publish("big", payload)
        await sender.nc.flush(timeout=30)
        with anyio.fail_after(30):
            await all_there.wait()
    assert [hashlib.sha256(g).digest() for g in got] == [hashlib.sha256(p).digest() for p in payloads]
    assert reads >= sum(len(p) for p in payloads) // (16 * 1024)


async def test_the_server_going_away_mid_stream_and_coming_back(
    server: EmbeddedNats, settings: TektonSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops while messages stream to us (a TLS record may be cut): the connection notices,
    reconnects with a new handshake when the server is back, and carries messages again."""
    got: list[bytes] = []
    caplog.set_level(logging.ERROR, logger="nats.aio.client")

    async def heard(msg: Msg) -> None:
        got.append(msg.data)

    async with Bus.connect(settings, name="taker") as taker, Bus.connect(settings, name="sender") as sender:
        first = transport_of(taker)._tls
        await taker.nc.subscribe("flow", cb=heard)
        await subscribed(taker)

        async def flood() -> None:
            i = 0
            while sender.nc.is_connected:
                await sender.nc.publish("flow", b"%d" % i + b"." * 3000)
                i += 1
                if i % 50 == 0:
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await eventually(lambda: len(got) >= 200, within=20)
            # (In a thread: the server flushes to us while it stops, and we go on reading.)
            await anyio.to_thread.run_sync(server.stop)
            await eventually(lambda: not taker.nc.is_connected, within=20)
            tg.cancel_scope.cancel()
        server.start()
        await eventually(lambda: taker.nc.is_connected and sender.nc.is_connected, within=30)
        assert taker.nc.stats["reconnects"] == 1
        assert transport_of(taker)._tls is not first  # a new TLS session on the new connection

        async def echo(msg: Msg) -> None:
            await msg.respond(b"back: " + msg.data)

        await taker.nc.subscribe("echo", cb=echo)
        await subscribed(taker)
        assert (await sender.nc.request("echo", b"again", timeout=10)).data == b"back: again"
    # nats-py logs what its read loop did not expect (anything but an OSError from the transport).
    assert not [r for r in caplog.records if "encountered error" in r.getMessage()]
