"""The client side of the contract: connect, stream a specialist's answer, list running specialists.

async with Bus.connect(settings) as bus:
    async with bus.stream("apollo", [ChatMessage(role="user", content="hi")]) as s:
        async for text in s:
            print(text, end="")
    result = await s.result()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import ParseResult

import anyio
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.errors import NotFoundError
from nats.protocol.command import sub_cmd, unsub_cmd
from pydantic import ValidationError

from bus import tracing
from bus.auth import Credentials, NotAuthorized, find_credentials
from bus.bulk import BulkAttachment, BulkPlan, BulkStream
from bus.discovery import SPECIALIST_ROLE, STALL_S, SpecialistView, gather, same_prefix, survey
from bus.errors import (
    BusError,
    ConfigError,
    ErrorCode,
    GatewayUnavailable,
    IdleTimeout,
    MalformedFrame,
    NatsUnavailable,
    RunNotFound,
    SpecialistUnavailable,
    StreamGap,
    Unauthorized,
    from_wire,
    may_have_started,
)
from bus.lite import NO_RESPONDERS, tls_context
from bus.logs import refused
from bus.refusals import Refusals, refusals_of
from bus.refusals import install as install_refusals
from bus.runs import (
    RunSummary,
    attach_end,
    list_runs,
    parse_run_subject,
    probe_subject,
    run_kind,
    run_listen_subject,
    run_subject,
    runs_stream_name,
)
from bus.sessions import ChatAccepted, DoubleText, GatewayClient, SessionChat, StoredFrame
from bus.settings import TektonSettings
from bus.subjects import ANONYMOUS, cancel_subject, chat_subject, inbox_owner, inbox_prefix, replay_subject
from bus.tls import TlsSocketTransport
from bus.wire import (
    AnyFrame,
    ChatMessage,
    ChatOptions,
    ChatRequest,
    ChunkFrame,
    DoneFrame,
    ErrorFrame,
    StartFrame,
    ToolCallFrame,
    ToolResultFrame,
    chunk_fields,
    encode,
    encode_request,
    unpack_frame,
    validate_frame,
)

log = structlog.get_logger("tekton.bus")


def is_no_responders(msg: Msg) -> bool:
    """NATS's own answer, to the publisher only, when nobody subscribes to the subject."""
    return not msg.data and msg.headers is not None and msg.headers.get("Status") == NO_RESPONDERS


def _websocket_transport() -> None:
    """nats-py's WebSocket transport, in a process that imported nats without aiohttp (aish does, to
    start faster: see aish_client/__init__.py)."""
    import nats.aio.transport as transport

    if transport.aiohttp is None:
        import aiohttp

        transport.aiohttp = aiohttp


async def _close_websocket_session(nc: NATS) -> None:
    """nats-py's WebSocket transport opens an aiohttp session and leaves it open when the connection
    fails ("Unclosed client session" on stderr at exit): close it."""
    session = getattr(getattr(nc, "_transport", None), "_client", None)
    if session is not None and not getattr(session, "closed", True):
        with contextlib.suppress(Exception):
            await session.close()


class _NoTls(ssl.SSLError):
    """A tls:// URL's server that did not start TLS (its INFO asked for none)."""


class _TlsTransport(TlsSocketTransport):
    """nats-py starts TLS only when the server's INFO asks for it, and would go on in clear with a
    tls:// server that does not: on a connection to a tls:// URL nothing is written before TLS."""

    _tls_url = False

    async def connect(self, uri: ParseResult, buffer_size: int, connect_timeout: int) -> None:
        self._tls_url = uri.scheme == "tls"
        await super().connect(uri, buffer_size, connect_timeout)

    def write(self, payload: bytes) -> None:
        if self._tls_url and self._tls is None and self._sock is not None:
            raise _NoTls("the server does not require TLS")  # before CONNECT: no credentials go out in clear
        super().write(payload)


class _Client(NATS):
    """nats-py's client, with three of its faults mended.

    A message it cannot read is dropped instead of ending the connection. Anyone allowed to publish may
    give a message a reply subject or a header status that is not UTF-8, or a header block too short
    to parse; nats-server passes it on, and nats-py's error reading it raised out of its read loop,
    which then read nothing more until the ping check called the connection stale minutes later: one
    such request to ``$SRV.PING`` took every specialist and the gateway off the bus.

    ``flush()`` returns only once the server has read everything sent before it (see _send_ping), and
    a flush() that timed out no longer ends the read loop when its PONG comes late."""

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """The commands already waiting for nats-py's flusher go to the socket first, then the PING.
        nats-py 2.16 writes the PING at once, ahead of them: a ``subscribe()`` then ``flush()`` could
        return before the server had the SUB, and a request sent next from another connection met
        "no responders" (a CI failure: the bridge answered 404 for a responder subscribed and flushed
        just before). nats.go's Flush keeps this order. flush(), rtt() and the ping check come here.

        Handed to the transport, not queued behind them: a queued PING outlives a broken connection
        and its PONG would answer a later flush on the next one. nats-py's own flush right after a
        reconnect keeps its way: what piled up during the outage must not hold the reconnect up."""
        transport = self._transport
        if (
            transport is not None
            and self.is_connected
            and self._pending
            and asyncio.current_task() is not self._reconnection_task
        ):
            pending, self._pending, self._pending_data_size = self._pending, [], 0
            transport.writelines(pending)
        await super()._send_ping(future)

    async def _process_pong(self) -> None:
        """A PONG answers the oldest PING, whose flush() may have given up waiting: nats-py set the
        result of that cancelled future, and the error ended its read loop (the connection heard
        nothing more until the ping check called it stale, minutes later)."""
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        try:
            await super()._process_msg(sid, subject, reply, data, headers)
        except Exception as err:  # not UTF-8; a header block too short to read (IndexError); ...
            refused.warning(log, "dropped a message nats-py cannot read", error=type(err).__name__)


async def connect(
    url: str,
    *,
    name: str = "tekton",
    connect_timeout: float = 2.0,
    creds: Credentials | None = None,
    tls: ssl.SSLContext | None = None,
    closed: anyio.Event | None = None,
) -> NATS:
    """Connect to NATS, or raise :class:`NatsUnavailable` saying how to start a server.

    ``url`` may list several servers, comma-separated (the nodes of a cluster): the first that answers
    is used, and on losing it nats-py fails over to the others (and to peers the cluster advertises).
    With ``creds`` the connection signs in with the nkey and its replies arrive under the user's own
    inbox prefix (the only one the server lets it subscribe to); with ``tls`` the server is verified.
    ``closed`` is set when the connection is closed for good (by us, or by nats-py after a server's
    -ERR).
    """

    async def closed_cb() -> None:
        if closed is not None:
            closed.set()

    if "ws://" in url or "wss://" in url:
        _websocket_transport()

    # What the server said while connecting (the reason a connect failed); kept short, since the
    # callback lives as long as the connection and anyone can make a service hear errors.
    seen: deque[str] = deque(maxlen=32)
    # nats-py reports a failed TLS verification on the first connect to the error callback and then
    # waits forever: stop it ourselves.
    tls_failed: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    refusals = Refusals()

    async def quiet(err: Exception) -> None:
        seen.append(str(err))
        told = refusals.heard(str(err))
        # A refusal of our credentials too: against a cluster nats-py goes on to the peers the server
        # advertised, each refusing in turn, for ever.
        refused = "authorization violation" in str(err).lower()
        if (isinstance(err, ssl.SSLError) or refused) and not tls_failed.done():
            tls_failed.set_result(err)
        # Permission violations are the server refusing something we asked: worth a user's attention,
        # unless the request refused tells its caller (then a second line would say it again).
        if "permission" in str(err).lower() and not told:
            log.warning("nats-server refused", error=str(err))
        else:
            log.debug("nats error", error=str(err))

    # Without credentials (a server without auth) we are the anonymous user, inbox and all.
    # (nats-py's connect() types its timeouts as int: the options go as a dict.)
    options: dict[str, Any] = {
        "inbox_prefix": inbox_prefix(creds.user if creds else ANONYMOUS),
        "connect_timeout": connect_timeout,
        # nats-py retries the *first* connect until attempts run out, and -1 means never: bound it
        # here so a missing server is a fast, clear error...
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.1,
    }
    if creds is not None:
        options["nkeys_seed_str"] = creds.seed
    if tls is not None:
        options["tls"] = tls
    nc = _Client()
    install_refusals(nc, refusals, creds.role if creds else None)
    if tls is not None and "ws://" not in url and "wss://" not in url:
        # Ours for TLS instead of nats-py's (asyncio's TLS layer): see bus/tls.py. nats-py keeps it for
        # its reconnects.
        nc._transport = _TlsTransport()
    connecting: asyncio.Future[None] = asyncio.ensure_future(
        nc.connect(
            servers=[u.strip() for u in url.split(",") if u.strip()] or [url],
            name=name,
            **options,
            error_cb=quiet,
            closed_cb=closed_cb,
        )
    )
    try:
        await asyncio.wait([connecting, tls_failed], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            failed = tls_failed.result()
            if not isinstance(failed, ssl.SSLError):
                raise NotAuthorized(url, creds.user if creds else None)
            raise failed
        connecting.result()
    except nats.errors.Error as err:
        # The server's reason arrives through the error callback; the exception only says it gave up.
        if any("authorization violation" in e.lower() for e in [*seen, str(err)]):
            raise NotAuthorized(url, creds.user if creds else None) from err
        raise NatsUnavailable(url, type(err).__name__) from err
    except NotAuthorized:
        raise
    except _NoTls:
        raise ConfigError(
            f"{url}: the server there does not require TLS, and a tls:// URL never goes in clear; "
            "use nats:// for it, or have it require TLS (tekton nats --tls)"
        ) from None
    except ssl.SSLError as err:
        raise NatsUnavailable(url, f"TLS handshake failed ({err.reason or err}); check --tls-ca") from err
    except (OSError, TimeoutError) as err:
        raise NatsUnavailable(url, type(err).__name__) from err
    except Exception as err:  # nats-py wraps some socket errors in its own types
        raise NatsUnavailable(url, str(err) or type(err).__name__) from err
    finally:
        if not connecting.done():  # we were cancelled while connecting
            connecting.cancel()
        if not nc.is_connected:
            await _close_websocket_session(nc)
    # ...and once connected, ride out server restarts by reconnecting forever.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    return nc


def client_tls(settings: TektonSettings) -> ssl.SSLContext | None:
    """A context that verifies the server against ``tls_ca`` (or the data dir's generated CA) when the
    URL asks for TLS (``tls://``, ``wss://``) or a CA is given; None for plain connections."""
    return tls_context(settings.nats_url, settings.tls_ca, settings.data_dir)


async def connect_as(
    settings: TektonSettings, *, name: str, identity: str = "local", closed: anyio.Event | None = None
) -> NATS:
    """:func:`connect` with the credentials and TLS ``settings`` find for ``identity`` (``--creds``,
    ``TEKTON_CREDS``, else the data dir's file for it; see bus/auth.py)."""
    creds = find_credentials(settings.creds, settings.data_dir, identity)
    return await connect(settings.nats_url, name=name, creds=creds, tls=client_tls(settings), closed=closed)


@dataclass(frozen=True)
class ServiceInstance:
    """One running micro service instance, as answered to ``$SRV.PING``/``$SRV.INFO``."""

    name: str
    id: str
    version: str
    metadata: dict[str, str]
    description: str = ""

    @property
    def capabilities(self) -> dict[str, float]:
        scores = json.loads(self.metadata.get("capabilities", "{}"))
        return {str(k): float(v) for k, v in scores.items()}

    @property
    def primary(self) -> list[str]:
        return list(json.loads(self.metadata.get("primary", "[]")))


@dataclass
class Replay:
    """The subscriptions reading one run back from the runs stream."""

    subs: list[Subscription]

    async def unsubscribe(self) -> None:
        for sub in self.subs:
            with suppress(nats.errors.Error, OSError):  # already gone (a closed connection, say)
                await sub.unsubscribe()


@dataclass
class StreamResult:
    text: str
    start: StartFrame
    done: DoneFrame


def _time_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Inbox:
    """Messages of one reply subject, in arrival order, for exactly one reader.

    A deque and a single waiter future: about half the cost of an ``asyncio.Queue`` per message, which
    shows at 100k chunks/s.
    """

    __slots__ = ("_messages", "_waiter")

    def __init__(self) -> None:
        self._messages: deque[Msg] = deque()
        self._waiter: asyncio.Future[bool] | None = None

    def put(self, msg: Msg) -> None:
        self._messages.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def __len__(self) -> int:
        return len(self._messages)

    async def peek(self, within: float) -> Msg | None:
        """The next message without taking it, or None when none arrives ``within`` seconds."""
        if not self._messages and not await self._wait(within):
            return None
        return self._messages[0]

    async def _wait(self, within: float) -> bool:
        # A bare timer, not asyncio.timeout(): 6.8 against 9.3 us a wait, two waits an answer.
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(within, _time_up, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def get(self, within: float) -> Msg | None:
        """The next message, or None when none arrives ``within`` seconds."""
        if not self._messages and not await self._wait(within):
            return None
        return self._messages.popleft()


class ReplayedInbox(Inbox):
    """What a replica's replay of a run brings (an inbox of frames ended by an empty message), then the
    run's live frames (which may repeat the last replayed ones: the reader drops those)."""

    __slots__ = ("_live", "_replayed")

    def __init__(self, replayed: Inbox, live: Inbox):
        super().__init__()
        self._replayed: Inbox | None = replayed
        self._live = live

    def __len__(self) -> int:
        return len(self._replayed if self._replayed is not None else self._live)

    async def _source(self, within: float) -> Inbox | None:
        if self._replayed is not None:
            msg = await self._replayed.peek(within)
            if msg is None:
                return None
            if msg.data or msg.headers:
                return self._replayed
            self._replayed = None  # the replay's end: live from here on
        return self._live

    async def peek(self, within: float) -> Msg | None:
        source = await self._source(within)
        return None if source is None else await source.peek(within)

    async def get(self, within: float) -> Msg | None:
        source = await self._source(within)
        return None if source is None else await source.get(within)


class NothingPending:
    """Base of the stand-ins for a subscription's pending queue (nats-py 2.x hands that queue each
    message as it is read, with ``put_nowait``): a stand-in takes each message there and then, so
    nothing is ever pending in it."""

    __slots__ = ()

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def task_done(self) -> None:
        return None

    async def join(self) -> None:  # a drain waits for what is pending: nothing
        return None


class _Deliver(NothingPending):
    """Stands in for a callback-less subscription's pending queue: the message goes straight to the
    run's inbox, so a run costs no asyncio queue and no subscription task."""

    __slots__ = ("_routes", "_subject")

    def __init__(self, routes: dict[str, Inbox], subject: str):
        self._routes, self._subject = routes, subject

    def put_nowait(self, msg: Msg) -> None:
        if msg.subject == self._subject:  # (probes of the run are dropped: silence answers them)
            inbox = self._routes.get(msg.subject)
            if inbox is not None:
                inbox.put(msg)


class _RunSubscription(Subscription):
    """A run's subscription as nats-py keeps it (in its table of subscriptions, re-sent on a
    reconnect, ended by ``unsubscribe``), made without what nats-py builds for a subscription read
    by iteration: its asyncio queue (the run's messages go to :class:`_Deliver`) and its message
    iterator. Every attribute nats-py 2.x reads of a subscription is set here; a test compares them
    with a real one's, so a nats-py that adds one is caught."""

    def __init__(self, nc: NATS, sid: int, subject: str, deliver: _Deliver) -> None:
        self._conn, self._id, self._subject, self._queue = nc, sid, subject, ""
        self._max_msgs = self._received = self._pending_size = 0
        self._cb, self._future, self._closed = None, None, False
        self._pending_msgs_limit, self._pending_bytes_limit = 0, 0
        self._pending_queue = deliver  # type: ignore[assignment]
        self._pending_next_msgs_calls = {}
        self._wait_for_msgs_task = self._message_iterator = None
        self._jsi = None


async def _subscribe_run(nc: NATS, subject: str, deliver: _Deliver) -> Subscription:
    """Subscribe to a run's subject (made by bus.subjects, so already checked), its messages handed
    to ``deliver``: nats-py's ``subscribe`` without its per-subscription queue, iterator and flush
    request. The SUB joins the connection's next write when one is already due, else asks for one;
    the run's request follows it in the same write, so the server has the subscription before anyone
    answers (bench/results/hot_path-profiles.md, round 7)."""
    flush_queue = getattr(nc, "_flush_queue", None)
    if not (
        isinstance(flush_queue, asyncio.Queue)
        and isinstance(getattr(nc, "_subs", None), dict)
        and isinstance(getattr(nc, "_sid", None), int)
    ):

        async def cb(msg: Msg) -> None:  # another nats-py: its own way
            deliver.put_nowait(msg)

        return await nc.subscribe(subject, cb=cb, pending_msgs_limit=1_000_000)
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining:
        raise nats.errors.ConnectionDrainingError
    nc._sid += 1
    sub = _RunSubscription(nc, nc._sid, subject, deliver)
    nc._subs[sub._id] = sub
    await _send_with_next_write(nc, flush_queue, sub_cmd(subject, "", sub._id))
    return sub


async def _send_with_next_write(nc: NATS, flush_queue: asyncio.Queue[Any], command: bytes) -> None:
    """Queue a protocol command to go with the connection's next write when one is already due (as
    nats-py's publish does), else ask nats-py's flusher for one now."""
    await nc._send_command(command)
    if flush_queue.empty():
        await nc._flush_pending()


async def _unsubscribe_with_next_write(nc: NATS, sub: Subscription) -> None:
    """``sub.unsubscribe()``, but its UNSUB rides the connection's next write when one is already due
    (as a publish does) instead of queueing a flush of its own. nats-py's unsubscribe always wakes its
    flusher once more; when 100 runs end at once that is 100 turns of the flusher for one write
    (measured at 100 concurrent runs: the client's CPU per request 186 -> 171 us, same run). With no
    write due it flushes at once, as before, so an UNSUB never waits for later traffic."""
    flush_queue = getattr(nc, "_flush_queue", None)
    if not isinstance(flush_queue, asyncio.Queue) or not hasattr(sub, "_stop_processing"):
        await sub.unsubscribe()  # another nats-py: its own way
        return
    if nc.is_closed or nc.is_draining or sub._closed:
        await sub.unsubscribe()  # raises as nats-py does
        return
    sub._closed = True
    sub._stop_processing()
    nc._remove_sub(sub._id)
    # Sent while reconnecting too (nats-py's own unsubscribe skips it): the run's SUB may still wait in
    # the pending writes, which go out after nats-py re-sends the live subscriptions; this UNSUB
    # follows it there. (An UNSUB of a subscription the server does not have is ignored.)
    await _send_with_next_write(nc, flush_queue, unsub_cmd(sub._id, 0))


class FrameReader:
    """Turns the messages of one reply stream into frames, in order: the one place that reads them
    (a client's ChatStream and the gateway's recorder both use it). ``seq`` must run 0, 1, 2...: core
    NATS is at-most-once, so a gap is an error, never silently missing text."""

    __slots__ = ("next_seq",)

    def __init__(self) -> None:
        self.next_seq = 0

    def read(self, msg: Msg) -> str | AnyFrame | None:
        """A chunk's text, another frame as its model, or None for NATS "no responders" (nobody
        subscribes to the request's subject). Raises MalformedFrame or StreamGap."""
        data = msg.data
        if not data and is_no_responders(msg):
            return None
        raw = unpack_frame(data)
        chunk = chunk_fields(raw)  # the hot path: no model per chunk
        item: str | AnyFrame
        if chunk is not None:
            seq, item = chunk
        else:
            frame = validate_frame(raw)
            seq, item = frame.seq, frame.text if isinstance(frame, ChunkFrame) else frame
        if seq != self.next_seq:
            raise StreamGap(self.next_seq, seq)
        self.next_seq += 1
        return item


class Bus:
    """A NATS connection plus the settings that name subjects and bound waits."""

    def __init__(self, nc: NATS, settings: TektonSettings, *, acting_for: str | None = None):
        self.nc = nc
        self.settings = settings
        # Every stream gets a fresh, unique inbox subject under one wildcard subscription (as nats-py's
        # own request() does): no SUB/UNSUB and no subscription task per request.
        self._inbox_prefix = nc.new_inbox()
        # Who we are on the bus: the name in our inbox prefix, which the server pins to our credentials.
        self.user = inbox_owner(self._inbox_prefix) or ANONYMOUS
        # Whose sessions and bulk requests these are: ours, unless a trusted bridge (the HTTP bridge, with
        # the gateway's credentials, which may use any user's name) acts for one of its callers.
        self.acting_for = acting_for or self.user
        self._inbox_sub: Subscription | None = None
        self._inbox_seq = 0
        self._routes: dict[str, Inbox] = {}
        self._run_subs: dict[str, Subscription] = {}
        # The streams open on this bus, told when the server refuses one of their subjects.
        self.streams: dict[ChatStream, None] = {}
        refusals = refusals_of(nc)
        if refusals is not None:
            refusals.listen(self._refused)

    def _refused(self, subject: str, said: str) -> None:
        for stream in list(self.streams):
            stream.refused(subject, said)

    @property
    def inbox_wildcard(self) -> str:
        """The one subscription every inbox reply subject of this bus arrives through."""
        return f"{self._inbox_prefix}.*"

    async def open_inbox(self) -> tuple[str, Inbox]:
        """A fresh reply subject, already subscribed, and the inbox its messages arrive in."""
        if self._inbox_sub is None:
            self._inbox_sub = await self.nc.subscribe(
                self.inbox_wildcard, cb=self._route, pending_msgs_limit=1_000_000
            )
        self._inbox_seq += 1
        subject = f"{self._inbox_prefix}.{self._inbox_seq}"
        inbox = Inbox()
        self._routes[subject] = inbox
        return subject, inbox

    def close_inbox(self, subject: str) -> None:
        self._routes.pop(subject, None)

    async def open_run(self, subject: str) -> Inbox:
        """Listen live to a run's frames subject (see bus/runs.py); its messages arrive in the inbox."""
        inbox = Inbox()
        self._routes[subject] = inbox
        # The run's probes arrive here too and are dropped by _route: a probe answered by silence
        # tells the specialist someone still listens.
        listen = run_listen_subject(subject)
        # A subscription per run, but no queue and no task per run (measured at 100 runs at once: the
        # client's extra CPU over a plain inbox stream went from 5.9 to 2.2 ms per 100 runs).
        self._run_subs[subject] = await _subscribe_run(self.nc, listen, _Deliver(self._routes, subject))
        return inbox

    async def stop_reading(self, inbox: str | None, run_subject: str | None, replay: Replay | None) -> None:
        """Close what a stream read from: its replay, its run subscription or its inbox."""
        if replay is not None:
            await replay.unsubscribe()
        if inbox is not None:
            if inbox == run_subject:
                await self.close_run(inbox)
            else:
                self.close_inbox(inbox)

    async def close_run(self, subject: str) -> None:
        self._routes.pop(subject, None)
        sub = self._run_subs.pop(subject, None)
        if sub is not None:
            with suppress(nats.errors.Error, OSError):  # already gone (a closed connection, say)
                await _unsubscribe_with_next_write(self.nc, sub)

    async def replay(
        self,
        subject: str,
        first_seq: int,
        inbox: Inbox,
        since: float | None = None,
        stream_seq: int | None = None,
    ) -> Replay:
        """Frames of a run from the runs stream into ``inbox``: those with ``seq >= first_seq`` (and
        the start frame, which says who serves it), then live ones as they are stored, in order.
        ``since`` (unix time): skip frames stored before it, so a long run is not read from its start;
        ``stream_seq``: start at that stream sequence instead."""

        async def keep(msg: Msg) -> None:
            try:
                raw = unpack_frame(msg.data)
                seq = raw["seq"] if isinstance(raw, dict) else -1
            except (MalformedFrame, KeyError):
                seq = first_seq  # let the reader report it
            if seq >= first_seq or (isinstance(raw, dict) and raw.get("type") == "start"):
                inbox.put(msg)

        js = self.nc.jetstream()
        # A named consumer is created on $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>, which
        # nats-server permissions can limit to the user's own runs (docs/security.md).
        config = api.ConsumerConfig(name=uuid.uuid4().hex)
        if stream_seq is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = stream_seq
        elif since is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.fromtimestamp(since, UTC)
        consumer = await js.subscribe(
            subject,
            cb=keep,
            config=config,
            stream=runs_stream_name(self.settings.prefix),
            ordered_consumer=True,
            pending_msgs_limit=1_000_000,
            # nats-server keeps at most 1,000 consumers on a stream and users may not delete theirs:
            # a closed reader's consumer must go soon (one with a reader keeps its interest, and an
            # ordered consumer is made anew after a reconnect).
            inactive_threshold=5.0,
        )

        async def heard(_msg: Msg) -> None:
            return None

        # A reader of the stream listens to the run's probes too, so the specialist knows someone
        # still follows the run (the consumer's deliveries go to an inbox of ours, not the run subject).
        presence = await self.nc.subscribe(probe_subject(subject), cb=heard)
        return Replay([consumer, presence])

    async def runs(self) -> list[RunSummary]:
        """Our runs still kept in the runs stream, oldest first."""
        return await list_runs(self.nc, self.settings, self.acting_for)

    def new_queue(self) -> Inbox:
        """An empty inbox for messages routed by hand (a replay's)."""
        return Inbox()

    async def run_kind(self, run_id: str) -> str | None:
        """``chat`` or ``bulk`` for one of our runs kept in the runs stream, None when none is."""
        subject = run_subject(self.acting_for, run_id, self.settings.prefix)
        return await run_kind(self.nc, self.settings, subject)

    def attach_bulk(
        self, run_id: str, *, after: int = -1, idle_timeout: float | None = None
    ) -> BulkAttachment:
        """Read one of our bulk runs from the runs stream: the events after ``seq`` ``after``, then live."""
        subject = run_subject(self.acting_for, run_id, self.settings.prefix)
        return BulkAttachment(self, run_id, subject, after, idle_timeout or self.settings.idle_timeout_s)

    def attach(
        self, run_id: str, *, after: int = -1, idle_timeout: float | None = None, user: str | None = None
    ) -> RunAttachment:
        """Read one of our runs from the runs stream: the frames after ``seq`` ``after``, then live.
        ``user``: whose run (a gateway recording for its callers)."""
        subject = run_subject(user or self.acting_for, run_id, self.settings.prefix)
        return RunAttachment(self, run_id, subject, after, idle_timeout or self.settings.idle_timeout_s)

    async def cancel_run(self, run_id: str) -> None:
        await self.nc.publish(cancel_subject(run_id, self.acting_for, self.settings.prefix), b"")
        await self.nc.flush(timeout=1)

    async def _route(self, msg: Msg) -> None:
        inbox = self._routes.get(msg.subject)
        if inbox is not None:
            inbox.put(msg)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, settings: TektonSettings, *, name: str = "tekton", identity: str = "local"
    ) -> AsyncIterator[Bus]:
        nc = await connect_as(settings, name=name, identity=identity)
        try:
            yield cls(nc, settings)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await nc.drain()
                except nats.errors.Error:  # the server is gone (reconnecting): nothing left to drain
                    # nats-py's close writes what is still pending (a publish or an UNSUB made while
                    # reconnecting) to the lost socket, and raises that it is lost: it is, and that is
                    # not the error to report.
                    with suppress(OSError):
                        await nc.close()

    def stream(
        self,
        specialist: str,
        messages: Sequence[ChatMessage],
        options: ChatOptions | None = None,
        *,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        request_id: str | None = None,
        session: str | None = None,
        detach: bool = False,
        double_text: DoubleText | None = None,
        model: str | None = None,
    ) -> ChatStream:
        """One streamed answer (see :class:`ChatStream`).

        With ``session`` (an id or name) the request goes through the gateway, which puts the session's
        history before ``messages`` and records the answer; the tokens still come straight from the
        specialist. ``specialist`` may then be empty to use the session's own.
        """
        request = ChatRequest(
            messages=list(messages),
            options=options or ChatOptions(),
            timeout_ms=int(timeout * 1000) if timeout else None,
            detach=True if detach else None,
            model=model,
            **({"id": request_id} if request_id else {}),
        )
        idle = idle_timeout or self.settings.idle_timeout_s
        if session is not None:
            return SessionChatStream(self, specialist, request, idle, session, double_text)
        return ChatStream(self, specialist, request, idle)

    def bulk(self, plan: BulkPlan, *, idle_timeout: float | None = None) -> BulkStream:
        """Run ``plan`` through the gateway: ``async with bus.bulk(plan) as b: async for event in b``."""
        return BulkStream(self, plan, idle_timeout or self.settings.idle_timeout_s)

    @property
    def gateway(self) -> GatewayClient:
        """The gateway's API: sessions, bulk, discovery and routing."""
        return GatewayClient(
            self.nc,
            self.settings.prefix,
            user=self.acting_for,
            routing_model_s=self.settings.routing_model_timeout_s,
        )

    async def ask(self, specialist: str, prompt: str, options: ChatOptions | None = None) -> StreamResult:
        async with self.stream(specialist, [ChatMessage(role="user", content=prompt)], options) as s:
            async for _ in s:
                pass
        return await s.result()

    async def _gather(self, subject: str, window: float, stall: float | None = None) -> list[dict[str, Any]]:
        return await gather(self.nc, subject, window=window, stall=stall or STALL_S)

    async def instances(
        self,
        name: str | None = None,
        window: float = 0.05,
        role: str = SPECIALIST_ROLE,
        *,
        thorough: bool = False,
    ) -> list[ServiceInstance]:
        """Every running instance of a Tekton role (``$SRV.INFO``), optionally only those named ``name``.
        ``thorough``: wait the whole window instead of stopping when answers stop coming."""
        subject = "$SRV.INFO" + (f".{name}" if name else "")
        prefix = self.settings.prefix
        found = [
            ServiceInstance(
                name=a["name"],
                id=a["id"],
                version=a.get("version", ""),
                metadata=a.get("metadata") or {},
                description=a.get("description") or "",
            )
            for a in await self._gather(subject, window, window if thorough else None)
        ]
        return sorted(
            (i for i in found if i.metadata.get("tekton_role") == role and same_prefix(i.metadata, prefix)),
            key=lambda i: (i.name, i.id),
        )

    async def stats(
        self, name: str | None = None, window: float = 0.05, *, thorough: bool = False
    ) -> list[dict[str, Any]]:
        subject = "$SRV.STATS" + (f".{name}" if name else "")
        answers = await self._gather(subject, window, window if thorough else None)
        return [
            a
            for a in answers
            if (a.get("metadata") or {}).get("tekton_role")
            and same_prefix(a.get("metadata"), self.settings.prefix)
        ]

    async def survey(self, window: float = 0.05) -> list[SpecialistView]:
        """Every running specialist with its capabilities and live figures, replicas aggregated."""
        return (await survey(self.nc, window=window, prefix=self.settings.prefix))[0]

    async def running_names(self, window: float = 0.05) -> list[str]:
        return sorted({i.name for i in await self.instances(window=window)})


class ChatStream:
    """One streamed answer. An async context manager and an async iterator of text chunks.

    Leaving the block before ``done`` (break, exception, Ctrl-C) cancels the request on the specialist.
    """

    def __init__(self, bus: Bus, specialist: str, request: ChatRequest, idle_timeout: float):
        self.bus = bus
        self.specialist = specialist
        self.request = request
        self.idle_timeout = idle_timeout
        self.start_frame: StartFrame | None = None
        self._frames = Inbox()
        self._inbox: str | None = None
        self._reader = FrameReader()
        self._parts: list[str] = []
        self._done: DoneFrame | None = None
        self._finished = False
        self.sent_at = 0.0
        self.first_chunk_at: float | None = None
        self.done_at: float | None = None
        self._span: Any = None  # this request's client span, when tracing is on
        # The specialist's tool calls and their results, in order; ``on_tool`` sees each as it comes.
        self.tool_frames: list[ToolCallFrame | ToolResultFrame] = []
        self.on_tool: Callable[[ToolCallFrame | ToolResultFrame], None] | None = None
        # A durable run: frames come live on the run subject and are kept in the runs stream, so a lost
        # frame (a reconnect, a slow consumer) is read back from there instead of failing the answer.
        self.run_subject = (
            run_subject(bus.acting_for, request.id, bus.settings.prefix) if bus.settings.runs else None
        )
        self._replay: Replay | None = None
        self._resumed_from: int | None = None
        # A resume asks the replica producing the run first, once per point of progress (see resume()).
        self._asked_replica: int | None = None
        self._replica_inbox: str | None = None  # where that replica's replay arrives
        self._reach = 2  # how narrow the next resume starts (see resume())
        # Every MARK_EVERY frames: (seq, unix time) of a frame read, where a resume may start reading.
        self._mark: tuple[int, float] | None = None
        # How long the first frame may take (None: the idle timeout).
        self.first_frame_wait: float | None = None
        # Told the frame seq a resume continues from (aish prints a note).
        self.on_resume: Callable[[int], None] | None = None

    @property
    def run_id(self) -> str | None:
        return self.request.id if self.run_subject else None

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last frame read (-1: none yet): what to resume after."""
        return self._next_seq - 1

    async def __aenter__(self) -> ChatStream:
        # Already open (opened to wait_started() first), or sent and resumed since (a resume leaves no
        # inbox when it reads the runs stream): never sent twice.
        if self._inbox is not None or self.sent_at:
            return self
        # Listen before publishing so no frame can arrive before we do.
        if self.run_subject is not None:
            self._inbox, self._frames = self.run_subject, await self.bus.open_run(self.run_subject)
        else:
            self._inbox, self._frames = await self.bus.open_inbox()
        try:
            self.bus.streams[self] = None  # told of a refusal (see refused())
            if tracing.enabled():
                self._span = tracing.start(
                    f"chat {self.specialist or 'session'}",
                    "client",
                    attributes={"tekton.request_id": self.request.id},
                )
            await self._send(self._inbox)
        except BaseException as err:
            with anyio.CancelScope(shield=True):
                if self.sent_at and may_have_started(err):  # (interrupted while a gateway accepted it)
                    with suppress(Exception):  # the connection may be gone: nothing to stop then
                        await self.cancel()
                self._finished = True
                await self._close_source()
                tracing.end(self._span, err if isinstance(err, Exception) else None)  # (no __aexit__)
                self._span = None
            raise
        return self

    def refused(self, subject: str, said: str) -> None:
        """The server refused ``subject`` (lowercased): if that is this request's publish or its
        listening and no frame came yet, that is its answer, as an error frame 0 would be, at once
        (credentials that may not reach this specialist, or another prefix's), instead of waiting out
        the idle timeout for a first frame that cannot come."""
        if self._next_seq != 0 or self._finished:
            return
        if subject in (own.lower() for own in self._own_subjects()):
            message = f"the nats-server refused: {' '.join(said.split())[:200]}"
            error = ErrorFrame(seq=0, code=ErrorCode.UNAUTHORIZED, message=message)
            self._frames.put(Msg(self.bus.nc, data=encode(error)))

    def _publishes_to(self) -> list[str]:
        return [chat_subject(self.specialist, self.bus.settings.prefix)] if self.specialist else []

    def _own_subjects(self) -> list[str]:
        """What this request publishes to and listens on (what the server may refuse us)."""
        ours = self._publishes_to()
        if self._inbox is not None:
            ours.append(run_listen_subject(self._inbox) if self.run_subject else self.bus.inbox_wildcard)
        return ours

    async def _close_source(self) -> None:
        self.bus.streams.pop(self, None)
        replay, inbox, self._replay, self._inbox = self._replay, self._inbox, None, None
        if self._replica_inbox is not None:
            self.bus.close_inbox(self._replica_inbox)
            self._replica_inbox = None
        await self.bus.stop_reading(inbox, self.run_subject, replay)

    async def resume(self) -> None:
        """Continue after the last frame read, no gap, no duplicate: from the replica producing the run
        (it keeps a live run's frames, and a finished one's for a while), else from the runs stream."""
        if self.run_subject is None:
            raise BusError("this answer is not a durable run: nothing to resume from")
        await self._close_source()
        self.bus.streams[self] = None  # still told of refusals (__aexit__ closes the source for good)
        if self._resumed_from not in (self._next_seq, -1):
            self._reach = 2  # progress since the last resume: the narrowest start first again
        self._resumed_from = self._next_seq
        if self._asked_replica != self._next_seq:
            self._asked_replica = self._next_seq
            if await self._from_replica():
                log.info("run resumed from its replica", run_id=self.request.id, after=self._next_seq - 1)
                if self.on_resume is not None:
                    self.on_resume(self._next_seq)
                return
            self.bus.streams[self] = None  # (the replica's failed attempt closed what it opened)
        self._frames = Inbox()
        # Where to start reading, narrowest first; a start that was too late (the first frame read back
        # is past the one we need: a gap with no progress) makes the next resume start wider (_recover).
        # 2: the stream sequence of the frame we need, reckoned from the run's last stored frame (exact
        # unless other runs' frames were stored in between); 1: a little before a frame we read (clocks
        # of two machines differ a little); 0: the run's start.
        stream_seq = await self._stored_position()  # (raises at once when the stream is offline)
        stream_seq = stream_seq if self._reach >= 2 else None
        since = self._mark[1] - RESUME_MARGIN_S if self._mark and self._reach >= 1 else None
        try:
            self._replay = await self.bus.replay(
                self.run_subject, self._next_seq, self._frames, since, stream_seq
            )
        except NotFoundError as err:
            raise RunNotFound.named(self.request.id, self.bus.settings.runs_keep_s) from err
        log.info("run resumed", run_id=self.request.id, after=self._next_seq - 1)
        if self.on_resume is not None:
            self.on_resume(self._next_seq)

    async def _from_replica(self) -> bool:
        """Ask the replica producing this run for the frames after the last one read (a replay request:
        specialists/service.py), listening live to the run again first; True once it answers. Any
        replica that does not have the run stays silent, so this waits at most REPLICA_WAIT_S."""
        assert self.run_subject is not None
        bus = self.bus
        ref = parse_run_subject(self.run_subject, bus.settings.prefix)
        if ref is None:
            return False
        live = await bus.open_run(self.run_subject)
        self._inbox = self.run_subject
        reply, replayed = await bus.open_inbox()
        self._replica_inbox = reply
        subject = replay_subject(ref.user, ref.run_id, bus.settings.prefix)
        first: Msg | None = None
        try:
            await bus.nc.publish(subject, str(self._next_seq - 1).encode(), reply=reply)
            first = await replayed.peek(REPLICA_WAIT_S)
        except nats.errors.Error as err:  # the connection went again: the stream's turn
            log.debug("replay not asked", run_id=self.request.id, error=str(err) or type(err).__name__)
        if first is None or is_no_responders(first):
            await self._close_source()
            return False
        self._frames = ReplayedInbox(replayed, live)
        return True

    async def _stored_position(self) -> int | None:
        """The stream sequence of the frame to read next, if the run's frames since then are stored one
        after another (a direct get of its last stored frame: one round trip); None if unknown."""
        assert self.run_subject is not None
        try:
            last = await self.bus.nc.jetstream().get_msg(
                runs_stream_name(self.bus.settings.prefix), subject=self.run_subject, direct=True
            )
            raw = unpack_frame(last.data or b"")
        except nats.errors.NoRespondersError as err:  # no server holds the stream now (its node is down)
            raise BusError(
                "the runs stream is offline (no server holds it now)",
                code=ErrorCode.NATS_UNAVAILABLE,
                retryable=True,
            ) from err
        except Exception:  # nothing stored yet, or not readable: start wider
            return None
        seq = raw.get("seq") if isinstance(raw, dict) else None
        if type(seq) is not int or last.seq is None:
            return None
        if seq < self._next_seq:  # what we need is not stored yet: everything after that last one
            return last.seq + 1
        return max(1, last.seq - (seq - self._next_seq))

    def leave(self) -> None:
        """Stop reading without cancelling: the run goes on for its resume window, so this client (or
        another) can come back to it (``Bus.attach``)."""
        self._finished = True

    def detach(self) -> str:
        """Leave a detached run (``stream(..., detach=True)``) to go on without us; its run id."""
        if self.run_subject is None or not self.request.detach:
            raise BusError("only a run started with detach=True goes on without its asker")
        self._finished = True  # nothing to cancel on the way out
        return self.request.id

    async def _recover(self, err: BusError) -> None:
        """A lost frame or a silence: read the rest from the runs stream, once per point of progress;
        raise ``err`` when that cannot help (not a run, or nothing came since the last resume)."""
        stalled = self._resumed_from == self._next_seq
        if stalled and self._replica_inbox is not None:
            self._resumed_from = -1  # the replica's replay brought nothing: the stream next
        elif stalled and self._reach > 0:
            self._reach -= 1  # that start missed frames: a wider one
            self._resumed_from = -1  # (not progress: the narrower starts stay skipped)
        if self.run_subject is None or self._resumed_from == self._next_seq or not self.bus.nc.is_connected:
            self._finished = True  # (with the server gone too there is nothing to read back from)
            raise err
        try:
            await self.resume()
        except Exception as failed:  # not kept, or the server is gone too: the loss stands
            log.debug("resume failed", run_id=self.request.id, error=str(failed) or type(failed).__name__)
            self._finished = True
            raise err from None

    async def _send(self, inbox: str) -> None:
        nc = self.bus.nc
        payload = encode_request(self.request, limit=nc.max_payload)
        subject = chat_subject(self.specialist, self.bus.settings.prefix)
        headers = tracing.headers(self._span)
        self.sent_at = time.perf_counter()  # as a plain client times it: from the publish
        await nc.publish(subject, payload, reply=inbox, headers=headers)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            if not self._finished:
                try:
                    await self.cancel()
                except Exception as err:  # the connection may be gone: nothing more to stop
                    log.debug("cancel not sent", error=str(err))
            await self._close_source()
            if self._span is not None:
                tracing.end(self._span, exc if isinstance(exc, Exception) else None)
                self._span = None

    async def cancel(self) -> None:
        """Ask the specialist to stop generating now."""
        self._finished = True
        nc = self.bus.nc
        # A run is its (acting) user's: the specialist takes a cancel only from the run's owner.
        user = self.bus.acting_for if self.run_subject else self.bus.user
        await nc.publish(cancel_subject(self.request.id, user, self.bus.settings.prefix), b"")
        await nc.flush(timeout=1)

    def __aiter__(self) -> AsyncIterator[str]:
        if tracing.recording(self._span):
            return self._noting_failure()
        return self._texts()

    async def _noting_failure(self) -> AsyncIterator[str]:
        """The texts, and the error that ended them on this request's span (a caller that handles the
        error inside its ``async with`` leaves none for ``__aexit__`` to see)."""
        try:
            async for text in self._texts():
                yield text
        except Exception as err:
            tracing.fail(self._span, str(err))
            raise

    def waiting(self) -> int:
        """Frames already arrived and not read yet: the next ones come without waiting (a relay can
        send what it has in one write when this is 0)."""
        return len(self._frames)

    async def wait_started(self) -> None:
        """Return once the answer has begun (its first frame arrived), or raise what went wrong
        instead: nobody runs that specialist, an error frame, silence. Reads nothing away."""
        msg = await self._frames.peek(self.idle_timeout)
        if msg is None:
            self._finished = True
            raise IdleTimeout(self.specialist, self.idle_timeout)
        if is_no_responders(msg):
            self._finished = True
            raise SpecialistUnavailable.named(self.specialist, await self.bus.running_names())
        raw = unpack_frame(msg.data)
        if isinstance(raw, dict) and raw.get("type") == "error":
            frame = validate_frame(raw)
            assert isinstance(frame, ErrorFrame)
            self._finished = True
            raise from_wire(frame.code, frame.message, frame.retryable)

    async def _next_msg(self) -> Msg:
        while True:
            wait = self.idle_timeout
            if self._next_seq == 0 and self.first_frame_wait is not None:
                wait = self.first_frame_wait
            msg = await self._frames.get(wait)
            if msg is not None:
                return msg
            if self._next_seq == 0:
                self._check_refused()
            # Nobody is generating any more (nothing to cancel), unless the frames went astray.
            await self._recover(IdleTimeout(self.specialist, self.idle_timeout))

    def _check_refused(self) -> None:
        """No first frame: if the server refused this request's publish or its listening (credentials
        for another prefix, say), say that rather than blame the specialist. nats-py keeps only the
        connection's last error: it must name one of this request's own subjects."""
        said = str(getattr(self.bus.nc, "last_error", None) or "").lower()
        if "permissions violation" not in said:
            return
        if any(f'"{subject.lower()}"' in said for subject in self._own_subjects()):
            self._finished = True
            raise Unauthorized(f"the nats-server refused: {' '.join(said.split())[:200]}")

    async def _texts(self) -> AsyncIterator[str]:
        reader = self._reader
        while not self._finished:
            msg = await self._next_msg()
            try:
                item = reader.read(msg)
            except MalformedFrame:
                self._finished = True
                raise
            except StreamGap as gap:
                if gap.got < reader.next_seq:  # already read (a resume overlaps what was in flight)
                    self._keep_start(msg)
                    continue
                await self._recover(gap)  # lost frames: read them back from the run
                continue
            if type(item) is str:
                if not (reader.next_seq - 1) & MARK_MASK:
                    self._mark = (reader.next_seq - 1, time.time())
                if self.first_chunk_at is None:
                    self.first_chunk_at = time.perf_counter()
                self._parts.append(item)
                yield item
            elif item is None:
                self._finished = True
                raise SpecialistUnavailable.named(self.specialist, await self.bus.running_names())
            elif isinstance(item, StartFrame):
                self.start_frame = item
            elif isinstance(item, DoneFrame):
                self.done_at = time.perf_counter()
                self._done = item
                self._finished = True
            elif isinstance(item, ErrorFrame):
                self._finished = True
                raise from_wire(item.code, item.message, item.retryable)
            elif isinstance(item, ToolCallFrame | ToolResultFrame):
                self.tool_frames.append(item)
                if self.on_tool is not None:
                    self.on_tool(item)

    def _keep_start(self, msg: Msg) -> None:
        """The start frame of a replay that begins past it: who serves the run."""
        if self.start_frame is None:
            raw = unpack_frame(msg.data)
            if isinstance(raw, dict) and raw.get("type") == "start":
                frame = validate_frame(raw)
                assert isinstance(frame, StartFrame)
                self.start_frame = frame

    @property
    def _next_seq(self) -> int:
        return self._reader.next_seq

    @_next_seq.setter
    def _next_seq(self, seq: int) -> None:
        self._reader.next_seq = seq

    @property
    def text_so_far(self) -> str:
        """What arrived until now (all of it once the stream is done)."""
        return "".join(self._parts)

    @property
    def tokens(self) -> int | None:
        """The answer's tokens, from its done frame (None before it): a chunk may carry several."""
        return self._done.usage.completion_tokens if self._done is not None else None

    async def result(self) -> StreamResult:
        """The whole answer with usage and timings; reads what is left of the stream first."""
        if self._done is None:
            async for _ in self:
                pass
        if self._done is None or self.start_frame is None:
            raise BusError("the stream ended without a done frame")
        return StreamResult(text="".join(self._parts), start=self.start_frame, done=self._done)


# How long a resume waits for the replica producing a run to answer a replay request (one round trip
# within a cluster) before reading the run from the runs stream.
REPLICA_WAIT_S = 0.5
# A resume reads from RESUME_MARGIN_S before the last mark, taken every MARK_MASK + 1 frames.
MARK_MASK = 63
RESUME_MARGIN_S = 1.0

# The gateway stores an answer within milliseconds of its done frame; past this it has died (or waits
# for a cluster to elect the sessions bucket's leader), and the answer is on screen anyway.
STORED_WAIT_S = 2.0
# Then the client settles the turn itself, waiting this long for a gateway: one restarting, or one that
# can store only once the bucket has a leader again (nats-server elects one 4-9 s after losing it).
SETTLE_WAIT_S = 20.0


class SessionChatStream(ChatStream):
    """A :class:`ChatStream` whose request the gateway forwards with the session's context."""

    def __init__(
        self,
        bus: Bus,
        specialist: str,
        request: ChatRequest,
        idle_timeout: float,
        session: str,
        double_text: DoubleText | None = None,
    ):
        super().__init__(bus, specialist, request, idle_timeout)
        self.session = session
        self.double_text = double_text
        self.accepted: ChatAccepted | None = None
        self.stored: StoredFrame | None = None

    def _publishes_to(self) -> list[str]:
        return []  # the gateway's call publishes, and hears its own refusal (bus/refusals.or_refused)

    async def _send(self, inbox: str) -> None:
        chat = SessionChat(
            session=self.session,
            specialist=self.specialist or None,
            inbox=inbox,
            request=self.request,
            double_text=self.double_text,
        )
        self.sent_at = time.perf_counter()
        reply = await self.bus.gateway.call("chat", chat, headers=tracing.headers(self._span))
        assert isinstance(reply, ChatAccepted)
        self.accepted = reply
        self.specialist = reply.specialist
        if reply.queued:  # the first frame comes once the answer ahead is done
            self.first_frame_wait = self.bus.settings.request_timeout_s + self.idle_timeout

    async def _texts(self) -> AsyncIterator[str]:
        async for text in super()._texts():
            yield text
        if self._done is not None and self.stored is None:
            self.stored = await self._wait_stored() or await self._settle()

    async def _settle(self) -> StoredFrame | None:
        """The gateway that heard this answer stopped before storing it: hand our copy (we saw the whole
        answer, ``done`` included) to whichever gateway answers, waiting a while for one to come back.
        It is stored only if the turn is still pending, so a late recorder and this never both write."""
        if self.accepted is None:
            return None
        answer, wait = "".join(self._parts), 0.05
        users = [m.content for m in self.request.messages if m.role == "user"]
        question = users[-1] if users else None
        with anyio.move_on_after(SETTLE_WAIT_S):
            while True:
                try:
                    return await self.bus.gateway.settle(
                        self.accepted.session, self.request.id, answer, question, self.specialist or None
                    )
                except GatewayUnavailable:
                    await anyio.sleep(wait)  # a retry's backoff: the gateway is restarting
                    wait = min(wait * 2, 1.0)
                except BusError as err:
                    log.warning("the answer was not stored", session=self.session, error=err.message)
                    return None
        log.warning("no gateway stored the answer", session=self.session, waited_s=SETTLE_WAIT_S)
        return None

    async def _wait_stored(self) -> StoredFrame | None:
        """The gateway's note that the answer is in the session (it follows ``done`` within a few ms)."""
        msg = await self._frames.get(min(self.idle_timeout, STORED_WAIT_S))
        if msg is None:
            log.warning("the gateway did not confirm the answer was stored", session=self.session)
            return None
        try:
            return StoredFrame.model_validate(unpack_frame(msg.data))
        except (MalformedFrame, ValidationError):
            log.warning("unexpected frame after done", session=self.session)
            return None


class RunAttachment(ChatStream):
    """A run read from the runs stream by someone other than its live asker (``aish attach``, a
    reconnecting client): the frames after ``after``, then the rest live, each exactly once.

    Leaving the block does not stop the run (``cancel()`` does).
    """

    def __init__(self, bus: Bus, run_id: str, subject: str, after: int, idle_timeout: float):
        # An attachment sends no request; the model only carries the run's id.
        placeholder = ChatRequest(id=run_id, messages=[ChatMessage(role="user", content="")])
        super().__init__(bus, "", placeholder, idle_timeout)
        self.run_subject = subject
        self._next_seq = after + 1
        # The seq of the run's done (or error) frame once it is known to have ended (on entering).
        self.ended_at: int | None = None
        # Told on entering: the run had ended at or before the frame the reader asked to read after,
        # so nothing is to come. (Not worked out again later: by then the reader has read to the end.)
        self.nothing_after = False

    async def __aenter__(self) -> RunAttachment:
        if self._replay is not None:
            return self
        assert self.run_subject is not None
        self.ended_at = await attach_end(self.bus.nc, self.bus.settings, self.run_subject, self.request.id)
        self.nothing_after = self.ended_at is not None and self.ended_at < self._next_seq
        if self.nothing_after:
            # Nothing comes after what the reader has (a browser reconnecting after the done event):
            # said at once, instead of waiting out the idle timeout for frames that will never come.
            self._finished = True
            return self
        self.sent_at = time.perf_counter()
        self._frames = Inbox()
        self._replay = await self.bus.replay(self.run_subject or "", self._next_seq, self._frames)
        self._resumed_from = self._next_seq
        self._reach = 0  # read from the start already
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self._close_source()

    async def _texts(self) -> AsyncIterator[str]:
        async for text in super()._texts():
            if not self.specialist and self.start_frame is not None:
                self.specialist = self.start_frame.specialist
            yield text
