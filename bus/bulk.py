"""Bulk requests on the bus: many operations, parallel or sequential, as a dependency graph.

The gateway serves ``<prefix>.gateway.bulk`` (see docs/protocol.md): the caller subscribes to an inbox,
sends a :class:`BulkRequest` naming it, gets ``accepted`` (or one error listing every problem), then
reads events on the inbox: ``op_start``, ``op_chunk`` (tagged with the operation id), ``op_end``,
``heartbeat`` and finally ``bulk_done``. Every event has ``seq``, consecutive from 0.

With durable runs on (the default) the inbox is a run subject (bus/runs.py): the events are also kept in
the runs stream, so a client that lost some (a dropped connection, a killed process) reads them back
after the last ``seq`` it saw, and ``aish attach``, SSE ``Last-Event-ID`` and JSON-RPC ``stream.resume``
follow a bulk run exactly as they follow a chat.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Literal

import anyio
import msgpack
from pydantic import Field, TypeAdapter, ValidationError, field_validator

from bus.errors import BusError, IdleTimeout, MalformedFrame, StreamGap, may_have_started
from bus.runs import attach_end, run_subject
from bus.subjects import NAME_PATTERN, REPLY_SUBJECT_PATTERN, bulk_subject, cancel_subject
from bus.wire import PROTOCOL_VERSION, ChatOptions, Wire, check_model, new_request_id, unpack_frame

if TYPE_CHECKING:
    from bus.client import Bus, Inbox, Replay

DAY_MS = 86_400_000
OP_ID_MAX = 64
OP_ID_PATTERN = rf"^[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{OP_ID_MAX - 1}}}$"
OpStatus = Literal["ok", "failed", "skipped", "timeout", "cancelled"]
# ``{id}`` in an operation's message: that operation's whole output.
REF_RE = re.compile(r"\{([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})\}")


def substitute(message: str, outputs: dict[str, str]) -> str:
    """An operation's message as sent: each ``{id}`` replaced by that operation's output."""
    return REF_RE.sub(lambda m: outputs.get(m.group(1), m.group(0)), message)


class BulkOperation(Wire):
    id: str = Field(pattern=OP_ID_PATTERN)
    # A specialist name.
    ai: str = Field(pattern=NAME_PATTERN)
    # ``{other_id}`` is replaced by that operation's whole output (and makes it a dependency).
    message: str
    depends_on: list[str] = []
    session: str | None = None
    options: ChatOptions = ChatOptions()
    timeout_ms: int | None = Field(default=None, ge=1, le=DAY_MS)
    # The model to answer with (``ollama:qwen2.5:7b``); None: the specialist's own.
    model: str | None = None

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        return check_model(value)


class BulkPlan(Wire):
    """What a person writes (``aish bulk plan.yaml``): a bulk request without the wiring."""

    operations: list[BulkOperation] = Field(max_length=10_000)
    execution: Literal["parallel", "sequential"] = "parallel"
    # The whole request; each operation's own deadline (an operation's timeout_ms wins).
    timeout_ms: int | None = Field(default=None, ge=1, le=DAY_MS)
    op_timeout_ms: int | None = Field(default=None, ge=1, le=DAY_MS)
    max_concurrency: int | None = Field(default=None, ge=1, le=1024)


class BulkRequest(BulkPlan):
    v: Literal[1] = PROTOCOL_VERSION
    id: str = Field(default_factory=new_request_id, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    inbox: str = Field(min_length=1, max_length=255, pattern=REPLY_SUBJECT_PATTERN)


class BulkAccepted(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["bulk_accepted"] = "bulk_accepted"
    id: str
    operations: int


# Events


class OpStart(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["op_start"] = "op_start"
    seq: int
    op: str
    specialist: str
    attempt: int = 1


class OpChunk(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["op_chunk"] = "op_chunk"
    seq: int
    op: str
    text: str


class OpSummary(Wire):
    op: str
    specialist: str
    status: OpStatus
    error: str | None = None
    tokens: int = 0
    first_token_ms: float | None = None
    total_ms: float | None = None


class OpEnd(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["op_end"] = "op_end"
    seq: int
    result: OpSummary


class BulkHeartbeat(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["heartbeat"] = "heartbeat"
    seq: int


class BulkDone(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["bulk_done"] = "bulk_done"
    seq: int
    status: Literal["ok", "partial", "failed", "cancelled", "timeout"]
    total_ms: float
    operations: list[OpSummary]


BulkEvent = OpStart | OpChunk | OpEnd | BulkHeartbeat | BulkDone
_EVENTS: TypeAdapter[BulkEvent] = TypeAdapter(Annotated[BulkEvent, Field(discriminator="type")])


def encode_op_chunk(seq: int, op: str, text: str) -> bytes:
    """The hot path (same bytes as ``encode(OpChunk(...))``)."""
    data: bytes = msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "op_chunk", "seq": seq, "op": op, "text": text}
    )
    return data


def decode_event(data: bytes) -> BulkEvent:
    raw = unpack_frame(data)
    try:
        return _EVENTS.validate_python(raw)
    except ValidationError as err:
        raise MalformedFrame(f"not a bulk event: {err.error_count()} problem(s)") from err


class BulkStream:
    """The events of one bulk request. An async context manager and an async iterator of events.

    Leaving the block before ``bulk_done`` (break, exception, Ctrl-C) cancels every running operation,
    unless :meth:`leave` said to let it run (a durable run, resumed later with ``Bus.attach_bulk``).
    Events lost on the way (a seq gap, a silence past the idle timeout) are read back from the run.
    """

    def __init__(self, bus: Bus, plan: BulkPlan, idle_timeout: float):
        self.bus = bus
        self.plan = plan
        self.idle_timeout = idle_timeout
        self.id = new_request_id()
        self.outputs: dict[str, list[str]] = {op.id: [] for op in plan.operations}
        self.done: BulkDone | None = None
        self.accepted: BulkAccepted | None = None
        self.sent_at = 0.0
        self._inbox: str | None = None
        self._events: Inbox | None = None
        self._next_seq = 0
        self.run_subject = (
            run_subject(bus.acting_for, self.id, bus.settings.prefix) if bus.settings.runs else None
        )
        self._replay: Replay | None = None
        self._resumed_from: int | None = None
        self._left = False
        # The seq of the run's bulk_done once it is known to have ended (an attachment, on entering),
        # and whether that was at or before the event the reader asked to read after: nothing to come.
        self.ended_at: int | None = None
        self.nothing_after = False
        # Told the seq a resume continues from (aish prints a note).
        self.on_resume: Callable[[int], None] | None = None

    @property
    def run_id(self) -> str | None:
        return self.id if self.run_subject else None

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last event read (-1: none yet): what to resume after."""
        return self._next_seq - 1

    async def __aenter__(self) -> BulkStream:
        if self._inbox is not None:  # already sent (opened early to fail before a response began)
            return self
        if self.run_subject is not None:
            self._inbox, self._events = self.run_subject, await self.bus.open_run(self.run_subject)
        else:
            self._inbox, self._events = await self.bus.open_inbox()
        request = BulkRequest(**self.plan.model_dump(), id=self.id, inbox=self._inbox)
        self.sent_at = time.perf_counter()
        try:
            reply = await self.bus.gateway.call(
                "bulk", request, subject=bulk_subject(self.bus.settings.prefix, self.bus.acting_for)
            )
        except BaseException as err:
            with anyio.CancelScope(shield=True):
                if may_have_started(err):  # interrupted while the gateway accepted it: it may run
                    with contextlib.suppress(Exception):  # the connection may be gone: nothing to stop
                        await self.cancel()
                await self._close_source()
            raise
        assert isinstance(reply, BulkAccepted)
        self.accepted = reply
        return self

    async def _close_source(self) -> None:
        replay, inbox, self._replay, self._inbox = self._replay, self._inbox, None, None
        await self.bus.stop_reading(inbox, self.run_subject, replay)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            if self.done is None and not self._left and (self._inbox is not None or self._replay):
                with contextlib.suppress(Exception):  # the connection may be gone: nothing to stop
                    await self.cancel()
            await self._close_source()

    def leave(self) -> None:
        """Stop reading without cancelling: the bulk run goes on, to be followed again later."""
        self._left = True

    async def cancel(self) -> None:
        """Stop every running operation of this request on its specialist."""
        await self.bus.nc.publish(cancel_subject(self.id, self.bus.acting_for, self.bus.settings.prefix), b"")
        await self.bus.nc.flush(timeout=1)

    async def resume(self) -> None:
        """Continue from the runs stream after the last event read: no gap, no duplicate."""
        if self.run_subject is None:
            raise BusError("this bulk request is not a durable run: nothing to resume from")
        if self._inbox == self.run_subject:
            await self.bus.close_run(self._inbox)
            self._inbox = None
        if self._replay is not None:
            replay, self._replay = self._replay, None
            await replay.unsubscribe()
        self._resumed_from = self._next_seq
        self._events = self.bus.new_queue()
        self._replay = await self.bus.replay(self.run_subject, self._next_seq, self._events)
        if self.on_resume is not None:
            self.on_resume(self._next_seq)

    async def _recover(self, err: BusError) -> None:
        """Lost events or a silence: read the rest back from the run, once per point of progress."""
        if self.run_subject is None or self._resumed_from == self._next_seq or not self.bus.nc.is_connected:
            raise err
        try:
            await self.resume()
        except Exception as failed:  # not kept, or the server is gone too: the loss stands
            raise err from failed

    def __aiter__(self) -> AsyncIterator[BulkEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[BulkEvent]:
        while self.done is None and not self.nothing_after:
            assert self._events is not None
            msg = await self._events.get(self.idle_timeout)
            if msg is None:
                await self._recover(IdleTimeout("the gateway", self.idle_timeout))
                continue
            event = decode_event(msg.data)
            if event.seq < self._next_seq:  # already read (a resume overlaps what was in flight)
                continue
            if event.seq != self._next_seq:
                await self._recover(StreamGap(self._next_seq, event.seq))
                continue
            self._next_seq += 1
            if isinstance(event, OpChunk):
                self.outputs.setdefault(event.op, []).append(event.text)
            elif isinstance(event, BulkDone):
                self.done = event
            yield event

    def output(self, op: str) -> str:
        return "".join(self.outputs.get(op, []))

    async def result(self) -> BulkDone:
        async for _ in self:
            pass
        assert self.done is not None
        return self.done


class BulkAttachment(BulkStream):
    """A bulk run read from the runs stream (``aish attach``, a reconnecting client): the events after
    ``after``, then the rest live, each exactly once. Leaving the block does not stop it."""

    def __init__(self, bus: Bus, run_id: str, subject: str, after: int, idle_timeout: float):
        super().__init__(bus, BulkPlan(operations=[]), idle_timeout)
        self.id = run_id
        self.run_subject = subject
        self._next_seq = after + 1
        self._left = True

    async def __aenter__(self) -> BulkAttachment:
        if self._replay is not None:
            return self
        assert self.run_subject is not None
        self.ended_at = await attach_end(self.bus.nc, self.bus.settings, self.run_subject, self.id)
        self.nothing_after = self.ended_at is not None and self.ended_at < self._next_seq
        if self.nothing_after:  # a reader reconnecting after bulk_done: said at once
            return self
        self.sent_at = time.perf_counter()
        self._events = self.bus.new_queue()
        self._replay = await self.bus.replay(self.run_subject, self._next_seq, self._events)
        self._resumed_from = self._next_seq
        return self
