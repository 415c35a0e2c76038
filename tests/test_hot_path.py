"""The hot path's fairness and bounds, over a real nats-server with real specialist processes.

Speed itself is measured in bench/hot_path.py, never asserted here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgpack
import nats
import pytest

from bus.client import Bus
from bus.errors import DeadlineExceeded
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.subjects import cancel_subject
from bus.usage import UsageRecord, encode_usage, pack_records, usage_subject
from bus.wire import ChatMessage, ChatOptions, DoneFrame, Timings, Usage, encode, encode_done
from tests.helpers import in_process_specialists, specialist_process

pytestmark = pytest.mark.anyio

FLAT_OUT = "1000000"  # tokens (the most a request may ask): a stream at unlimited rate lasting seconds


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def request(specialist_text: str, max_tokens: int) -> bytes:
    return msgpack.packb(
        {
            "v": 1,
            "id": uuid.uuid4().hex,
            "messages": [{"role": "user", "content": specialist_text}],
            "options": {"max_tokens": max_tokens},
        }
    )


@pytest.mark.fast
def test_usage_record_fast_path_matches_the_model() -> None:
    for session, prompt, cost in ((None, 0, 0.0), ("s-1", 12, 0.0042)):
        model = UsageRecord(
            request_id="r1",
            specialist="apollo",
            session=session,
            prompt_tokens=prompt,
            completion_tokens=8,
            cost=cost,
        )
        assert encode_usage("r1", "apollo", session, prompt, 8, cost) == encode(model)


@pytest.mark.fast
def test_a_batch_of_usage_records_is_the_msgpack_array_of_them() -> None:
    for n in (0, 1, 15, 16, 70_000):  # each length form msgpack has: fixarray, array 16, array 32
        records = [encode_usage(f"r{i}", "apollo", None, 1, 2, 0.0) for i in range(n)]
        assert pack_records(records) == msgpack.packb([msgpack.unpackb(r) for r in records])


async def test_usage_records_go_a_batch_at_a_time_and_each_answer_once(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many answers ending together: their records reach the usage subject as arrays, several records
    in one message, each answer's record exactly once (the gateway's book is not running: we read the
    subject). The answers wait 300 ms for their first token, so they end within a batch's 50 ms of
    each other even on a loaded machine."""
    monkeypatch.setenv("TEKTON_SCRIPTED_FIRST_TOKEN_MS", "300")
    seen: list[Any] = []
    nc = await nats.connect(settings.nats_url)
    got_all = anyio.Event()

    async def on_usage(msg: Any) -> None:
        seen.append(msgpack.unpackb(msg.data))  # checked below: an assert here nats-py would swallow
        if sum(len(b) if isinstance(b, list) else 1 for b in seen) >= 20:
            got_all.set()

    await nc.subscribe(usage_subject("*", settings.prefix), cb=on_usage)
    try:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            ids = []

            async def ask() -> None:
                async with bus.stream("apollo", [ChatMessage(role="user", content="hi")]) as s:
                    ids.append(s.request.id)
                    async for _ in s:
                        pass

            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(ask)
            with anyio.fail_after(30):
                await got_all.wait()
        assert all(isinstance(batch, list) for batch in seen), seen
        records = [r for batch in seen for r in batch]
        assert sorted(r["request_id"] for r in records) == sorted(ids)
        assert all(UsageRecord.model_validate(r).specialist == "apollo" for r in records)
        assert max(map(len, seen)) > 1
    finally:
        await nc.close()


@pytest.mark.fast
def test_done_frame_fast_path_matches_the_model() -> None:
    cases = ((0.5, 120.0, 12, 0.00042), (None, None, None, None), (None, None, 3, None))
    for first, rate, prompt, cost in cases:
        model = DoneFrame(
            seq=9,
            finish_reason="stop",
            usage=Usage(prompt_tokens=prompt, completion_tokens=8, cost=cost),
            timings=Timings(first_token_ms=first, total_ms=1.5, tokens_per_s=rate),
        )
        assert encode_done(9, "stop", 8, 1.5, first, rate, prompt, cost) == encode(model)


async def test_a_flat_out_stream_starves_neither_other_requests_nor_its_cancel(
    settings: TektonSettings,
) -> None:
    with specialist_process(settings, "apollo", "athena", TEKTON_SCRIPTED_TOKENS=FLAT_OUT):
        nc = await nats.connect(settings.nats_url)
        frames: list[dict[str, Any]] = []
        ended = anyio.Event()

        async def on_frame(msg: Any) -> None:
            frame = msgpack.unpackb(msg.data)
            if frame["type"] in ("done", "error"):
                frames.append(frame)
                ended.set()
            elif not frames:
                frames.append(frame)  # the start frame: proof it runs

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_frame, pending_msgs_limit=-1, pending_bytes_limit=-1)
        long = request("flat out", int(FLAT_OUT))
        await nc.publish("tekton.ai.athena.chat", long, reply=inbox)
        async with Bus.connect(settings) as bus:
            # Another request to the same process while athena streams as fast as it can.
            with anyio.fail_after(30):
                result = await bus.ask("apollo", "still there?", ChatOptions(max_tokens=3))
            assert result.text == "apollo heard: still "
            assert not ended.is_set(), "the flat-out stream ended before the other request was served"
            # Its cancel is heard too, long before the stream would have ended on its own.
            await nc.publish(cancel_subject(msgpack.unpackb(long)["id"]), b"")
            with anyio.fail_after(30):
                await ended.wait()
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "cancelled"
        await nc.close()


async def test_a_client_that_stops_reading_does_not_grow_the_specialist(settings: TektonSettings) -> None:
    """A reply subject whose reader never reads: the server drops it as a slow consumer, and the
    specialist's outgoing buffer stays bounded (nats-py's pending limit), so its memory does too."""
    with specialist_process(settings, "athena", TEKTON_SCRIPTED_TOKENS=FLAT_OUT) as (child, _):
        pid = child.process.pid
        host, port = settings.nats_url.removeprefix("nats://").rsplit(":", 1)
        before = rss_kib(pid)
        # A raw NATS client that subscribes, asks for a huge answer and then never reads a byte.
        with socket.create_connection((host, int(port))) as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.recv(4096)  # INFO
            # A long word among the answer's tokens: ~200 MB in all, far more than the specialist may hold.
            payload = request("never read " + "x" * 1000, int(FLAT_OUT))
            stuck.sendall(
                b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB stuck.inbox 1\r\n'
                + b"PUB tekton.ai.athena.chat stuck.inbox %d\r\n" % len(payload)
                + payload
                + b"\r\nPING\r\n"
            )
            peak = before
            async with Bus.connect(settings) as bus:
                for _ in range(20):  # while athena generates for nobody, it still answers others
                    with anyio.fail_after(30):
                        result = await bus.ask("athena", "and me?", ChatOptions(max_tokens=2))
                    assert result.text == "athena heard: "
                    peak = max(peak, rss_kib(pid))
                    await asyncio.sleep(0.1)  # sampling interval for the RSS, not synchronisation
        # The answer would be ~200 MB if the specialist buffered it.
        assert peak - before < 32 * 1024, f"specialist RSS grew by {(peak - before) // 1024} MiB"


@pytest.mark.fast
def test_one_shot_aish_imports_no_repl_rich_web_or_server_stack() -> None:
    """What `aish NAME "question"` imports before its first request: no REPL (prompt_toolkit), no
    rich (structlog's optional tracebacks), no aiohttp (nats-py's optional WebSocket transport), no
    FastAPI/uvicorn. Measured with `python -X importtime -c 'import aish_client.cli'`."""
    heavy = ("prompt_toolkit", "rich", "aiohttp", "fastapi", "uvicorn", "starlette", "httpx")
    code = (
        "import sys, aish_client.cli\n"
        "from aish_client.cli import _pipeline_from_words\n"
        "_pipeline_from_words(['apollo', 'hi'])\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"a one-shot aish imports {done.stdout.strip()}"


# What the light one-shot path (aish_client/oneshot.py) must never load: each costs more than its budget.
LIGHT_PATH_NEVER = ("pydantic", "structlog", "asyncio", "anyio", "nats", "prompt_toolkit", "rich", "aiohttp")


@pytest.mark.fast
def test_the_light_one_shot_path_imports_no_pydantic_structlog_asyncio_or_nats() -> None:
    """Every module the light path loads (its own, and those it imports when it asks) stays light.
    tests/test_oneshot.py checks the same on a real `aish apollo hi` with `python -X importtime`."""
    code = (
        "import sys\n"
        "from aish_client import oneshot\n"
        "import aish_client.logbook, aish_client.render\n"
        "import bus.auth, bus.errors, bus.frames, bus.lite, bus.subjects\n"
        "assert oneshot.plan(['apollo', 'hi', '--json']) is not None\n"
        "assert oneshot.load(None) is not None\n"
        f"print(','.join(m for m in {LIGHT_PATH_NEVER!r} if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEKTON_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "TEKTON_CONFIG": "/nonexistent"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the light path imports {done.stdout.strip()}"


async def test_nats_over_websocket_still_works_after_aish_kept_aiohttp_out(tmp_path: Path) -> None:
    """aish imports nats without aiohttp; connecting to a ws:// URL brings it in."""
    code = (
        "import aish_client.lean_imports, sys, anyio\n"
        "from bus.client import connect\n"
        "assert 'aiohttp' not in sys.modules\n"
        "async def main():\n"
        "    nc = await connect(sys.argv[1])\n"
        "    await nc.flush()\n"
        "    await nc.close()\n"
        "anyio.run(main)\n"
        "print('ok')"
    )
    with EmbeddedNats(tmp_path / "store", port=0, websocket_port=0) as server:
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-c", code, server.ws_url], capture_output=True, text=True, timeout=120
            )
        )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


async def test_requests_over_the_slots_wait_for_one_and_every_slot_comes_back(
    settings: TektonSettings,
) -> None:
    one_slot = settings.model_copy(update={"max_concurrency": 1})
    async with in_process_specialists(one_slot, "apollo") as services, Bus.connect(one_slot) as bus:
        texts: list[str] = []

        async def ask(i: int) -> None:
            texts.append((await bus.ask("apollo", f"q{i}")).text)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(ask, i)
        assert sorted(texts) == [f"apollo heard: q{i}" for i in range(5)]
        assert services["apollo"]._slots.value == 1  # every slot given back


async def test_a_request_task_serves_the_next_request_even_after_a_stopped_one(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests go to a request task that finished its last one (SpecialistService._dispatch): one
    task answers request after request, a request stopped by its deadline leaves its task serving,
    and the idle tasks end with the service (the task group exits, nothing left behind)."""
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "20")
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "200")
    async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
        service = services["apollo"]
        with pytest.raises(DeadlineExceeded):
            async with bus.stream("apollo", [ChatMessage(role="user", content="x")], timeout=0.3) as s:
                async for _ in s:
                    pass
        assert len(service._idle_workers) == 1  # the stopped request's task, back for the next one
        for i in range(4):
            with anyio.fail_after(30):
                answer = await bus.ask("apollo", f"q{i}", ChatOptions(max_tokens=3))
            assert answer.text == f"apollo heard: q{i}"
        assert len(service._idle_workers) == 1, "each request took a new task"
        assert service.counters.errors == 1 and service.counters.served == 4


async def test_the_rosters_options_apply_with_and_without_the_requests_own(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request with no options gets the roster's (built once: SpecialistService._prompt), one with
    some gets both, its own first."""
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "300")  # more than the roster's max_tokens (256)
    async with in_process_specialists(settings, "apollo"):
        nc = await nats.connect(settings.nats_url)

        async def done_frame(options: dict[str, Any] | None) -> dict[str, Any]:
            body: dict[str, Any] = {
                "v": 1,
                "id": uuid.uuid4().hex,
                "messages": [{"role": "user", "content": "x"}],
            }
            if options is not None:
                body["options"] = options
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("tekton.ai.apollo.chat", msgpack.packb(body), reply=inbox)
            while True:
                frame = msgpack.unpackb((await sub.next_msg(timeout=30)).data)
                if frame["type"] in ("done", "error"):
                    await sub.unsubscribe()
                    return frame

        for options, tokens in ((None, 256), ({"temperature": 0.1}, 256), ({"max_tokens": 3}, 3)):
            frame = await done_frame(options)
            assert frame["type"] == "done", frame
            assert (frame["usage"]["completion_tokens"], frame["finish_reason"]) == (tokens, "length")
        await nc.close()
