"""A gateway replica that dies mid-answer leaves its work to the live ones, without any restart: the
pending turn it was recording and the message it had queued (double_text=queue) are taken over by
exactly one other replica at its next sweep (gateway/leases.py). Real nats-server, gateway processes
killed with SIGKILL, scripted specialist in this process."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import anyio
import msgpack
import pytest
from nats.js.errors import KeyNotFoundError

from bus.client import Bus
from bus.sessions import Turn
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from gateway.leases import work_bucket_name
from gateway.store import SessionStore, StoreLimits, bucket_name, value_limit
from tests.helpers import (
    Child,
    env,
    eventually,
    gateway_process,
    in_process_gateway,
    in_process_specialists,
)

pytestmark = pytest.mark.anyio

WORDS = [f"w{i}" for i in range(60)]
QUESTION = " ".join(WORDS)
ANSWER = "apollo heard: " + QUESTION
SLOW = env(TEKTON_SCRIPTED_TOKENS_PER_S="40")
LEASE = {"TEKTON_GATEWAY_LEASE_S": "1"}


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def start_gateway(settings: TektonSettings, **env: str) -> Child:
    return await anyio.to_thread.run_sync(lambda: gateway_process(settings, **LEASE, **env))


async def taken_over(bus: Bus) -> int:
    """Work taken over, summed over the live gateway replicas (their $SRV.STATS counters)."""
    total = 0
    for answer in await bus.stats("gateway", window=0.5, thorough=True):
        endpoints: list[dict[str, Any]] = answer.get("endpoints") or []
        total += int((endpoints[0].get("data") or {}).get("taken_over", 0)) if endpoints else 0
    return total


async def holder(bus: Bus, request_id: str) -> str:
    """The replica that holds a turn or a queued message, as the sessions bucket says."""
    kv = await bus.nc.jetstream().key_value(work_bucket_name(bus.settings.prefix))
    for kind in ("turn", "queued"):
        try:
            entry = await kv.get(f"w.{kind}.{request_id}")
        except KeyNotFoundError:
            continue
        return str(msgpack.unpackb(entry.value or b"")["holder"])
    raise AssertionError(f"nobody holds {request_id}")


def instance(child: Child) -> str:
    return next(ln for ln in child.seen if ln.startswith("ready gateway")).split()[2]


async def _lose_the_question(bus: Bus, session_id: str) -> None:
    """The session as if its gateway's write of the question had never landed (it went on behind the
    answer while the bucket elected a leader, and the gateway died first)."""
    kv = await bus.nc.jetstream().key_value(bucket_name(bus.settings.prefix))
    entry = await kv.get(f"s.{session_id}")
    stored = msgpack.unpackb(entry.value or b"", raw=False)
    stored["turns"] = [t for t in stored["turns"] if t["role"] != "user"]
    await kv.update(f"s.{session_id}", msgpack.packb(stored), last=entry.revision)


@pytest.mark.parametrize("question_stored", [True, False], ids=["stored", "lost"])
async def test_a_live_gateway_records_the_turn_of_one_killed_mid_answer(
    settings: TektonSettings, question_stored: bool
) -> None:
    """And when the dead gateway's question never reached the bucket (nor its journal), the one taking
    over stores it from the held work's own copy, then the answer."""
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            # Three replicas: when the one recording dies, only one of the two others may take it over.
            gateways = [await start_gateway(settings) for _ in range(3)]
            try:
                session = await bus.gateway.create("apollo")
                async with bus.stream("apollo", user(QUESTION), session=session.id) as s:
                    async for _ in s:
                        break
                    recording = await holder(bus, s.request.id)
                    killed = next(g for g in gateways if instance(g) == recording)
                    killed.stop(signal.SIGKILL)
                    s.leave()  # the asker goes too, without a cancel: nobody settles the turn
                    if not question_stored:
                        await _lose_the_question(bus, session.id)

                async def stored() -> bool:
                    turns = (await bus.gateway.get(session.id)).turns
                    return len(turns) == 2 and turns[0].status == "ok"

                await eventually(stored, within=30)
                turns = (await bus.gateway.get(session.id)).turns
                took = await taken_over(bus)
            finally:
                for child in gateways:
                    child.stop(signal.SIGKILL)
    assert (turns[1].role, turns[1].status, turns[1].content) == ("assistant", "ok", ANSWER)
    assert took == 1


async def test_a_queued_message_survives_its_gateway(settings: TektonSettings) -> None:
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            # Three replicas: the one queueing the message and the first answer's recorder die, one lives.
            gateways = [await start_gateway(settings) for _ in range(3)]
            try:
                session = await bus.gateway.create("apollo")
                async with bus.stream("apollo", user(QUESTION), session=session.id) as s:
                    async for _ in s:
                        break

                    async def busy() -> bool:
                        return any(t.status == "pending" for t in (await bus.gateway.get(session.id)).turns)

                    # The answer starts before its turn is stored when the write is slow (a loaded machine,
                    # a bucket electing a leader: gateway/store.py's write-behind); until it is, another
                    # replica cannot know the session is busy.
                    await eventually(busy, within=10)
                    queued = bus.stream("apollo", user("second"), session=session.id, double_text="queue")
                    async with queued as q:
                        assert q.accepted is not None and q.accepted.queued
                        waiting = await holder(bus, q.request.id)
                        for g in gateways:  # the one keeping the queued message, and the first answer's
                            if instance(g) in (waiting, await holder(bus, s.request.id)):
                                await anyio.to_thread.run_sync(g.stop, signal.SIGKILL)
                        s.leave()
                        second = await q.result()
                turns = (await bus.gateway.get(session.id)).turns
            finally:
                for g in gateways:
                    g.stop(signal.SIGKILL)
    assert second.text == "apollo heard: second"
    assert [(t.role, t.status, t.content) for t in turns] == [
        ("user", "ok", QUESTION),
        ("assistant", "ok", ANSWER),
        ("user", "ok", "second"),
        ("assistant", "ok", "apollo heard: second"),
    ]


@pytest.mark.fast
async def test_a_starting_gateway_waits_for_the_run_of_a_turn_begun_a_moment_ago(
    settings: TektonSettings,
) -> None:
    """A replica starting up finds a turn another replica has just written, before that one holds it
    and before its request reached the specialist: it must wait for the run, not store an error (the
    CI run where a gateway's start-up recovery stored "its run is no longer kept" for a live answer)."""
    request_id = uuid.uuid4().hex
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        async with in_process_gateway(settings):
            session = await bus.gateway.create("apollo")
        # Written with no gateway running, as the other replica would: the user turn, not yet held.
        kv = await bus.nc.jetstream().key_value(bucket_name(settings.prefix))
        limits = StoreLimits(ttl_s=60, max_turns=10, max_bytes=value_limit(bus.nc.max_payload, 1 << 20))
        turn = Turn(
            role="user", content=QUESTION, specialist="apollo", status="pending", request_id=request_id
        )
        await SessionStore(kv, limits).update(session.id, lambda s: s.model_copy(update={"turns": [turn]}))
        async with in_process_gateway(settings):
            # The new replica's recovery holds the turn; only then does the request go out.
            await eventually(lambda: _held(bus, request_id), within=10)
            async with bus.stream("apollo", user(QUESTION), request_id=request_id) as s:
                answer = "".join([chunk async for chunk in s])

            async def stored() -> bool:
                return len((await bus.gateway.get(session.id)).turns) == 2

            await eventually(stored, within=10)
            turns = (await bus.gateway.get(session.id)).turns
    assert [(t.role, t.status) for t in turns] == [("user", "ok"), ("assistant", "ok")]
    assert turns[1].content == answer == ANSWER


async def _held(bus: Bus, request_id: str) -> bool:
    try:
        await holder(bus, request_id)
    except AssertionError:
        return False
    return True


async def test_a_gateway_stopped_past_its_drain_grace_leaves_the_answer_to_the_others(
    settings: TektonSettings,
) -> None:
    """A rolling restart: the replica recording an answer is told to stop (SIGTERM) and its drain grace
    ends before the answer does. It stored the partial answer as an error, so neither the client's
    copy nor another replica could store the whole one: the turn must stay for them."""
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            gateways = [await start_gateway(settings, TEKTON_DRAIN_GRACE_S="0.2") for _ in range(2)]
            try:
                session = await bus.gateway.create("apollo")
                async with bus.stream("apollo", user(QUESTION), session=session.id) as s:
                    got = []
                    async for chunk in s:
                        got.append(chunk)
                        if len(got) == 3:
                            recording = await holder(bus, s.request.id)
                            stopping = next(g for g in gateways if instance(g) == recording)
                            assert await anyio.to_thread.run_sync(stopping.stop) == 0
                    answer = "".join(got)

                async def stored() -> bool:
                    turns = (await bus.gateway.get(session.id)).turns
                    return len(turns) == 2 and turns[0].status != "pending"

                await eventually(stored, within=30)
                turns = (await bus.gateway.get(session.id)).turns
            finally:
                for child in gateways:
                    child.stop(signal.SIGKILL)
    assert answer == ANSWER
    assert [(t.role, t.status) for t in turns] == [("user", "ok"), ("assistant", "ok")]
    assert turns[1].content == ANSWER
