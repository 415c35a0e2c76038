"""The gateway survives whatever one request does (issue 13): values near max_payload, a connection
that nats-py closed for good, a gateway killed mid-answer, a stream with a gap; on a real nats-server."""

from __future__ import annotations

import itertools
import random
import time
from functools import partial

import anyio
import httpx
import msgpack
import pytest

from bus.bulk import BulkOperation, BulkRequest
from bus.client import Bus
from bus.errors import BadRequest, GatewayUnavailable, StreamGap
from bus.sessions import Session, Turn
from bus.settings import TektonSettings
from bus.subjects import bulk_subject, chat_subject, session_subject
from bus.wire import ChatMessage, DoneFrame, StartFrame, Timings, Usage, encode, encode_chunk
from tests.helpers import aish, env, eventually, gateway_process, in_process_gateway, in_process_specialists
from tests.test_http import bridge

pytestmark = pytest.mark.anyio
# The scripted answer to "during", 40 tokens: compared as text, since tokens of a stalled loop
# catching up may share a chunk frame.
WHOLE_DURING = "".join(itertools.islice(itertools.cycle(["apollo ", "heard: ", "during"]), 40))

# The store's own encoding of a session value (what the KV write carries, before its headers).
NEAR = 20  # bytes under max_payload: before the fix such a value passed the check, then the KV
# write's header took it over, the server refused it and closed the gateway's connection.


def packed(session: Session) -> int:
    return len(msgpack.packb(session.model_dump(mode="python", exclude_none=True)))


def fill_to(target: int, build: partial[Session]) -> int:
    """The text length that makes ``build(text)`` pack to ``target`` bytes (text over 64 KiB)."""
    probe = 100_000
    return target - (packed(build("x" * probe)) - probe)


async def say(bus: Bus, session: str, text: str) -> str:
    async with bus.stream("apollo", [ChatMessage(role="user", content=text)], session=session) as s:
        return "".join([t async for t in s])


async def still_serving(bus: Bus) -> None:
    """The gateway answers a create and stores a whole turn (retried while it reconnects)."""
    with anyio.fail_after(20):
        while True:
            try:
                fresh = await bus.gateway.create("apollo")
                break
            except GatewayUnavailable:
                await anyio.sleep(0.1)
    assert await say(bus, fresh.id, "still there?") == "ok"
    turns = (await bus.gateway.get(fresh.id)).turns
    assert [(t.content, t.status) for t in turns] == [("still there?", "ok"), ("ok", "ok")]


async def test_aish_session_chat_of_about_a_mib_then_the_gateway_still_serves(
    settings: TektonSettings,
) -> None:
    with env(TEKTON_SCRIPTED_TEXT="ok"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
        ):
            await bus.gateway.create(name="k")
            max_payload = bus.nc.max_payload

            def stored(text: str) -> Session:
                turn = Turn(
                    role="user", content=text, specialist="apollo", status="pending", request_id="0" * 32
                )
                return Session(name="k", turns=[turn])

            text = "x" * fill_to(max_payload - NEAR, partial(stored))
            result = await anyio.to_thread.run_sync(
                lambda: aish(settings, "--session", "k", "apollo", stdin=text)
            )
            assert result.returncode == 1, result.stderr
            lines = result.stderr.strip().splitlines()
            assert (
                len(lines) == 1 and "over the store's limit" in lines[0] and "nothing was written" in lines[0]
            )
            assert (await bus.gateway.get("k")).turns == []  # nothing half-written, nothing pending
            await still_serving(bus)


async def test_http_create_with_a_metadata_value_of_about_a_mib_then_the_gateway_still_serves(
    settings: TektonSettings,
) -> None:
    with env(TEKTON_SCRIPTED_TEXT="ok"):
        async with (
            bridge(settings) as url,
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            value = "m" * fill_to(bus.nc.max_payload - NEAR, partial(lambda v: Session(metadata={"m": v})))
            refused = await http.post("/api/sessions", json={"metadata": {"m": value}})
            assert refused.status_code == 413, refused.text[:300]
            assert refused.json()["error"]["code"] == "session_too_large"
            assert (await http.get("/api/sessions")).status_code == 200
            await still_serving(bus)
            assert (await http.post("/api/sessions", json={"name": "small"})).status_code == 200


async def test_a_session_of_large_messages_reaching_the_cap_then_the_gateway_still_serves(
    settings: TektonSettings,
) -> None:
    rng = random.Random(13)
    with env(TEKTON_SCRIPTED_TEXT="ok"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
        ):
            max_payload = bus.nc.max_payload
            session = await bus.gateway.create("apollo", name="long")
            current = await bus.gateway.get("long")
            while packed(current) < max_payload - 26_000:  # ordinary use: 6-20 KB messages
                await say(bus, session.id, "y" * rng.randint(6_000, 20_000))
                current = await bus.gateway.get("long")

            def after(text: str) -> Session:
                asked = Turn(role="user", content=text, specialist="apollo", request_id="0" * 32)
                answer = Turn(role="assistant", content="ok", specialist="apollo", request_id="0" * 32)
                return current.model_copy(update={"turns": [*current.turns, asked, answer]})

            # The next exchange lands its stored value just under max_payload (without trimming, as the
            # old limit allowed), where the KV header took it over.
            length = fill_to(max_payload - NEAR, partial(after))
            assert 5_000 < length < 30_000
            assert await say(bus, session.id, "z" * length) == "ok"
            stored = await bus.gateway.get("long")
            assert stored.turns[-2].content == "z" * length and stored.turns[-1].status == "ok"
            assert stored.dropped > 0 and all(t.status == "ok" for t in stored.turns)
            await still_serving(bus)


async def test_a_gateway_whose_connection_was_closed_for_good_connects_again_and_the_turn_is_stored(
    settings: TektonSettings,
) -> None:
    """nats-py closes a connection for good on a server -ERR; a recorder then met nats errors (not
    BusError) in `_finish` and took the process down. Now the replica starts over on a new connection
    and the client, which saw the whole answer, settles the turn."""
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "40", "TEKTON_SCRIPTED_TOKENS": "40"}
    with env(**slow):
        async with (
            in_process_gateway(settings) as gateway,
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
        ):
            session = await bus.gateway.create("apollo")
            async with bus.stream(
                "apollo", [ChatMessage(role="user", content="during")], session=session.id
            ) as s:
                parts = []
                async for text in s:
                    parts.append(text)
                    if len(parts) == 3:
                        await gateway.nc.close()  # what nats-py does after a server's -ERR
            assert s.tokens == 40 and "".join(parts) == WHOLE_DURING
            assert s.stored is not None  # settled through the replica's new connection
            turns = (await bus.gateway.get(session.id)).turns
            assert [(t.role, t.status) for t in turns] == [("user", "ok"), ("assistant", "ok")]
            assert turns[1].content == "".join(parts)


async def test_gateway_killed_with_sigkill_mid_answer_then_restarted_settles_the_turn(
    settings: TektonSettings,
) -> None:
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "40"}
    gateway = gateway_process(settings)
    restarted = None
    try:
        with env(**slow):
            async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
                session = await bus.gateway.create("apollo")
                async with (
                    anyio.create_task_group() as tg,
                    bus.stream(
                        "apollo", [ChatMessage(role="user", content="during")], session=session.id
                    ) as s,
                ):
                    parts = []
                    async for text in s:
                        parts.append(text)
                        if len(parts) == 3:
                            gateway.process.kill()  # SIGKILL: no drain, no goodbye

                            async def restart() -> None:
                                nonlocal restarted
                                restarted = await anyio.to_thread.run_sync(gateway_process, settings)

                            tg.start_soon(restart)
                # The tokens never passed through the gateway: the answer arrived whole, and the
                # client handed it to the restarted gateway, which stored it (the turn is not pending).
                assert s.tokens == 40 and "".join(parts) == WHOLE_DURING and s.stored is not None
                turns = (await bus.gateway.get(session.id)).turns
                assert [(t.role, t.status) for t in turns] == [("user", "ok"), ("assistant", "ok")]
                assert turns[1].content == "".join(parts)
                assert (await say(bus, session.id, "after")).startswith("apollo heard: after")
    finally:
        gateway.stop()
        if restarted is not None:
            restarted.stop()


@pytest.mark.fast
async def test_a_stream_with_a_seq_gap_is_stored_as_an_error_not_an_answer(settings: TektonSettings) -> None:
    """A specialist (here a plain subscriber) whose stream skips a seq: the client raises StreamGap and
    the recorder must not store the text as a complete "ok" answer."""
    async with in_process_gateway(settings), Bus.connect(settings) as bus:

        async def gappy(msg) -> None:  # type: ignore[no-untyped-def]
            start = StartFrame(specialist="gappy", instance="x", provider="test", model="test")
            done = DoneFrame(seq=4, finish_reason="stop", usage=Usage(), timings=Timings(total_ms=1))
            for frame in (encode(start), encode_chunk(1, "one "), encode_chunk(3, "three"), encode(done)):
                await bus.nc.publish(msg.reply, frame)

        await bus.nc.subscribe(chat_subject("gappy", settings.prefix), cb=gappy)
        session = await bus.gateway.create("gappy")
        with pytest.raises(StreamGap):
            async with bus.stream("gappy", [ChatMessage(role="user", content="q")], session=session.id) as s:
                async for _ in s:
                    pass

        async def settled() -> bool:
            turns = (await bus.gateway.get(session.id)).turns
            return bool(turns) and turns[0].status != "pending"

        await eventually(settled)
        turns = (await bus.gateway.get(session.id)).turns
        assert turns[0].status == "error" and "lost frames" in (turns[0].error or "")
        assert all(t.status != "ok" for t in turns)


@pytest.mark.fast
@pytest.mark.parametrize("inbox", ["a b", ">", "_INBOX.*", "x..y"])
async def test_a_bad_inbox_is_refused_and_the_gateway_keeps_its_connection(
    settings: TektonSettings, inbox: str
) -> None:
    from bus.sessions import SessionChat
    from bus.wire import ChatRequest

    async with in_process_gateway(settings) as gateway, Bus.connect(settings) as bus:
        session = await bus.gateway.create()
        chat = SessionChat.model_construct(
            session=session.id,
            specialist="apollo",
            inbox=inbox,
            request=ChatRequest(messages=[ChatMessage(role="user", content="x")]),
        )
        reply = await bus.nc.request(
            session_subject("chat", settings.prefix),
            msgpack.packb(chat.model_dump(mode="python", exclude_none=True)),
        )
        assert msgpack.unpackb(reply.data)["code"] == "bad_request"
        assert not gateway.nc.is_closed
        assert (await bus.gateway.create(name="fine")).name == "fine"


@pytest.mark.fast
async def test_a_turn_abandoned_by_both_gateway_and_client_is_settled_by_the_next_turn(
    settings: TektonSettings,
) -> None:
    async with (
        in_process_gateway(settings) as gateway,
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        session = await bus.gateway.create("apollo")
        lost = Turn(
            role="user", content="lost", specialist="apollo", status="pending", settle_by=time.time() - 1
        )
        await gateway.store.update(session.id, lambda s: s.model_copy(update={"turns": [lost]}))
        await say(bus, session.id, "next")
        turns = (await bus.gateway.get(session.id)).turns
        assert [(t.content, t.status) for t in turns] == [
            ("lost", "error"),
            ("next", "ok"),
            ("apollo heard: next", "ok"),
        ]
        assert "both stopped" in (turns[0].error or "")


@pytest.mark.fast
async def test_a_bulk_operation_naming_no_model_is_refused_at_once(settings: TektonSettings) -> None:
    """A model name that is none, sent past the client's own check: the gateway took the request and
    its run crashed in the background, the asker waiting out the idle timeout; now it refuses it."""
    plan = BulkRequest.model_construct(
        operations=[BulkOperation.model_construct(id="a", ai="apollo", message="x", model="bad model")],
        execution="parallel",
        id="bad-model-request",
        inbox="_INBOX.anonymous.nobody",
        v=1,
    )
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        with anyio.fail_after(4), pytest.raises(BadRequest, match="model must be"):
            await bus.gateway.call("bulk", plan, subject=bulk_subject(settings.prefix))
