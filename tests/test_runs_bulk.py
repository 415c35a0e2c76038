"""Bulk requests are durable runs too: their events are kept in the runs stream, so a client that lost
some (a dropped connection, a killed process) reads them back after the last ``seq`` it saw, and
``aish attach``, SSE ``Last-Event-ID`` and JSON-RPC ``stream.resume`` follow a bulk run like a chat.

Real nats-server, gateway (and bridge) and scripted specialists; the killed client is a real process.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from typing import Annotated, Any

import aiohttp
import anyio
import httpx
import pytest
from pydantic import Field, TypeAdapter

from bus.bulk import BulkEvent, BulkOperation, BulkPlan, OpChunk
from bus.client import Bus
from bus.settings import TektonSettings
from tests.helpers import (
    child_env,
    env,
    eventually,
    in_process_gateway,
    in_process_specialists,
    run_aish,
    spawn,
)
from tests.test_http import bridge, rpc
from tests.test_runs_http import read_events

pytestmark = pytest.mark.anyio

SLOW = env(TEKTON_SCRIPTED_TOKENS_PER_S="40")
A = " ".join(f"a{i}" for i in range(20))
B = " ".join(f"b{i}" for i in range(20))
PLAN = BulkPlan(
    operations=[
        BulkOperation(id="one", ai="apollo", message=A),
        BulkOperation(id="two", ai="apollo", message=B),
    ]
)
# What the scripted apollo answers, whole.
ANSWERS = {"one": f"apollo heard: {A}", "two": f"apollo heard: {B}"}


_EVENT: TypeAdapter[BulkEvent] = TypeAdapter(Annotated[BulkEvent, Field(discriminator="type")])


def as_event(data: dict[str, Any]) -> BulkEvent:
    return _EVENT.validate_python(data)


def check_whole(events: list[BulkEvent]) -> None:
    """Every event exactly once, in order, ending with bulk_done; each operation's whole answer."""
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].type == "bulk_done" and events[-1].status == "ok"
    outputs: dict[str, str] = {}
    for e in events:
        if isinstance(e, OpChunk):
            outputs[e.op] = outputs.get(e.op, "") + e.text
    assert outputs == ANSWERS


CLIENT = textwrap.dedent(
    """
    import sys, anyio
    from bus.bulk import BulkPlan
    from bus.client import Bus
    from bus.settings import load_settings

    async def main():
        async with Bus.connect(load_settings()) as bus:
            async with bus.bulk(BulkPlan.model_validate_json(sys.argv[1])) as b:
                print("RUN", b.run_id, flush=True)
                async for event in b:
                    print("EVENT", event.model_dump_json(), flush=True)

    anyio.run(main)
    """
)


async def test_a_killed_bulk_client_resumes_with_every_event_once(settings: TektonSettings) -> None:
    with SLOW:
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
        ):
            child = spawn([sys.executable, "-c", CLIENT, PLAN.model_dump_json()], child_env(settings))
            try:
                run_id = (
                    await anyio.to_thread.run_sync(child.wait_for, lambda ln: ln.startswith("RUN"))
                ).split()[1]
                await anyio.to_thread.run_sync(child.wait_for, lambda ln: '"seq":10,' in ln)
            finally:
                child.stop(signal.SIGKILL)
            before = [json.loads(line.split(" ", 1)[1]) for line in child.seen if line.startswith("EVENT")]
            assert await bus.run_kind(run_id) == "bulk"
            async with bus.attach_bulk(run_id, after=before[-1]["seq"]) as a:
                after = [e async for e in a]
            listed = {r.run_id: (r.specialist, r.state) for r in await bus.runs()}
    whole = [as_event(e) for e in before] + after
    check_whole(whole)
    assert len(before) >= 11
    assert listed[run_id] == ("bulk", "done")


@pytest.mark.fast
async def test_bulk_events_lost_on_the_live_path_are_read_back(settings: TektonSettings) -> None:
    with SLOW:
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
        ):
            resumed: list[int] = []
            events: list[BulkEvent] = []
            async with bus.bulk(PLAN, idle_timeout=1.0) as b:
                b.on_resume = resumed.append
                async for event in b:
                    events.append(event)
                    if len(events) == 6:
                        # As a dropped connection would: events published meanwhile reach only the run.
                        assert b.run_subject is not None
                        await bus._run_subs[b.run_subject].unsubscribe()
    check_whole(events)
    assert resumed == [6]


async def test_aish_attach_follows_a_bulk_run(settings: TektonSettings) -> None:
    with SLOW:
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
        ):
            async with bus.bulk(PLAN) as b:
                async for event in b:
                    if event.seq == 4:
                        b.leave()  # gone without a cancel: the bulk run goes on
                        break
            attached = await run_aish(settings, "attach", b.id)
            listed = await run_aish(settings, "runs")
    assert attached.returncode == 0, attached.stderr
    lines = attached.stdout.splitlines()
    assert f"one │ {ANSWERS['one']}" in lines and f"two │ {ANSWERS['two']}" in lines
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(b.id))
    assert line.split()[1:3] == ["bulk", "done"]


def _sse_bulk(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": e["event"], **{k: v for k, v in e["data"].items() if k != "id"}} for e in events]


@pytest.mark.fast
async def test_sse_bulk_reconnect_with_last_event_id(settings: TektonSettings) -> None:
    with SLOW:
        async with (
            bridge(settings) as url,
            in_process_specialists(settings, "apollo"),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            plan = PLAN.model_dump(exclude_defaults=True)
            before: list[dict[str, Any]] = []
            async with http.stream("POST", "/api/bulk", json=plan) as reply:
                buffer = ""
                async for text in reply.aiter_text():
                    buffer += text
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        before.append(_parse(block))
                    if len(before) >= 8:
                        break
            run_id, last = before[0]["data"]["id"], before[-1]["id"]
            headers = {"Last-Event-ID": last}
            async with http.stream("GET", f"/api/runs/{run_id}/events", headers=headers) as reply:
                assert reply.status_code == 200
                after = await read_events(reply)
            # Reconnecting after bulk_done (an EventSource does): 204 at once, nothing more to come.
            started = time.monotonic()
            again = await http.get(f"/api/runs/{run_id}/events", headers={"Last-Event-ID": after[-1]["id"]})
            assert again.status_code == 204 and time.monotonic() - started < 3
    whole = [as_event(e) for e in _sse_bulk(before + after)]
    check_whole(whole)
    assert [int(e["id"]) for e in before + after] == [e.seq for e in whole]


def _parse(block: str) -> dict[str, Any]:
    fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
    return {"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])}


@pytest.mark.fast
async def test_json_rpc_stream_resume_of_a_bulk_run(settings: TektonSettings) -> None:
    with SLOW:
        async with (
            bridge(settings) as url,
            in_process_specialists(settings, "apollo"),
            aiohttp.ClientSession() as http,
        ):
            ws_url = url.replace("http", "ws") + "/ws"
            seen: list[dict[str, Any]] = []
            async with http.ws_connect(ws_url) as ws:
                started = (await rpc(ws, "bulk", PLAN.model_dump(exclude_defaults=True)))["result"]
                while len(seen) < 7:
                    note = json.loads(await ws.receive_str())
                    if note.get("method") == "bulk.event":
                        seen.append(note["params"])
            async with http.ws_connect(ws_url) as ws:
                params = {"request_id": started["id"], "after": seen[-1]["seq"]}
                request = {"jsonrpc": "2.0", "id": 1, "method": "stream.resume", "params": params}
                await ws.send_str(json.dumps(request))
                while True:  # events may come before the reply
                    note = json.loads(await ws.receive_str())
                    if note.get("id") == 1:
                        assert note["result"]["kind"] == "bulk", note
                    elif note.get("method") == "bulk.event":
                        seen.append(note["params"])
                        if note["params"]["type"] == "bulk_done":
                            break
    whole = [as_event({k: v for k, v in e.items() if k != "id"}) for e in seen]
    check_whole(whole)


@pytest.mark.fast
async def test_a_bulk_run_nobody_follows_stops_after_its_resume_window(settings: TektonSettings) -> None:
    settings = settings.model_copy(update={"run_resume_window_s": 0.5})
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20", TEKTON_SCRIPTED_TOKENS="1000"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo") as services,
            Bus.connect(settings) as bus,
        ):
            async with bus.bulk(PLAN) as b:
                async for event in b:
                    if isinstance(event, OpChunk):
                        b.leave()  # gone without a cancel, as a killed client
                        break
            await eventually(lambda: services["apollo"].counters.cancelled == 2, within=15)
            async with bus.attach_bulk(b.id) as a:
                done = await a.result()
    assert done.status == "cancelled"
    assert {r.status for r in done.operations} == {"cancelled"}
