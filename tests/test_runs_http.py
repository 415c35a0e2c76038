"""Runs through the HTTP bridge: SSE reconnect with Last-Event-ID, JSON-RPC stream.resume after the
WebSocket dropped. Real nats-server, gateway + bridge and scripted specialist in this process."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import httpx
import pytest

from bus.settings import TektonSettings
from tests.helpers import env, in_process_specialists
from tests.test_http import bridge, rpc

pytestmark = [pytest.mark.anyio, pytest.mark.fast]

WORDS = [f"w{i}" for i in range(30)]
TOKENS = ["apollo ", "heard: ", *(w + " " for w in WORDS[:-1]), WORDS[-1]]
SLOW = env(TEKTON_SCRIPTED_TOKENS_PER_S="40")


def parse(block: str) -> dict[str, Any]:
    fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
    return {"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])}


async def read_events(reply: httpx.Response, stop_after_contents: int | None = None) -> list[dict[str, Any]]:
    events, buffer = [], ""
    async for text in reply.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            events.append(parse(block))
            contents = sum(e["event"] == "content" for e in events)
            if stop_after_contents is not None and contents == stop_after_contents:
                return events
    return events


async def test_sse_reconnect_with_last_event_id(settings: TektonSettings) -> None:
    with SLOW:
        async with (
            bridge(settings) as url,
            in_process_specialists(settings, "apollo"),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            body = {"specialist": "apollo", "message": " ".join(WORDS)}
            async with http.stream("POST", "/api/chat/stream", json=body) as reply:
                before = await read_events(reply, stop_after_contents=5)
            # The connection is gone; the run goes on. Reconnect where the last event left off.
            run_id = before[0]["data"]["request_id"]
            last = before[-1]["id"]
            headers = {"Last-Event-ID": last}
            async with http.stream("GET", f"/api/runs/{run_id}/events", headers=headers) as reply:
                assert reply.status_code == 200
                after = await read_events(reply)
            bad = await http.get(f"/api/runs/{run_id}/events", headers={"Last-Event-ID": "x"})
            missing = await http.get("/api/runs/nosuchrun/events")
    contents = [e for e in before + after if e["event"] == "content"]
    # Every word once, in order (a burst of tokens may come in one event).
    assert "".join(e["data"]["text"] for e in contents) == "".join(TOKENS)
    ids = [int(e["id"]) for e in contents]
    assert ids == sorted(set(ids))  # each event once, in order
    assert after[-1]["event"] == "done"
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]["message"]
    assert missing.status_code == 404 and "no run 'nosuchrun'" in missing.json()["error"]["message"]


async def test_json_rpc_stream_resume_after_the_socket_dropped(settings: TektonSettings) -> None:
    with SLOW:
        async with (
            bridge(settings) as url,
            in_process_specialists(settings, "apollo"),
            aiohttp.ClientSession() as http,
        ):
            ws_url = url.replace("http", "ws") + "/ws"
            texts: list[str] = []
            async with http.ws_connect(ws_url) as ws:
                started = (await rpc(ws, "stream", {"specialist": "apollo", "message": " ".join(WORDS)}))[
                    "result"
                ]
                last = -1
                while len(texts) < 4:
                    note = json.loads(await ws.receive_str())
                    if note.get("method") == "stream.chunk":
                        texts.append(note["params"]["text"])
                        last = note["params"]["seq"]
            async with http.ws_connect(ws_url) as ws:
                params = {"request_id": started["request_id"], "after": last}
                request = {"jsonrpc": "2.0", "id": 1, "method": "stream.resume", "params": params}
                await ws.send_str(json.dumps(request))
                while True:  # the first chunks may come before the reply: the stream starts at once
                    note = json.loads(await ws.receive_str())
                    if note.get("id") == 1:
                        assert "result" in note, note
                    elif note.get("method") == "stream.chunk":
                        texts.append(note["params"]["text"])
                    elif note.get("method") == "stream.complete":
                        assert "error" not in note["params"], note
                        # Tokens counted by the specialist (a chunk may carry several).
                        assert note["params"]["usage"]["completion_tokens"] == len(TOKENS), note
                        break
                bad = await rpc(ws, "stream.resume", {"request_id": "a.b", "after": 0}, rid=2)
    assert "".join(texts) == "".join(TOKENS)
    assert bad["error"]["code"] == -32602
