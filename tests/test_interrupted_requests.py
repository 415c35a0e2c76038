"""A request interrupted (Ctrl-C, a deadline) while a gateway is still accepting it may be running
anyway: the client cancels it on its way out. (It did not: a fan-out stopped with Ctrl-C in that
window went on generating on every specialist, found by the rest tier on two workers.)

The gateway here is a plain subscriber that takes the request and never answers, so the client is
always interrupted while it waits for the acceptance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from nats.aio.msg import Msg

from bus.bulk import BulkOperation, BulkPlan
from bus.client import Bus
from bus.errors import BusError, ErrorCode, GatewayTimeout, SessionNotFound
from bus.sessions import ErrorReply
from bus.settings import TektonSettings
from bus.subjects import bulk_subject, cancel_wildcard, session_subject
from bus.wire import ChatMessage, encode
from tests.helpers import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.fast]


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


async def test_a_bulk_interrupted_before_it_is_accepted_is_cancelled(
    settings: TektonSettings,
) -> None:
    async with Bus.connect(settings) as bus:
        plan = BulkPlan(operations=[BulkOperation(id="a", ai="apollo", message="hi")])
        async with silent_gateway(bus, bulk_subject(settings.prefix, bus.acting_for)) as (taken, cancels):
            stream = bus.bulk(plan)
            with anyio.move_on_after(0.5) as interrupted:
                async with stream:
                    pass
            assert interrupted.cancelled_caught and len(taken) == 1
            await eventually(lambda: cancels == [f"{settings.prefix}.cancel.{bus.acting_for}.{stream.id}"])


async def test_a_session_chat_interrupted_before_acceptance_is_cancelled(
    settings: TektonSettings,
) -> None:
    async with Bus.connect(settings) as bus:
        subject = session_subject("chat", settings.prefix, bus.acting_for)
        async with silent_gateway(bus, subject) as (taken, cancels):
            stream = bus.stream("apollo", [ChatMessage(role="user", content="hi")], session="notes")
            with anyio.move_on_after(0.5) as interrupted:
                async with stream:
                    pass
            assert interrupted.cancelled_caught and len(taken) == 1
            await eventually(
                lambda: cancels == [f"{settings.prefix}.cancel.{bus.acting_for}.{stream.request.id}"]
            )


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
            await bus.nc.flush()
            await anyio.sleep(0.2)
            assert cancels == []
