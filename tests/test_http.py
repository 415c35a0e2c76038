"""The HTTP bridge on a real nats-server: JSON, SSE, JSON-RPC over WebSocket, the OpenAI API, tokens."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx
import openai
import pytest

from bridge import edge, rest
from bridge import openai as bridge_openai
from bridge.app import create_app
from bridge.edge import send_events
from bridge.listen import http_server, http_socket
from bus.errors import BadRequest
from bus.settings import TektonSettings
from gateway.runtime import serve_gateway
from gateway.service import GatewayService
from tests.helpers import assert_kept_alive, env, eventually, in_process_gateway, in_process_specialists

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def bridge(settings: TektonSettings) -> AsyncIterator[str]:
    """A gateway with its HTTP bridge on a free port, in this event loop; yields the base URL."""
    stop = anyio.Event()
    urls: list[str] = []
    async with anyio.create_task_group() as tg:
        _: GatewayService = await tg.start(
            lambda task_status: serve_gateway(
                settings, stop=stop, task_status=task_status, http=("127.0.0.1", 0), on_http=urls.append
            )
        )
        try:
            yield urls[0]
        finally:
            stop.set()


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def sse_path(monkeypatch: pytest.MonkeyPatch, path: str) -> list[str]:
    """Send the bridge's hot routes (POST /api/chat/stream, a streamed /v1/chat/completions) down
    ``path``: their plain ASGI handlers (edge.PlainRoutes), or FastAPI's routes, where the plain ones
    decline every request. Returns a list that gets the plain handlers' every answer: "events" (a
    stream) or the status of an error they sent."""
    answered: list[str] = []
    send_events = edge.send_events
    bus_error, invalid = edge.bus_error_response, edge.validation_error_response

    async def plain_events(*args: Any) -> None:
        answered.append("events")
        await send_events(*args)

    def plain_error(make: Any) -> Any:
        def error(err: Any) -> Any:
            reply = make(err)
            answered.append(str(reply.status_code))
            return reply

        return error

    if path == "FastAPI":
        monkeypatch.setattr(rest, "json_body", lambda *_: None)
        monkeypatch.setattr(bridge_openai, "json_body", lambda *_: None)
    # (only edge.serve_events answers through these names: FastAPI's handlers have their own)
    monkeypatch.setattr(edge, "send_events", plain_events)
    monkeypatch.setattr(edge, "bus_error_response", plain_error(bus_error))
    monkeypatch.setattr(edge, "validation_error_response", plain_error(invalid))
    return answered


SSE_PATHS = ["plain ASGI", "FastAPI"]


async def test_json_sse_sessions_bulk_and_discovery(settings: TektonSettings) -> None:
    async with (
        bridge(settings) as url,
        in_process_specialists(settings, "apollo", "prometheus"),
        httpx.AsyncClient(base_url=url) as http,
    ):
        answer = (await http.post("/api/chat", json={"specialist": "apollo", "message": "hi"})).json()
        assert answer["text"] == "apollo heard: hi" and answer["specialist"] == "apollo"
        streamed = await http.post("/api/chat/stream", json={"specialist": "@planning", "message": "go"})
        events = sse_events(streamed.text)
        kinds = [e for e, _ in events]  # three tokens: the first alone, the rest in one or two events
        assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"content"}, kinds
        assert events[0][1]["specialist"] == "prometheus"
        assert "".join(d["text"] for e, d in events if e == "content") == "prometheus heard: go"
        missing = await http.post("/api/chat/stream", json={"specialist": "apolo", "message": "x"})
        assert missing.status_code == 404 and "did you mean 'apollo'" in missing.json()["error"]["message"]
        session = (await http.post("/api/sessions", json={"name": "web"})).json()
        await http.post("/api/chat", json={"specialist": "apollo", "message": "remember", "session": "web"})
        turns = (await http.get("/api/sessions/web")).json()["turns"]
        assert [t["content"] for t in turns] == ["remember", "apollo heard: remember"]
        assert (await http.get("/api/sessions/nope")).status_code == 404
        assert [s["id"] for s in (await http.get("/api/sessions")).json()["sessions"]] == [session["id"]]
        plan = {
            "operations": [
                {"id": "a", "ai": "apollo", "message": "x"},
                {"id": "b", "ai": "prometheus", "message": "{a}"},
            ]
        }
        bulk = sse_events((await http.post("/api/bulk", json=plan)).text)
        assert bulk[-1][0] == "bulk_done" and bulk[-1][1]["status"] == "ok"
        caps = (await http.get("/api/capabilities")).json()["specialists"]
        assert {c["name"] for c in caps} == {"apollo", "prometheus"}
        ranked = (await http.get("/api/discover", params={"capability": "planning"})).json()
        assert ranked["chosen"] == "prometheus"
        spec = (await http.get("/openapi.json")).json()
        assert {"/api/chat", "/api/chat/stream", "/v1/chat/completions", "/api/bulk"} <= set(spec["paths"])
        page = await http.get("/")
        assert page.status_code == 200 and "Tekton console" in page.text


@pytest.mark.parametrize("path", SSE_PATHS)
async def test_openai_client_library_talks_to_tekton(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    answered = sse_path(monkeypatch, path)
    async with bridge(settings) as url, in_process_specialists(settings, "athena", "penia"):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused-on-localhost", max_retries=0)
        async with client:
            models = [m.id for m in (await client.models.list()).data]
            assert "athena" in models and "@cost-analysis" in models
            done = await client.chat.completions.create(
                model="athena", messages=[{"role": "user", "content": "hello"}]
            )
            assert done.choices[0].message.content == "athena heard: hello"
            assert done.usage is not None and done.usage.completion_tokens == 3
            parts = []
            stream = await client.chat.completions.create(
                model="@cost-analysis",
                messages=[{"role": "user", "content": "budget?"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:  # the last chunk, asked for with include_usage
                    usage.append((chunk.choices, chunk.usage.completion_tokens))
            assert "".join(parts) == "penia heard: budget?"
            # Tokens, not chunks: a burst of tokens comes in one chunk.
            assert usage == [([], 3)]
            for stream_it in (False, True):
                with pytest.raises(openai.APIStatusError) as info:
                    await client.chat.completions.create(
                        model="nobody", messages=[{"role": "user", "content": "x"}], stream=stream_it
                    )
                assert info.value.status_code == 404
                assert "nobody" in info.value.message
    # The answers in one piece are FastAPI's on both paths; the streamed ones the plain handler's.
    assert answered == (["events", "404"] if path == "plain ASGI" else [])


async def rpc(
    ws: aiohttp.ClientWebSocketResponse, method: str, params: Any = None, rid: int = 1
) -> dict[str, Any]:
    await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}))
    while True:
        message = json.loads(await ws.receive_str())
        if message.get("id") == rid:
            return message


async def test_json_rpc_over_websocket(settings: TektonSettings) -> None:
    # No resume window: a run whose socket closed stops once the specialist finds nobody listening.
    settings = settings.model_copy(update={"run_resume_window_s": 0.0})
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20", TEKTON_SCRIPTED_TOKENS="1000"):
        slow = in_process_specialists(settings, "athena")
        async with bridge(settings) as url, slow as services, aiohttp.ClientSession() as http:
            ws_url = url.replace("http", "ws") + "/ws"
            async with http.ws_connect(ws_url) as ws:
                await ws.send_str("{not json")
                assert json.loads(await ws.receive_str())["error"]["code"] == -32700
                assert (await rpc(ws, "no.such"))["error"]["code"] == -32601
                assert (await rpc(ws, "stream", {"message": "no specialist"}))["error"]["code"] == -32602
                assert (await rpc(ws, "sessions.get", {"session": "nope"}))["error"]["code"] == -32000
                assert (await rpc(ws, "chat", {"specialist": "apolo", "message": "x"}))["error"][
                    "code"
                ] == -32001
                started = (await rpc(ws, "stream", {"specialist": "athena", "message": "long"}))["result"]
                chunks = 0
                while chunks < 3:
                    note = json.loads(await ws.receive_str())
                    if note.get("method") == "stream.chunk":
                        assert note["params"]["request_id"] == started["request_id"]
                        chunks += 1
                assert "result" in await rpc(ws, "cancel", {"request_id": started["request_id"]}, rid=2)
                while True:
                    note = json.loads(await ws.receive_str())
                    if note.get("method") == "stream.complete":
                        assert note["params"]["cancelled"] is True
                        break

                def cancelled(n: int) -> bool:
                    return (
                        services["athena"].counters.cancelled == n
                        and services["athena"].counters.in_flight == 0
                    )

                await eventually(lambda: cancelled(1))
                # A client that disconnects mid-stream: its run stops on the specialist too.
                await rpc(ws, "stream", {"specialist": "athena", "message": "again"}, rid=3)
                await eventually(lambda: services["athena"].counters.in_flight == 1)
            await eventually(lambda: cancelled(2))


async def test_tokens_origins_and_rate_limits(settings: TektonSettings) -> None:
    with pytest.raises(BadRequest, match="needs API tokens"):
        create_app(settings, host="0.0.0.0")
    guarded = settings.model_copy(
        update={
            "http_tokens": ["s3cret"],
            "http_rate_per_s": 1.0,
            "http_burst": 2.0,
            "http_allowed_origins": ["http://console.example"],
        }
    )
    async with (
        bridge(guarded) as url,
        in_process_specialists(guarded, "apollo"),
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await http.get("/api/capabilities")).status_code == 401
        assert (
            await http.get("/api/capabilities", headers={"Authorization": "Bearer wrong"})
        ).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert (await http.get("/api/capabilities", headers=ok)).status_code == 200
        assert (await http.get("/api/capabilities", headers=ok)).status_code == 200
        limited = await http.get("/api/capabilities", headers=ok)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        async with aiohttp.ClientSession() as session:
            ws_url = url.replace("http", "ws") + "/ws?token=s3cret"
            for refused_url, headers in [
                (ws_url, {"Origin": "http://evil.example"}),  # a page from elsewhere
                (url.replace("http", "ws") + "/ws", {}),  # no token
            ]:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(refused_url, headers=headers)
                assert refused.value.status == 403
            async with session.ws_connect(ws_url, headers={"Origin": "http://console.example"}) as ws:
                # Let in (the origin is allowed), and still under the same token's rate limit.
                reply = await rpc(ws, "discover")
                assert reply["error"]["message"] == "rate limited" and reply["error"]["data"]["retry_after"]
            # Guessing tokens at the handshake: refused (403), then slowed down (429, Retry-After).
            statuses = []
            for _ in range(8):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(url.replace("http", "ws") + "/ws?token=guess")
                statuses.append(refused.value.status)
            assert statuses[0] == 403 and statuses[-1] == 429, statuses


async def test_a_thousand_websocket_clients_at_once(settings: TektonSettings) -> None:
    roomy = settings.model_copy(update={"http_rate_per_s": 10_000.0, "http_burst": 10_000.0})
    async with (
        bridge(roomy) as url,
        in_process_specialists(roomy, "apollo"),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        ws_url = url.replace("http", "ws") + "/ws"

        async def known() -> bool:
            async with http.get(f"{url}/api/capabilities") as reply:
                return bool((await reply.json())["specialists"])

        await eventually(known)
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        try:
            async with anyio.create_task_group() as tg:

                async def connect() -> None:
                    sockets.append(await http.ws_connect(ws_url))

                for _ in range(1000):
                    tg.start_soon(connect)
            answers: list[dict[str, Any]] = []
            async with anyio.create_task_group() as tg:

                async def ask(ws: aiohttp.ClientWebSocketResponse) -> None:
                    answers.append(await rpc(ws, "discover"))

                for ws in sockets:
                    tg.start_soon(ask, ws)
        finally:
            for ws in sockets:
                await ws.close()
    assert len(sockets) == 1000
    assert len(answers) == 1000 and all(a["result"]["specialists"][0]["name"] == "apollo" for a in answers)


async def test_schemathesis_finds_no_server_error(settings: TektonSettings) -> None:
    """Property-based requests generated from the OpenAPI document: never a 5xx."""
    st = Path(sys.executable).with_name("st")
    async with bridge(settings) as url, in_process_specialists(settings, "apollo", "athena"):
        argv = [
            str(st),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "20",
            "--seed",
            "20261124",
        ]
        done = await anyio.run_process(argv, check=False)
    report = done.stdout.decode(errors="replace")
    assert done.returncode == 0, report[-3000:]
    assert " passed" in report


def chat_request(route: str, target: str, message: str | None, **extra: Any) -> dict[str, Any]:
    """A streamed chat request's body for ``route``: Tekton's own or the OpenAI API's."""
    if route == "/api/chat/stream":
        return {"specialist": target, **({"message": message} if message is not None else {}), **extra}
    return {"model": target, "messages": [{"role": "user", "content": message}], "stream": True, **extra}


def streamed_text(route: str, reply: httpx.Response) -> str:
    """The answer's text from a streamed reply, checking the stream's shape on the way."""
    if route == "/api/chat/stream":
        events = sse_events(reply.text)
        kinds = [e for e, _ in events]
        assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"content"}, kinds
        assert set(events[0][1]) == {"specialist", "request_id"}
        assert set(events[-1][1]) == {"usage", "timings"}
        return "".join(d["text"] for e, d in events if e == "content")
    lines = [line.removeprefix("data: ") for line in reply.text.strip().split("\n\n")]
    assert lines[-1] == "[DONE]", lines
    chunks = [json.loads(line) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


@pytest.mark.parametrize("route", ["/api/chat/stream", "/v1/chat/completions"])
async def test_the_streamed_chat_routes_answer_alike_down_both_paths(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """The plain ASGI handler answers as FastAPI's route does: the same status line and events, the
    same errors, the same API tokens and rate limits."""
    # A token per path, four requests each before its rate limit (bursts of four, then one in 100 s).
    tokens = {"plain ASGI": "tok-plain", "FastAPI": "tok-fastapi"}
    guarded = settings.model_copy(
        update={"http_tokens": [*tokens.values(), "tok-declined"], "http_rate_per_s": 0.01, "http_burst": 4.0}
    )
    async with (
        bridge(guarded) as url,
        in_process_specialists(guarded, "apollo"),
        httpx.AsyncClient(base_url=url) as http,
    ):
        replies: dict[str, list[httpx.Response]] = {}
        hi = chat_request(route, "apollo", "hi")
        for path in SSE_PATHS:
            auth = {"Authorization": f"Bearer {tokens[path]}"}
            with monkeypatch.context() as patch:
                answered = sse_path(patch, path)
                replies[path] = [
                    await http.post(route, json=body, headers=headers)
                    for body, headers in (
                        (hi, auth),
                        (chat_request(route, "apolo", "x"), auth),  # no such specialist
                        (chat_request(route, "@nothing-does-this", "x"), auth),  # no such capability
                        (hi, {"Authorization": "Bearer guess"}),
                        (hi, auth),
                        (hi, auth),  # over the rate limit
                    )
                ]
            plain = ["events", "404", "400", "401", "events", "429"]
            assert answered == (plain if path == "plain ASGI" else []), (path, answered)
        fast, framework = replies["plain ASGI"], replies["FastAPI"]
        assert [r.status_code for r in fast] == [200, 404, 400, 401, 200, 429]
        for a, b in zip(fast, framework, strict=True):
            assert a.status_code == b.status_code
            assert a.headers.get("retry-after") == b.headers.get("retry-after")
            assert [(k, v) for k, v in a.headers.items() if k in ("content-type", "cache-control")] == [
                (k, v) for k, v in b.headers.items() if k in ("content-type", "cache-control")
            ]
        assert streamed_text(route, fast[0]) == streamed_text(route, framework[0]) == "apollo heard: hi"
        for a, b in zip(fast[1:4] + fast[5:], framework[1:4] + framework[5:], strict=True):
            assert a.json() == b.json(), a.text
        # What the plain handler declines goes on to FastAPI's route, which answers it as it always did.
        with monkeypatch.context() as patch:
            answered = sse_path(patch, "plain ASGI")
            auth = {"Authorization": "Bearer tok-declined"}
            hot: dict[str, Any] = (
                {"options": {"temperature": "hot"}} if route == "/api/chat/stream" else {"temperature": "hot"}
            )
            for body, content_type in (
                (json.dumps(hi).encode(), "text/plain"),
                (json.dumps(chat_request(route, "apollo", "x", **hot)).encode(), "application/json"),
                (b'{"specialist": ', "application/json"),
            ):
                headers = {"content-type": content_type, **auth}
                reply = await http.post(route, content=body, headers=headers)
                assert reply.status_code == 422 and reply.json()["error"]["code"] == "bad_request", reply.text
            assert answered == []


@pytest.mark.parametrize("path", SSE_PATHS)
async def test_an_sse_client_that_leaves_mid_answer_stops_the_specialist(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    answered = sse_path(monkeypatch, path)
    # Without a resume window: the run stops as soon as the specialist finds nobody listening.
    settings = settings.model_copy(update={"run_resume_window_s": 0.0})
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20", TEKTON_SCRIPTED_TOKENS="1000"):
        async with (
            bridge(settings) as url,
            in_process_specialists(settings, "athena") as services,
            httpx.AsyncClient(base_url=url) as http,
        ):
            body = {"specialist": "athena", "message": "long"}
            async with http.stream("POST", "/api/chat/stream", json=body) as reply:
                contents = 0
                async for line in reply.aiter_lines():
                    contents += line == "event: content"
                    if contents == 3:
                        break  # leaving the block closes the connection

            def stopped() -> bool:
                athena = services["athena"].counters
                return athena.cancelled == 1 and athena.in_flight == 0

            await eventually(stopped)
            assert answered == (["events"] if path == "plain ASGI" else [])


@pytest.mark.fast
async def test_foreign_origins_and_hosts_are_refused_by_default(settings: TektonSettings) -> None:
    """Any web page the user has open could reach a loopback bridge: only its own pages and loopback
    ones may, and a Host that is not a loopback name (DNS rebinding) is refused."""
    async with bridge(settings) as url, aiohttp.ClientSession() as session:
        ws_url = url.replace("http", "ws") + "/ws"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url, headers={"Origin": "https://evil.example"})
        assert refused.value.status == 403
        for origin in (url, "http://localhost:5173"):  # the console itself; a local dev page
            async with session.ws_connect(ws_url, headers={"Origin": origin}) as ws:
                assert "result" in await rpc(ws, "sessions.list")
        port = url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=url) as http:
            foreign = await http.get("/api/sessions", headers={"Origin": "https://evil.example"})
            assert foreign.status_code == 403 and "evil.example" in foreign.json()["error"]["message"]
            rebound = await http.get("/api/sessions", headers={"Host": f"evil.example:{port}"})
            assert rebound.status_code == 403 and "host" in rebound.json()["error"]["message"]
            assert (await http.get("/api/sessions", headers={"Host": f"localhost:{port}"})).status_code == 200
            assert (await http.get("/api/sessions", headers={"Origin": url})).status_code == 200


@pytest.mark.fast
async def test_request_bodies_are_bounded_and_never_echoed(settings: TektonSettings) -> None:
    small = settings.model_copy(update={"http_max_body_bytes": 64 * 1024})
    async with bridge(small) as url, httpx.AsyncClient(base_url=url) as http:
        declared = await http.post(
            "/api/sessions", content=b"x" * 100_000, headers={"Content-Type": "application/json"}
        )

        async def undeclared_body() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"y" * 1024

        chunked = await http.post(
            "/api/sessions", content=undeclared_body(), headers={"Content-Type": "application/json"}
        )
        for refused in (declared, chunked):
            assert refused.status_code == 413
            assert refused.json()["error"]["code"] == "payload_too_large"
            assert len(refused.content) < 300 and "\n" not in refused.text
        invalid = await http.post("/api/sessions", json={"context_window": "z" * 50_000})
        assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "bad_request"
        assert "zzzz" not in invalid.text and len(invalid.content) < 2_000
        assert (await http.get("/api/sessions")).status_code == 200


async def test_the_bridge_connects_again_when_nats_py_closed_its_connection(settings: TektonSettings) -> None:
    ready = anyio.Event()
    app = create_app(settings, ready=ready)
    sock = http_socket("127.0.0.1", 0)
    server = http_server(app, shutdown_s=5)
    async with in_process_gateway(settings), anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        await ready.wait()
        host, port = sock.getsockname()[:2]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
            assert (await http.get("/api/sessions")).status_code == 200
            await app.state.bus().nc.close()  # what nats-py does after a server's -ERR

            async def serving() -> bool:
                return (await http.get("/api/sessions")).status_code == 200

            await eventually(serving, within=20)
        server.should_exit = True


async def test_an_idle_kept_alive_connection_outlives_the_clients_pool(settings: TektonSettings) -> None:
    """HTTP clients keep idle connections in a pool and reuse them (aiohttp for 15 s). A bridge that
    closed them sooner (uvicorn's 5 s) raced every client reusing one after a pause: at 100 concurrent
    SSE streams some got "connection reset" or "server disconnected". A connection idle for longer
    than uvicorn's default still answers here."""
    async with bridge(settings) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        await assert_kept_alive(int(port), f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), status=b"200")


@pytest.mark.fast
async def test_a_client_leaving_while_the_stream_closes_does_not_cut_the_close_short() -> None:
    """The SSE route stops on the client's "disconnect" through an anyio cancel scope, which the bus
    stream's shielded close holds off (a plain asyncio cancel of the task went through the shield)."""
    gone = anyio.Event()
    closes: list[str] = []

    class Stream:  # what send_events needs of a ChatStream: a run id and a shielded close
        run_id = None

        async def __aexit__(self, *exc: object) -> None:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.05)  # (a cancel frame and its flush, say)
                closes.append("closed")

    stream = Stream()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    async def events() -> AsyncIterator[str]:
        yield "event: content\ndata: {}\n\n"
        gone.set()  # the client leaves while the stream is being closed
        await stream.__aexit__(None, None, None)
        await anyio.sleep(10)  # (the response is stopped here, once the close is done)
        yield "event: done\ndata: {}\n\n"

    with anyio.fail_after(5):
        await send_events(receive, send, events(), stream)  # type: ignore[arg-type]
    assert closes == ["closed", "closed"]  # (closing twice is harmless: see close_opened)
    assert sent == [b"", b"event: content\ndata: {}\n\n"]  # the response's start, then one event
