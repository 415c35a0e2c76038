"""The client side of the contract: connect, stream a specialist's answer, list running specialists.

async with Bus.connect(settings) as bus:
    async with bus.stream("apollo", [ChatMessage(role="user", content="hi")]) as s:
        async for text in s:
            print(text, end="")
    result = await s.result()
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from bus.bulk import BulkPlan, BulkStream
from bus.discovery import SPECIALIST_ROLE, STALL_S, SpecialistView, gather, survey
from bus.errors import (
    BusError,
    IdleTimeout,
    MalformedFrame,
    NatsUnavailable,
    SpecialistUnavailable,
    StreamGap,
    from_wire,
)
from bus.sessions import ChatAccepted, GatewayClient, SessionChat, StoredFrame
from bus.settings import TektonSettings
from bus.subjects import cancel_subject, chat_subject
from bus.wire import (
    ChatMessage,
    ChatOptions,
    ChatRequest,
    ChunkFrame,
    DoneFrame,
    ErrorFrame,
    StartFrame,
    chunk_fields,
    encode_request,
    unpack_frame,
    validate_frame,
)

log = structlog.get_logger("tekton.bus")

NO_RESPONDERS = "503"


def is_no_responders(msg: Msg) -> bool:
    """NATS's own answer, to the publisher only, when nobody subscribes to the subject."""
    return not msg.data and msg.headers is not None and msg.headers.get("Status") == NO_RESPONDERS


async def connect(url: str, *, name: str = "tekton", connect_timeout: float = 2.0) -> NATS:
    """Connect to NATS, or raise :class:`NatsUnavailable` saying how to start a server."""

    async def quiet(err: Exception) -> None:
        log.debug("nats error", error=str(err))

    try:
        nc = await nats.connect(
            servers=[url],
            name=name,
            connect_timeout=connect_timeout,
            # nats-py retries the *first* connect until attempts run out, and -1 means never: bound it
            # here so a missing server is a fast, clear error...
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=quiet,
        )
    except (OSError, TimeoutError, nats.errors.NoServersError) as err:
        raise NatsUnavailable(url, type(err).__name__) from err
    except Exception as err:  # nats-py wraps some socket errors in its own types
        raise NatsUnavailable(url, str(err) or type(err).__name__) from err
    # ...and once connected, ride out server restarts by reconnecting forever.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    return nc


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
class StreamResult:
    text: str
    start: StartFrame
    done: DoneFrame


class Inbox:
    """Messages of one reply subject, in arrival order, for exactly one reader.

    A deque and a single waiter future: about half the cost of an ``asyncio.Queue`` per message, which
    shows at 100k chunks/s.
    """

    __slots__ = ("_messages", "_waiter")

    def __init__(self) -> None:
        self._messages: deque[Msg] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, msg: Msg) -> None:
        self._messages.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def peek(self, within: float) -> Msg | None:
        """The next message without taking it, or None when none arrives ``within`` seconds."""
        if not self._messages and not await self._wait(within):
            return None
        return self._messages[0]

    async def _wait(self, within: float) -> bool:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(within):
                await self._waiter
        except TimeoutError:
            return False
        finally:
            self._waiter = None
        return True

    async def get(self, within: float) -> Msg | None:
        """The next message, or None when none arrives ``within`` seconds."""
        if not self._messages and not await self._wait(within):
            return None
        return self._messages.popleft()


class Bus:
    """A NATS connection plus the settings that name subjects and bound waits."""

    def __init__(self, nc: NATS, settings: TektonSettings):
        self.nc = nc
        self.settings = settings
        # Every stream gets a fresh, unique inbox subject under one wildcard subscription (as nats-py's
        # own request() does): no SUB/UNSUB and no subscription task per request.
        self._inbox_prefix = nc.new_inbox()
        self._inbox_sub: Subscription | None = None
        self._inbox_seq = 0
        self._routes: dict[str, Inbox] = {}

    async def open_inbox(self) -> tuple[str, Inbox]:
        """A fresh reply subject, already subscribed, and the inbox its messages arrive in."""
        if self._inbox_sub is None:
            self._inbox_sub = await self.nc.subscribe(
                f"{self._inbox_prefix}.*", cb=self._route, pending_msgs_limit=1_000_000
            )
        self._inbox_seq += 1
        subject = f"{self._inbox_prefix}.{self._inbox_seq}"
        inbox = Inbox()
        self._routes[subject] = inbox
        return subject, inbox

    def close_inbox(self, subject: str) -> None:
        self._routes.pop(subject, None)

    async def _route(self, msg: Msg) -> None:
        inbox = self._routes.get(msg.subject)
        if inbox is not None:
            inbox.put(msg)

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: TektonSettings, *, name: str = "tekton") -> AsyncIterator[Bus]:
        nc = await connect(settings.nats_url, name=name)
        try:
            yield cls(nc, settings)
        finally:
            with anyio.CancelScope(shield=True):
                await nc.drain()

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
            model=model,
            **({"id": request_id} if request_id else {}),
        )
        idle = idle_timeout or self.settings.idle_timeout_s
        if session is not None:
            return SessionChatStream(self, specialist, request, idle, session)
        return ChatStream(self, specialist, request, idle)

    def bulk(self, plan: BulkPlan, *, idle_timeout: float | None = None) -> BulkStream:
        """Run ``plan`` through the gateway: ``async with bus.bulk(plan) as b: async for event in b``."""
        return BulkStream(self, plan, idle_timeout or self.settings.idle_timeout_s)

    @property
    def gateway(self) -> GatewayClient:
        """The gateway's API: sessions, bulk, discovery and routing."""
        return GatewayClient(self.nc, self.settings.prefix)

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
            (i for i in found if i.metadata.get("tekton_role") == role), key=lambda i: (i.name, i.id)
        )

    async def stats(
        self, name: str | None = None, window: float = 0.05, *, thorough: bool = False
    ) -> list[dict[str, Any]]:
        subject = "$SRV.STATS" + (f".{name}" if name else "")
        answers = await self._gather(subject, window, window if thorough else None)
        return [a for a in answers if (a.get("metadata") or {}).get("tekton_role")]

    async def survey(self, window: float = 0.05) -> list[SpecialistView]:
        """Every running specialist with its capabilities and live figures, replicas aggregated."""
        return (await survey(self.nc, window=window))[0]

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
        self._next_seq = 0
        self._parts: list[str] = []
        self._done: DoneFrame | None = None
        self._finished = False
        self.sent_at = 0.0
        self.first_chunk_at: float | None = None
        self.done_at: float | None = None

    async def __aenter__(self) -> ChatStream:
        if self._inbox is not None:  # already open (e.g. opened to wait_started() first)
            return self
        # Listen before publishing so no frame can arrive before we do.
        self._inbox, self._frames = await self.bus.open_inbox()
        self.sent_at = time.perf_counter()
        try:
            await self._send(self._inbox)
        except BaseException:
            self._finished = True
            self.bus.close_inbox(self._inbox)
            self._inbox = None
            raise
        return self

    async def _send(self, inbox: str) -> None:
        nc = self.bus.nc
        payload = encode_request(self.request, limit=nc.max_payload)
        await nc.publish(chat_subject(self.specialist, self.bus.settings.prefix), payload, reply=inbox)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            if not self._finished:
                try:
                    await self.cancel()
                except Exception as err:  # the connection may be gone: nothing more to stop
                    log.debug("cancel not sent", error=str(err))
            if self._inbox is not None:
                self.bus.close_inbox(self._inbox)
                self._inbox = None

    async def cancel(self) -> None:
        """Ask the specialist to stop generating now."""
        self._finished = True
        nc = self.bus.nc
        await nc.publish(cancel_subject(self.request.id, self.bus.settings.prefix), b"")
        await nc.flush(timeout=1)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts()

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
        msg = await self._frames.get(self.idle_timeout)
        if msg is None:
            self._finished = True  # nobody is generating any more: nothing to cancel
            raise IdleTimeout(self.specialist, self.idle_timeout)
        return msg

    async def _texts(self) -> AsyncIterator[str]:
        while not self._finished:
            msg = await self._next_msg()
            if is_no_responders(msg):
                self._finished = True
                raise SpecialistUnavailable.named(self.specialist, await self.bus.running_names())
            try:
                raw = unpack_frame(msg.data)
            except MalformedFrame:
                self._finished = True
                raise
            chunk = chunk_fields(raw)
            if chunk is not None:
                seq, text = chunk
                if seq != self._next_seq:
                    raise StreamGap(self._next_seq, seq)
                self._next_seq += 1
                if self.first_chunk_at is None:
                    self.first_chunk_at = time.perf_counter()
                self._parts.append(text)
                yield text
                continue
            try:
                frame = validate_frame(raw)
            except MalformedFrame:
                self._finished = True
                raise
            if frame.seq != self._next_seq:
                raise StreamGap(self._next_seq, frame.seq)
            self._next_seq += 1
            if isinstance(frame, ChunkFrame):
                if self.first_chunk_at is None:
                    self.first_chunk_at = time.perf_counter()
                self._parts.append(frame.text)
                yield frame.text
            elif isinstance(frame, StartFrame):
                self.start_frame = frame
            elif isinstance(frame, DoneFrame):
                self.done_at = time.perf_counter()
                self._done = frame
                self._finished = True
            elif isinstance(frame, ErrorFrame):
                self._finished = True
                raise from_wire(frame.code, frame.message, frame.retryable)

    @property
    def text_so_far(self) -> str:
        """What arrived until now (all of it once the stream is done)."""
        return "".join(self._parts)

    async def result(self) -> StreamResult:
        """The whole answer with usage and timings; reads what is left of the stream first."""
        if self._done is None:
            async for _ in self:
                pass
        if self._done is None or self.start_frame is None:
            raise BusError("the stream ended without a done frame")
        return StreamResult(text="".join(self._parts), start=self.start_frame, done=self._done)


# The gateway stores an answer within milliseconds of its done frame; past this it has died, and the
# answer is on screen anyway.
STORED_WAIT_S = 2.0


class SessionChatStream(ChatStream):
    """A :class:`ChatStream` whose request the gateway forwards with the session's context."""

    def __init__(self, bus: Bus, specialist: str, request: ChatRequest, idle_timeout: float, session: str):
        super().__init__(bus, specialist, request, idle_timeout)
        self.session = session
        self.accepted: ChatAccepted | None = None
        self.stored: StoredFrame | None = None

    async def _send(self, inbox: str) -> None:
        chat = SessionChat(
            session=self.session, specialist=self.specialist or None, inbox=inbox, request=self.request
        )
        reply = await self.bus.gateway.call("chat", chat)
        assert isinstance(reply, ChatAccepted)
        self.accepted = reply
        self.specialist = reply.specialist

    async def _texts(self) -> AsyncIterator[str]:
        async for text in super()._texts():
            yield text
        if self._done is not None and self.stored is None:
            self.stored = await self._wait_stored()

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
