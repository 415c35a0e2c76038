"""Sessions in JetStream KV through the gateway, on a real nats-server, with real specialists."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgpack
import pytest

from bus.client import Bus
from bus.errors import BadRequest, GatewayUnavailable, SessionNotFound, SessionTooLarge, SpecialistUnavailable
from bus.server import EmbeddedNats
from bus.sessions import GatewayClient, Session, Turn
from bus.settings import TektonSettings
from bus.subjects import session_subject
from bus.wire import ChatMessage, ChatOptions
from gateway.store import SessionStore, StoreLimits, open_bucket, value_limit
from tests.helpers import (
    env,
    eventually,
    gateway_process,
    in_process_gateway,
    in_process_specialists,
    run_aish,
)

pytestmark = pytest.mark.anyio

ECHO = {"TEKTON_SCRIPTED_ECHO_CONTEXT": "1"}


async def say(bus: Bus, session: str, text: str, specialist: str = "apollo") -> str:
    async with bus.stream(specialist, [ChatMessage(role="user", content=text)], session=session) as s:
        return "".join([t async for t in s])


def test_context_is_the_last_completed_turns() -> None:
    turns = [
        Turn(role="user", content="q1", specialist="a"),
        Turn(role="assistant", content="a1", specialist="a"),
        Turn(role="user", content="q2", specialist="a", status="error", error="boom"),
        Turn(role="user", content="q3", specialist="a"),
        Turn(role="assistant", content="a3", specialist="a"),
    ]
    session = Session(context_window=3, turns=turns)
    assert [m.content for m in session.context()] == ["a1", "q3", "a3"]
    assert Session(context_window=0, turns=turns).context() == []


async def test_sessions_api_round_trip(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        api = bus.gateway
        work = await api.create("apollo", name="work", context_window=4, metadata={"team": "core"})
        other = await api.create("athena")
        assert (await api.get(work.id)).metadata == {"team": "core"}
        assert (await api.get("work")).id == work.id
        assert (await api.get(work.id[:8])).id == work.id
        assert [s.id for s in await api.list()] == [other.id, work.id]  # newest first
        assert [s.id for s in await api.list(specialist="apollo")] == [work.id]
        assert [s.id for s in await api.list(name="work")] == [work.id]
        with pytest.raises(BadRequest, match="already exists"):
            await api.create(name="work")
        renamed = await api.rename(other.id, "notes")
        assert renamed.name == "notes"
        await say(bus, "work", "one")
        await say(bus, "work", "two")
        fork = await api.fork("work", at=2, name="branch")
        assert [t.content for t in fork.turns] == ["one", "apollo heard: one"]
        assert fork.metadata["forked_from"] == work.id
        with pytest.raises(BadRequest, match="cannot fork at 9"):
            await api.fork("work", at=9)
        assert await api.delete("branch") == fork.id
        with pytest.raises(SessionNotFound, match="'branch'"):
            await api.get("branch")
        with pytest.raises(BadRequest, match="name"):
            await api.create(name="no spaces allowed")


async def test_chat_records_turns_and_sends_the_context_window(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in ECHO.items():
        monkeypatch.setenv(key, value)
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo", "athena"),
        Bus.connect(settings) as bus,
    ):
        session = await bus.gateway.create("apollo", context_window=2)
        assert await say(bus, session.id, "q1") == "apollo heard: user: q1"
        # Read-your-writes: the next turn sees the answer that just ended.
        assert await say(bus, session.id, "q2") == (
            "apollo heard: user: q1 | assistant: apollo heard: user: q1 | user: q2"
        )
        third = await say(bus, session.id, "q3", specialist="athena")
        assert third.startswith("athena heard: user: q2 | assistant: apollo heard:")
        stored = await bus.gateway.get(session.id)
        assert [(t.role, t.specialist, t.status) for t in stored.turns] == [
            ("user", "apollo", "ok"),
            ("assistant", "apollo", "ok"),
            ("user", "apollo", "ok"),
            ("assistant", "apollo", "ok"),
            ("user", "athena", "ok"),
            ("assistant", "athena", "ok"),
        ]
        assert stored.turns[-1].content == third


async def test_a_failed_or_cancelled_answer_keeps_the_user_turn(settings: TektonSettings) -> None:
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "50", "TEKTON_SCRIPTED_TOKENS": "1000"}
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        session = await bus.gateway.create()
        with pytest.raises(SpecialistUnavailable, match="apolo"):
            await say(bus, session.id, "typo", specialist="apolo")
        with env(**slow):
            async with in_process_specialists(settings, "apollo"):
                async with bus.stream(
                    "apollo", [ChatMessage(role="user", content="long")], session=session.id
                ) as s:
                    async for _ in s:
                        break  # leaving early cancels on the specialist

                async def marked() -> bool:
                    turns = (await bus.gateway.get(session.id)).turns
                    return len(turns) == 3 and turns[1].status == "cancelled"

                await eventually(marked)
        turns = (await bus.gateway.get(session.id)).turns
        assert (turns[0].content, turns[0].status) == ("typo", "error")
        assert "no specialist named 'apolo'" in (turns[0].error or "")
        assert (turns[1].content, turns[1].status) == ("long", "cancelled")
        assert turns[2].role == "assistant" and turns[2].status == "cancelled" and turns[2].content


async def test_unknown_session_and_no_gateway_are_clear_errors(settings: TektonSettings) -> None:
    async with Bus.connect(settings) as bus:
        with pytest.raises(GatewayUnavailable, match="tekton gateway"):
            await bus.gateway.list()
    result = await run_aish(settings, "--session", "0123456789abcdef0123456789abcdef", "apollo", "hi")
    assert result.returncode == 1
    assert "no gateway is running" in result.stderr
    async with in_process_gateway(settings):
        result = await run_aish(settings, "--session", "0123456789abcdef0123456789abcdef", "apollo", "hi")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            "aish: no session '0123456789abcdef0123456789abcdef' (unknown, deleted, or expired); "
            "`aish sessions` lists them"
        ]


async def test_expired_session_names_itself(settings: TektonSettings) -> None:
    short = settings.model_copy(update={"session_ttl_s": 1.0})
    async with in_process_gateway(short), Bus.connect(short) as bus:
        session = await bus.gateway.create(name="brief")

        async def gone() -> bool:
            return await bus.gateway.find(session.id) is None

        await eventually(gone, within=15)
        with pytest.raises(SessionNotFound, match=r"'brief'.*expired after 1 s"):
            await bus.gateway.get("brief")


async def test_aish_pipeline_in_a_session_then_the_next_command_sees_it(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in ECHO.items():
        monkeypatch.setenv(key, value)
    async with in_process_gateway(settings), in_process_specialists(settings, "apollo", "athena"):
        first = await run_aish(settings, "-c", "--session", "work", 'echo "x" | apollo | athena')
        assert first.returncode == 0, first.stderr
        assert "new session 'work'" in first.stderr
        # athena saw apollo's stage in its context, then apollo's answer as its input.
        assert first.stdout.startswith(
            "athena heard: user: x | assistant: apollo heard: user: x | user: apollo"
        )
        second = await run_aish(settings, "--session", "work", "apollo", "next")
        assert second.returncode == 0, second.stderr
        assert "assistant: athena heard: user: x" in second.stdout
        assert second.stdout.rstrip().endswith("user: next")
        listed = await run_aish(settings, "sessions")
        assert "work" in listed.stdout and " 6 " in listed.stdout
        shown = await run_aish(settings, "sessions", "show", "work")
        assert "[1] you: x" in shown.stdout and "[6] apollo: apollo heard:" in shown.stdout
        forked = await run_aish(settings, "sessions", "fork", "work", "--at", "2")
        assert forked.returncode == 0, forked.stderr
        fork_id = forked.stdout.strip()
        cont = await run_aish(settings, "--continue", "athena", "again")
        assert "continuing session" in cont.stderr  # the fork, the most recently changed
        assert (
            cont.stdout.rstrip() == "athena heard: user: x | assistant: apollo heard: user: x | user: again"
        )
        removed = await run_aish(settings, "sessions", "rm", fork_id)
        assert removed.stdout.strip() == f"deleted {fork_id}"
        bare = await run_aish(settings, "apollo", "hi", "--session")
        assert bare.returncode == 0 and "new session" in bare.stderr


async def test_concurrent_appends_from_two_processes_lose_nothing(settings: TektonSettings) -> None:
    """Two aish processes talk in one session at once, through two gateway replicas."""
    rounds = 6
    second_gateway = gateway_process(settings)
    try:
        async with in_process_gateway(settings), in_process_specialists(settings, "apollo"):
            async with Bus.connect(settings) as bus:
                await bus.gateway.create("apollo", name="shared")

            async def talk(who: str) -> None:
                for i in range(rounds):
                    result = await run_aish(settings, "--session", "shared", "apollo", f"{who}-{i}")
                    assert result.returncode == 0, result.stderr

            async with anyio.create_task_group() as tg:
                tg.start_soon(talk, "left")
                tg.start_soon(talk, "right")
            async with Bus.connect(settings) as bus:
                turns = (await bus.gateway.get("shared")).turns
    finally:
        second_gateway.stop()
    assert len(turns) == 4 * rounds and all(t.status == "ok" for t in turns)
    for who in ("left", "right"):
        asked = [t.content for t in turns if t.role == "user" and t.content.startswith(who)]
        assert asked == [f"{who}-{i}" for i in range(rounds)]
        answered = [t.content for t in turns if t.role == "assistant" and who in t.content]
        assert answered == [f"apollo heard: {who}-{i}" for i in range(rounds)]


async def test_sessions_survive_a_nats_server_restart(tmp_path: Path, settings: TektonSettings) -> None:
    server = EmbeddedNats(tmp_path / "restart-store", port=0)
    server.start()
    port = server.port
    assert port is not None
    here = settings.model_copy(update={"nats_url": server.url})
    try:
        async with (
            in_process_gateway(here),
            in_process_specialists(here, "apollo"),
            Bus.connect(here) as bus,
        ):
            session = await bus.gateway.create("apollo", name="durable")
            await say(bus, session.id, "before")
            server.stop()
            server = EmbeddedNats(tmp_path / "restart-store", port=port)
            server.start()
            kept = await _retry(lambda: bus.gateway.get("durable"))
            assert [t.content for t in kept.turns] == ["before", "apollo heard: before"]
            assert (await _retry(lambda: say(bus, session.id, "after"))) == "apollo heard: after"
            assert len((await bus.gateway.get(session.id)).turns) == 4
    finally:
        server.stop()


async def _retry(call, within: float = 15.0):  # type: ignore[no-untyped-def]
    """Clients and services reconnect on their own after a server restart; retry until they have."""
    with anyio.fail_after(within):
        while True:
            try:
                return await call()
            except (GatewayUnavailable, SpecialistUnavailable):
                await anyio.sleep(0.1)


async def test_oversized_session_is_refused_without_a_partial_write(settings: TektonSettings) -> None:
    small = settings.model_copy(update={"session_max_bytes": 4096})
    async with (
        in_process_gateway(small),
        in_process_specialists(small, "apollo"),
        Bus.connect(small) as bus,
    ):
        session = await bus.gateway.create("apollo")
        await say(bus, session.id, "short")
        with pytest.raises(SessionTooLarge, match="limit of 4,096 bytes; nothing was written"):
            await say(bus, session.id, "x" * 5000)
        turns = (await bus.gateway.get(session.id)).turns
        assert [t.content for t in turns] == ["short", "apollo heard: short"]
        stats = (await bus.stats("apollo"))[0]["endpoints"][0]["data"]
        assert stats["served"] == 1  # the refused turn never reached the specialist
        # Near the limit, the oldest turns make room (counted, not silently lost).
        for i in range(4):
            await say(bus, session.id, f"{i}" + "y" * 900)
        stored = await bus.gateway.get(session.id)
        assert stored.dropped > 0 and stored.turns[-1].content.startswith("apollo heard: 3")


async def test_history_is_capped_oldest_first(settings: TektonSettings) -> None:
    capped = settings.model_copy(update={"session_max_turns": 4})
    async with (
        in_process_gateway(capped),
        in_process_specialists(capped, "apollo"),
        Bus.connect(capped) as bus,
    ):
        session = await bus.gateway.create("apollo")
        for text in ("a", "b", "c"):
            await say(bus, session.id, text)
        stored = await bus.gateway.get(session.id)
        assert [t.content for t in stored.turns] == ["b", "apollo heard: b", "c", "apollo heard: c"]
        assert stored.dropped == 2 and stored.summary().turns == 6


async def test_malformed_session_requests_get_an_error_and_the_gateway_keeps_running(
    settings: TektonSettings,
) -> None:
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        for op, payload in [
            ("get", b"\xc1 not msgpack"),
            ("get", msgpack.packb({"session": "x", "extra": 1})),
            ("create", msgpack.packb({"context_window": -1})),
            ("chat", msgpack.packb({"session": "x"})),
            ("list", msgpack.packb([1, 2, 3])),
        ]:
            reply = await bus.nc.request(session_subject(op, settings.prefix), payload, timeout=5)
            error = msgpack.unpackb(reply.data)
            assert error["type"] == "error" and error["code"] == "bad_request", (op, error)
            assert f"not a valid '{op}' request" in error["message"]
        assert (await bus.gateway.create(name="fine")).name == "fine"


async def test_chat_options_reach_the_specialist_through_the_gateway(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        session = await bus.gateway.create("apollo")
        async with bus.stream(
            "",
            [ChatMessage(role="user", content="one two three four")],
            ChatOptions(max_tokens=2),
            session=session.id,
        ) as s:
            assert [t async for t in s] == ["apollo ", "heard: "]
        assert (await s.result()).done.finish_reason == "length"


async def test_two_first_uses_of_a_name_make_one_session(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        made: list[str] = []
        refused: list[str] = []

        async def create() -> None:
            try:
                made.append((await bus.gateway.create(name="foo")).id)
            except BadRequest as err:
                refused.append(err.message)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(create)
        assert len(made) == 1 and len(refused) == 19
        assert all("already exists" in m for m in refused)
        # Two aish commands using `--session bar` for the first time at once talk in one session.
        async with anyio.create_task_group() as tg:
            for word in ("left", "right"):
                tg.start_soon(run_aish, settings, "--session", "bar", "apollo", word)
        assert len(await bus.gateway.list(name="bar")) == 1
        turns = (await bus.gateway.get("bar")).turns
        assert sorted(t.content for t in turns if t.role == "user") == ["left", "right"]


@pytest.mark.fast
async def test_names_follow_renames_and_deletes(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        api = bus.gateway
        dotted = await api.create(name="x.y-z_1")
        assert (await api.get("x.y-z_1")).id == dotted.id
        await api.rename("x.y-z_1", "w")
        assert (await api.get("w")).id == dotted.id
        with pytest.raises(SessionNotFound):
            await api.get("x.y-z_1")
        again = await api.create(name="x.y-z_1")  # the old name is free again
        assert (await api.get("x.y-z_1")).id == again.id
        with pytest.raises(BadRequest, match="already exists"):
            await api.rename("w", "x.y-z_1")
        assert (await api.get("w")).id == dotted.id  # a refused rename changed nothing
        await api.delete("w")
        assert (await api.create(name="w")).id != dotted.id
        assert sorted(s.name or "" for s in await api.list()) == ["w", "x.y-z_1"]


async def test_200_named_creates_and_100_lists_at_once_beside_large_sessions(
    settings: TektonSettings,
) -> None:
    """Names and listing no longer read every session: with 30 sessions of ~900 KB in the bucket,
    200 concurrent named creates and 100 concurrent lists all succeed and the gateway stays responsive
    (before: the gateway decoded the whole bucket per request, 0 of 200 creates)."""
    gateway = gateway_process(settings)
    try:
        async with Bus.connect(settings) as bus:
            for i in range(30):
                await bus.gateway.create(name=f"big{i}", metadata={"pad": "p" * 900_000})
            patient = GatewayClient(bus.nc, settings.prefix, timeout=60)
            made: list[str] = []
            listed: list[int] = []

            async def create(i: int) -> None:
                made.append((await patient.create("apollo", name=f"n{i}")).id)

            async def list_all() -> None:
                listed.append(len(await patient.list(limit=10_000)))

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(create, i)
                for _ in range(100):
                    tg.start_soon(list_all)
            assert len(set(made)) == 200 and len(listed) == 100 and all(30 <= n <= 230 for n in listed)
            assert len(await bus.gateway.list(limit=10_000)) == 230
            assert (await bus.gateway.get("n199")).name == "n199"
            assert (await bus.gateway.get("big7")).metadata["pad"] == "p" * 900_000
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()  # it has nothing left to record; a stuck one must not outlive the test
        gateway.process.wait()


@pytest.mark.fast
async def test_the_session_cache_is_bounded_in_bytes(settings: TektonSettings) -> None:
    async with Bus.connect(settings) as bus:
        limits = StoreLimits(ttl_s=60, max_turns=10, max_bytes=value_limit(bus.nc.max_payload, 1 << 20))
        store = SessionStore(
            await open_bucket(bus.nc.jetstream(), settings.prefix, limits), limits, cache_bytes=200_000
        )
        for _ in range(10):
            await store.create(Session(metadata={"pad": "q" * 50_000}))
        assert 0 < store.cached_bytes <= 200_000


@pytest.mark.fast
async def test_concurrent_lists_each_see_every_session(settings: TektonSettings) -> None:
    """nats-py's KV watcher can say "nothing more" before the summaries the server already sent are
    read: 30 lists at once gave some callers an empty list (the CI run's "lists empty once")."""
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        for i in range(100):
            await bus.gateway.create("apollo", name=f"s{i}")
        counts: list[int] = []

        async def one() -> None:
            counts.append(len(await bus.gateway.list(limit=10_000)))

        for _ in range(5):
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(one)
        assert counts == [100] * 150, sorted(set(counts))
