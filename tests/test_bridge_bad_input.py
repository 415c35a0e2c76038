"""One bad request at the HTTP bridge's edges: a clear 4xx (or JSON-RPC error) in the bridge's error
body, never a 500 or a dropped connection, and the next request still served. Found by an adversarial
sweep of the bridge; each case failed before its fix."""

from __future__ import annotations

import gc
import json
import logging
import time
from functools import partial
from typing import Any

import aiohttp
import anyio
import httpx
import pytest

import bridge.edge
from bridge.a2a import rpc_problem
from bus.settings import TektonSettings
from tests.helpers import in_process_specialists
from tests.test_http import bridge as http_bridge
from tests.test_http import rpc

pytestmark = pytest.mark.anyio


async def raw_http(url: str, head: str, body: bytes = b"", wait: float = 10.0) -> tuple[int, dict[str, Any]]:
    """Send ``head`` (and ``body``) as they are, on a connection of their own that the server closes
    after its answer; the status and the JSON error body (none for a streamed body)."""
    host, port = url.removeprefix("http://").split(":")
    reply = b""
    async with await anyio.connect_tcp(host, int(port)) as conn:
        await conn.send(head.replace("\n", "\r\n").encode() + b"Connection: close\r\n\r\n" + body)
        with anyio.move_on_after(wait):
            try:
                while True:
                    reply += await conn.receive()
            except anyio.EndOfStream:
                pass
    headers, _, content = reply.partition(b"\r\n\r\n")
    status = int(headers.split(b" ", 2)[1])
    return status, json.loads(content) if b"content-length" in headers.lower() else {}


@pytest.mark.fast
async def test_malformed_host_and_origin_headers_are_refused_not_a_server_error(
    settings: TektonSettings,
) -> None:
    async with http_bridge(settings) as url:
        for header in ("Host: [::1", "Host: [zz]:1", "Origin: http://[zz", "Origin: http://[::1"):
            head = (
                f"GET /api/sessions HTTP/1.1\n{header}\n"
                if header.startswith("Host")
                else (f"GET /api/sessions HTTP/1.1\nHost: 127.0.0.1\n{header}\n")
            )
            status, body = await raw_http(url, head)
            assert status == 403 and body["error"]["code"] == "forbidden", (header, status, body)
        status, _ = await raw_http(url, "GET /api/sessions HTTP/1.1\nHost: 127.0.0.1\n")
        assert status == 200


@pytest.mark.fast
async def test_a_body_that_never_arrives_is_refused_in_time(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge.edge, "BODY_TIMEOUT_S", 0.5)
    async with http_bridge(settings) as url:
        head = (
            "POST /api/chat HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: 100\n"
        )
        started = time.monotonic()
        status, body = await raw_http(url, head, b"{")
        assert status == 408 and "did not arrive within 0.5 s" in body["error"]["message"]
        assert time.monotonic() - started < 5


@pytest.mark.fast
async def test_bad_values_and_unknown_routes_are_4xx_in_the_error_body(settings: TektonSettings) -> None:
    async with http_bridge(settings) as url, httpx.AsyncClient(base_url=url) as http:
        for reply, status, code in (
            (await http.get("/no/such/route"), 404, "not_found"),
            (await http.delete("/api/chat"), 405, "method_not_allowed"),
            (
                await http.post(
                    "/api/chat", content=b"\xff\xfe not json", headers={"content-type": "application/json"}
                ),
                400,
                "bad_request",
            ),
        ):
            assert reply.status_code == status, reply.text
            assert set(reply.json()) == {"error"} and reply.json()["error"]["code"] == code
        session = (await http.post("/api/sessions", json={"name": "forked"})).json()
        fork = await http.post(f"/api/sessions/{session['id']}/fork", json={"at": 2**64})
        assert fork.status_code == 422
        assert (await http.get("/api/runs/abc/events", params={"after": -5})).status_code == 422
        auto = await http.post("/api/chat", json={"specialist": "@auto", "message": "  "})
        assert auto.status_code == 400 and "it has none" in auto.json()["error"]["message"]
        assert (await http.get("/api/sessions")).status_code == 200


@pytest.mark.fast
async def test_json_rpc_survives_frames_that_are_not_requests(settings: TektonSettings) -> None:
    async with (
        in_process_specialists(settings, "apollo"),
        http_bridge(settings) as url,
        aiohttp.ClientSession() as session,
        session.ws_connect(url.replace("http", "ws") + "/ws") as ws,
    ):

        async def answer(raw: str | bytes) -> dict[str, Any]:
            await (ws.send_bytes(raw) if isinstance(raw, bytes) else ws.send_str(raw))
            return json.loads(await ws.receive_str())  # type: ignore[no-any-return]

        assert (await answer(b"\x00"))["error"]["code"] == -32700
        assert (await answer('{"jsonrpc":"2.0","id":1,"method":["x"]}'))["error"]["code"] == -32600
        assert (await answer('{"jsonrpc":"2.0","id":{"a":1},"method":"discover"}'))["error"]["code"] == -32600
        assert (await answer('{"jsonrpc":"2.0","id":true,"method":"discover"}'))["error"]["code"] == -32600
        assert (await answer("[" * 100_000 + "]" * 100_000))["error"]["code"] == -32700
        assert (await answer('{"jsonrpc":"2.0","id":NaN,"method":"discover"}'))["error"]["code"] == -32700
        assert (await answer('{"jsonrpc":"2.0","id":1e400,"method":"discover"}'))["error"]["code"] == -32600
        # A value a model's own validator refuses (its error carries the exception): a reply that
        # names the problem, not one that cannot be written (which ended the socket and its streams).
        op = {"id": "a", "ai": "apollo", "message": "hi", "model": "bad model!!", "session": "s" * 5000}
        bad = await rpc(ws, "bulk", {"operations": [op]}, rid=5)
        assert bad["error"]["code"] == -32602 and "s" * 200 not in json.dumps(bad)
        # A request as UTF-8 bytes is a request; and the socket still serves text ones.
        said = await answer(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "discover"}).encode())
        assert said["id"] == 7 and "result" in said
        chat = await rpc(ws, "chat", {"specialist": "apollo", "message": "still here?"}, rid=8)
        assert chat["result"]["text"] == "apollo heard: still here?"


@pytest.mark.fast
async def test_reconnecting_after_the_done_event_is_told_there_is_nothing_more(
    settings: TektonSettings,
) -> None:
    """An EventSource reconnects when the stream closes, with the done event's id: 204 stops it
    (it waited out the idle timeout and got a retryable error before). Also for a session's run,
    which ends with the gateway's "stored" note after its done frame."""
    async with (
        in_process_specialists(settings, "apollo"),
        http_bridge(settings) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        await http.post("/api/sessions", json={"name": "kept"})
        for body in (
            {"specialist": "apollo", "message": "hi"},
            {"specialist": "apollo", "message": "hi", "session": "kept"},
        ):
            # With other answers streaming at the same time: their frames are stored between a
            # session run's done frame and the gateway's "stored" note after it.
            async with anyio.create_task_group() as others:
                for i in range(4):
                    others.start_soon(
                        partial(http.post, "/api/chat", json={"specialist": "apollo", "message": f"x{i}"})
                    )
                streamed = await http.post("/api/chat/stream", json=body)
            blocks = [b for b in streamed.text.strip().split("\n\n")]
            done = next(b for b in blocks if "event: done" in b)
            done_id = int(done.split("id: ", 1)[1].split("\n", 1)[0])
            run = json.loads(blocks[0].split("data: ", 1)[1])["request_id"]
            started = time.monotonic()
            again = await http.get(f"/api/runs/{run}/events", headers={"Last-Event-ID": str(done_id)})
            assert again.status_code == 204 and time.monotonic() - started < 3, body
            # One before the done event: the done event again.
            before = await http.get(f"/api/runs/{run}/events", headers={"Last-Event-ID": str(done_id - 1)})
            assert before.status_code == 200 and "event: done" in before.text
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url.replace("http", "ws") + "/ws") as ws,
        ):
            resumed = await rpc(ws, "stream.resume", {"request_id": run, "after": done_id})
            assert resumed["result"]["ended_at"] == done_id


@pytest.mark.fast
async def test_a2a_requests_of_the_wrong_shape_are_one_line_errors_and_log_no_traceback(
    settings: TektonSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Each is a JSON-RPC error naming the problem (before, the SDK logged a traceback for each, and
    answered some as internal errors); a message to a task that has ended is refused and leaks no
    asyncio task (before, two per message: "Task was destroyed but it is pending")."""
    caplog.set_level(logging.ERROR)
    good = {"role": "user", "parts": [{"kind": "text", "text": "hi"}], "messageId": "m1"}

    def rpc_body(params: Any, method: str = "message/send", rid: Any = 1) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()

    bad = [
        b"\xff\xfe\xfd",
        b"[]",
        b"5",
        b"[" * 100_000,
        b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"message/send","params":{}}',
        rpc_body({"message": good}, rid=1.5),
        rpc_body([1, 2]),
        rpc_body({"message": {**good, "role": "agent"}}),
        rpc_body({"message": {**good, "parts": "hi"}}),
        rpc_body({"message": {**good, "parts": [{"kind": "text", "text": ""}]}}),
        rpc_body({"message": {**good, "contextId": 5}}),
        rpc_body({"message": {k: v for k, v in good.items() if k != "messageId"}}),
        rpc_body({"message": {**good, "parts": [{"kind": "file", "file": {"bytes": "!!!not base64"}}]}}),
        rpc_body({"id": 5}, "tasks/get"),
        rpc_body({"id": "t", "historyLength": 10**12}, "tasks/get"),
    ]
    async with (
        in_process_specialists(settings, "apollo"),
        http_bridge(settings) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        json_type = {"content-type": "application/json"}
        for body in bad:
            said = (await http.post("/a2a/apollo/", content=body, headers=json_type)).json()
            assert said["error"]["code"] in (-32700, -32600, -32602), (body[:80], said)
        task = (
            await http.post("/a2a/apollo/", content=rpc_body({"message": good}), headers=json_type)
        ).json()
        ended = {"taskId": task["result"]["id"], "contextId": task["result"]["contextId"]}
        for i in range(5):
            again = rpc_body({"message": {**good, **ended, "messageId": f"again-{i}"}})
            said = (await http.post("/a2a/apollo/", content=again, headers=json_type)).json()
            assert "ended" in said["error"]["message"], said
        gc.collect()  # a leaked task is said ("destroyed but it is pending") as it is collected
    logged = [f"{r.name}: {r.getMessage()[:120]}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged == []


@pytest.mark.fast
def test_a2a_requests_either_sdk_parser_takes_pass_the_shape_check() -> None:
    """The check refuses only what the SDK would fail on: names in either spelling, null for absent,
    bytes as each parser decodes them, numbers as strings, params left out."""
    text = {"kind": "text", "text": "hi"}
    taken = [
        {"method": "ListTasks"},
        {
            "method": "message/send",
            "params": {"message": {"role": "user", "parts": [text], "message_id": "m"}},
        },
        {
            "method": "message/send",
            "params": {
                "message": {
                    "role": "user",
                    "parts": [text],
                    "messageId": "m",
                    "taskId": None,
                    "contextId": None,
                }
            },
        },
        {
            "method": "SendMessage",
            "params": {
                "message": {"role": "ROLE_USER", "messageId": "m", "parts": [{"raw": "aGk"}, {"raw": "-_8="}]}
            },
        },
        {
            "method": "message/send",
            "params": {
                "message": {
                    "role": "user",
                    "messageId": "m",
                    "parts": [{"kind": "file", "file": {"bytes": "aGVs\nbG8="}}],
                }
            },
        },
        {"method": "tasks/get", "params": {"id": "t", "historyLength": "10"}},
        {"method": "GetTask", "params": {"id": "t", "history_length": 3}},
    ]
    for request in taken:
        assert rpc_problem(json.dumps({"jsonrpc": "2.0", "id": 1, **request}).encode()) is None, request
    role_true = {"role": True, "parts": [text], "messageId": "m"}
    refused = {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message": role_true}}
    assert rpc_problem(json.dumps(refused).encode()) is not None
