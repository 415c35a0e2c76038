"""A request interrupted (Ctrl-C, a deadline) while a gateway is still accepting it may be running
anyway: the client cancels it on its way out. (It did not: a fan-out stopped with Ctrl-C in that
window went on generating on every specialist, found by the rest tier on two workers.)

The gateway here is a plain subscriber that takes the request and never answers, so the client is
always interrupted while it waits for the acceptance."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import pytest
from fastapi import WebSocketDisconnect
from nats.aio.msg import Msg

from bridge.edge import Guard
from bridge.jsonrpc import JsonRpc
from bus.bulk import BulkOperation, BulkPlan
from bus.client import Bus
from bus.errors import BusError, ErrorCode, GatewayTimeout, SessionNotFound
from bus.sessions import ErrorReply
from bus.settings import TektonSettings
from bus.subjects import bulk_subject, cancel_subject, cancel_wildcard, session_subject
from bus.wire import ChatMessage, encode
from gateway.cancels import CancelBook
from tests.helpers import env, eventually, in_process_gateway, in_process_specialists

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def silent_gateway(
    bus: Bus, subject: str, answer: bytes | None = None
) -> AsyncIterator[tuple[list[Msg], list[str]]]:
    """Takes requests on ``subject`` and never answers (or answers ``answer``); yields (requests taken,
    cancels heard)."""
    taken: list[Msg] = []
    cancels: list[str] = []

    async def take(msg: Msg) -> None:
        taken.append(msg)
        if answer is not None:
            await msg.respond(answer)

    async def heard(msg: Msg) -> None:
        cancels.append(msg.subject)

    subs = [
        await bus.nc.subscribe(subject, cb=take),
        await bus.nc.subscribe(cancel_wildcard(bus.settings.prefix), cb=heard),
    ]
    await bus.nc.flush()
    try:
        yield taken, cancels
    finally:
        for sub in subs:
            await sub.unsubscribe()


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["bulk", "session chat"])
async def test_a_request_interrupted_before_it_is_accepted_is_cancelled(
    settings: TektonSettings, kind: str
) -> None:
    async with Bus.connect(settings) as bus:
        if kind == "bulk":
            subject = bulk_subject(settings.prefix, bus.acting_for)
            stream: Any = bus.bulk(BulkPlan(operations=[BulkOperation(id="a", ai="apollo", message="hi")]))
            request_id = stream.id
        else:
            subject = session_subject("chat", settings.prefix, bus.acting_for)
            stream = bus.stream("apollo", [ChatMessage(role="user", content="hi")], session="notes")
            request_id = stream.request.id
        async with silent_gateway(bus, subject) as (taken, cancels):
            with anyio.move_on_after(0.5) as interrupted:
                async with stream:
                    pass
            assert interrupted.cancelled_caught and len(taken) == 1
            await eventually(lambda: cancels == [cancel_subject(request_id, bus.acting_for, settings.prefix)])


async def test_a_session_chat_the_gateway_does_not_accept_in_time_is_cancelled(
    settings: TektonSettings,
) -> None:
    """No acceptance within the gateway call's wait (5 s): the gateway may have started it."""
    async with Bus.connect(settings) as bus:
        subject = session_subject("chat", settings.prefix, bus.acting_for)
        async with silent_gateway(bus, subject) as (_, cancels):
            stream = bus.stream("apollo", [ChatMessage(role="user", content="hi")], session="notes")
            with pytest.raises(GatewayTimeout):
                async with stream:
                    pass
            await eventually(
                lambda: cancels == [f"{settings.prefix}.cancel.{bus.acting_for}.{stream.request.id}"]
            )


@pytest.mark.fast
@pytest.mark.parametrize(
    "error",
    [
        SessionNotFound("no session 'notes'"),
        BusError("the gateway is busy", code=ErrorCode.OVERLOADED, retryable=True),
    ],
)
async def test_a_request_the_gateway_turned_down_is_not_cancelled(
    settings: TektonSettings, error: BusError
) -> None:
    """An error reply (retryable or not) is the gateway's answer: it started nothing, so no cancel
    goes out (one would also stop a retry of the same request id for a while)."""
    reply = encode(ErrorReply(code=str(error.code), message=error.message, retryable=error.retryable))
    async with Bus.connect(settings) as bus:
        subject = session_subject("chat", settings.prefix, bus.acting_for)
        async with silent_gateway(bus, subject, answer=reply) as (taken, cancels):
            with pytest.raises(BusError, match=error.message):
                async with bus.stream("apollo", [ChatMessage(role="user", content="hi")], session="notes"):
                    pass
            assert len(taken) == 1
            # A marker after it on the same connection: a cancel sent before would be heard first.
            marker = cancel_subject("marker", bus.acting_for, settings.prefix)
            await bus.nc.publish(marker, b"")
            await eventually(lambda: marker in cancels)
            assert cancels == [marker]


# With a real gateway: a cancel the gateway hears before the work begins, or while it waits.
SLOW = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "400"}


@pytest.mark.fast
async def test_a_bulk_cancel_heard_before_the_gateway_began_it_stops_it(settings: TektonSettings) -> None:
    """The client gave up waiting for the acceptance and cancelled: the gateway heard the cancel before
    the request (it was busy, say). It still stops the bulk request once it begins (it did not: the
    cancel went to a subscription that did not exist yet, and every operation ran to its end)."""
    with env(**SLOW):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo") as services,
            Bus.connect(settings) as bus,
        ):
            stream = bus.bulk(BulkPlan(operations=[BulkOperation(id="a", ai="apollo", message="hi")]))
            await bus.nc.publish(cancel_subject(stream.id, bus.acting_for, settings.prefix), b"")
            await bus.nc.flush()
            with anyio.fail_after(10):  # the whole answer would take 20 s
                async with stream:
                    done = await stream.result()
            assert done.status == "cancelled"
            assert services["apollo"].counters.served == 0


@pytest.mark.fast
async def test_a_queued_session_message_cancelled_while_it_waits_never_starts(
    settings: TektonSettings,
) -> None:
    with env(**SLOW):
        async with (
            in_process_gateway(settings) as gateway,
            in_process_specialists(settings, "apollo") as services,
            Bus.connect(settings) as bus,
        ):
            session = await bus.gateway.create("apollo")
            first = bus.stream("apollo", [ChatMessage(role="user", content="first")], session=session.id)
            async with first:
                await first.wait_started()
                second = bus.stream(
                    "apollo",
                    [ChatMessage(role="user", content="second")],
                    session=session.id,
                    double_text="queue",
                )
                async with second:
                    assert second.accepted is not None and second.accepted.queued
                # Left unread: its cancel went out; the gateway drops the message from its queue.
                await first.cancel()
            apollo = services["apollo"]
            # Nothing left recording: the first turn is stored and the queued message is gone (had it
            # started, its 20 s answer would be recording, and streaming on apollo).
            await eventually(lambda: gateway.counters["recording"] == 0 and apollo.counters.in_flight == 0)
            assert apollo.counters.cancelled == 1
            turns = (await bus.gateway.get(session.id)).turns
            assert [t.content for t in turns if t.role == "user"] == ["first"]


@pytest.mark.fast
async def test_the_gateway_s_cancel_book_tells_every_piece_of_work_of_one_id() -> None:
    """Two pieces of work under one (user, id) (a client that reused an id) are both told, and one
    ending does not deafen the other; a cancel heard before the work began is told when it begins."""
    book = CancelBook()
    with book.watch("bob", "r1") as first, book.watch("bob", "r1") as second:
        book.heard("bob", "r1")
        assert first.cancelled.is_set() and second.cancelled.is_set()
    with book.watch("bob", "r3") as staying:
        with book.watch("bob", "r3"):
            pass
        book.heard("bob", "r3")
        assert staying.cancelled.is_set()
    book.heard("bob", "r2")
    with book.watch("alice", "r2") as someone_elses, book.watch("bob", "r2") as early:
        assert early.cancelled.is_set() and not someone_elses.cancelled.is_set()
        with early.scope:
            await anyio.sleep(5)  # cancelled before it was entered: returns at once
        assert early.scope.cancelled_caught


class ClosedUnderSend:
    """A WebSocket its client has closed (a page reload), as a stream's relay meets it before the read
    loop has read the close: every send fails, the close is not read yet."""

    headers: dict[str, str] = {}

    async def send_text(self, _data: str) -> None:
        raise WebSocketDisconnect(code=1006)

    async def receive(self) -> dict[str, object]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.mark.fast
async def test_a_json_rpc_stream_whose_socket_closed_under_a_send_leaves_its_run_going(
    settings: TektonSettings,
) -> None:
    """A reload in the console closed the socket mid-answer; the stream's send met the closed socket
    before the read loop heard the close, and the block's exit cancelled the run that the reloaded
    page was to continue (test_console_reload_continues_the_answer failed so on a loaded machine)."""
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="200", TEKTON_SCRIPTED_TOKENS="60"):
        async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
            rpc = JsonRpc(cast(Any, ClosedUnderSend()), bus, Guard([], 100.0, 100.0), "local")
            async with anyio.create_task_group() as tg:
                tg.start_soon(rpc.serve)
                request = {"specialist": "apollo", "message": "a long answer"}
                await rpc.handle(
                    json.dumps({"jsonrpc": "2.0", "id": 1, "method": "stream", "params": request})
                )
                apollo = services["apollo"].counters
                await eventually(lambda: apollo.served == 1, within=10)  # the whole answer, for a resume
                assert apollo.cancelled == 0
                tg.cancel_scope.cancel()
