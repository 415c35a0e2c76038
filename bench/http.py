"""The HTTP bridge next to direct NATS, in one run: what the bridge costs a client that cannot speak NATS.

    python -m bench.http [--quick]

- first chunk p50/p99, sequential and at 100 concurrent streams, and tokens/s on one stream:
  direct NATS (`bus.stream`), SSE (`POST /api/chat/stream`), JSON-RPC over WebSocket (`stream`)
- WebSocket connect time to `/ws`
- how many concurrent WebSocket streams hold: N streams at once, each 40 tokens at 10 tokens/s;
  every stream must complete with every chunk, and the p99 gap between chunks is reported

The scripted specialist answers at 0 ms for the latency figures, so only the transport is measured.
Writes bench/results/http.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx

from bench.common import concurrent, free_port, start_child, summary, write_results
from bench.stream import bus_first_chunk
from bus.client import Bus
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage

FIRST = {"specialist": "apollo", "message": "hi"}
LONG = {"specialist": "athena", "message": "long"}


async def sse_first(http: httpx.AsyncClient) -> float:
    start = time.perf_counter()
    first: float | None = None
    async with http.stream("POST", "/api/chat/stream", json=FIRST) as reply:
        async for line in reply.aiter_lines():  # read to the end, as a client would
            if first is None and line == "event: content":
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no content event")
    return first


async def sse_rate(http: httpx.AsyncClient) -> float:
    """Tokens/s of one SSE stream, counted from its done event (an event may carry a burst)."""
    start, event, tokens = time.perf_counter(), "", None
    async with http.stream("POST", "/api/chat/stream", json=LONG) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif event == "done" and line.startswith("data: "):
                tokens = json.loads(line[len("data: ") :])["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("no done event")
    return tokens / (time.perf_counter() - start)


async def rpc_stream(
    ws: aiohttp.ClientWebSocketResponse, body: dict[str, Any], rid: int
) -> tuple[float, int, list[float]]:
    """(first chunk s, tokens, gaps between chunks) of one JSON-RPC stream (a burst of tokens shares a
    chunk: the tokens are the completion's count)."""
    start = time.perf_counter()
    await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rid, "method": "stream", "params": body}))
    first, chunks, gaps, last = 0.0, 0, [], 0.0
    while True:
        message = json.loads(await ws.receive_str())
        method = message.get("method")
        if method == "stream.chunk":
            now = time.perf_counter()
            if chunks == 0:
                first = now - start
            else:
                gaps.append(now - last)
            chunks, last = chunks + 1, now
        elif method == "stream.complete":
            if "error" in message["params"]:
                raise RuntimeError(message["params"]["error"])
            return first, message["params"]["usage"]["completion_tokens"], gaps


async def measure(settings: TektonSettings, url: str, quick: bool) -> dict[str, Any]:
    n, rounds = (50, 1) if quick else (300, 3)
    ws_url = url.replace("http", "ws") + "/ws"
    figures: dict[str, Any] = {}
    async with Bus.connect(settings) as bus:
        await bus_first_chunk(bus, "apollo")
        figures["nats_direct"] = {
            "first_chunk_sequential": summary([await bus_first_chunk(bus, "apollo") for _ in range(n)]),
            "first_chunk_100_concurrent": summary(
                await concurrent(lambda: bus_first_chunk(bus, "apollo"), 100, rounds)
            ),
        }
        rate_start = time.perf_counter()
        async with bus.stream("athena", [ChatMessage(role="user", content="long")]) as s:
            async for _ in s:
                pass
        assert s.tokens is not None
        figures["nats_direct"]["one_stream_tokens_per_s"] = round(
            s.tokens / (time.perf_counter() - rate_start)
        )
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        await sse_first(http)
        figures["sse"] = {
            "first_chunk_sequential": summary([await sse_first(http) for _ in range(n)]),
            "first_chunk_100_concurrent": summary(await concurrent(lambda: sse_first(http), 100, rounds)),
            "one_stream_tokens_per_s": round(await sse_rate(http)),
        }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        connects = []
        for _ in range(50):
            start = time.perf_counter()
            ws = await session.ws_connect(ws_url)
            connects.append(time.perf_counter() - start)
            await ws.close()
        async with session.ws_connect(ws_url) as ws:
            await rpc_stream(ws, FIRST, 0)
            sequential = [(await rpc_stream(ws, FIRST, i))[0] for i in range(1, n + 1)]
            started = time.perf_counter()
            _, tokens, _ = await rpc_stream(ws, LONG, n + 1)
            rate = tokens / (time.perf_counter() - started)
        sockets = [await session.ws_connect(ws_url) for _ in range(100)]
        try:
            wide: list[float] = []
            for r in range(rounds):
                async with anyio.create_task_group() as tg:

                    async def one(ws: aiohttp.ClientWebSocketResponse, rid: int) -> None:
                        wide.append((await rpc_stream(ws, FIRST, rid))[0])

                    for i, ws in enumerate(sockets):
                        tg.start_soon(one, ws, 10_000 + r * 1000 + i)
        finally:
            for ws in sockets:
                await ws.close()
        figures["websocket_json_rpc"] = {
            "connect": summary(connects),
            "first_chunk_sequential": summary(sequential),
            "first_chunk_100_concurrent": summary(wide),
            "one_stream_tokens_per_s": round(rate),
        }
    return figures


async def hold(url: str, width: int) -> dict[str, Any]:
    """``width`` WebSocket clients, each streaming 40 tokens at 10 tokens/s from the `hermes` replica."""
    ws_url = url.replace("http", "ws") + "/ws"
    results: list[tuple[float, int, list[float]]] = []
    failures = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = [await session.ws_connect(ws_url) for _ in range(width)]
        started = time.perf_counter()
        try:
            async with anyio.create_task_group() as tg:

                async def one(ws: aiohttp.ClientWebSocketResponse, i: int) -> None:
                    nonlocal failures
                    try:
                        results.append(await rpc_stream(ws, {"specialist": "hermes", "message": "hold"}, i))
                    except Exception:
                        failures += 1

                for i, ws in enumerate(sockets):
                    tg.start_soon(one, ws, i)
        finally:
            for ws in sockets:
                await ws.close()
    gaps = [g for _, _, gs in results for g in gs]
    return {
        "streams": width,
        "completed_with_every_token": sum(1 for _, c, _ in results if c == 40),
        "failed": failures,
        "chunk_gap": summary(gaps),
        "wall_s": round(time.perf_counter() - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    py = sys.executable
    quiet = ["--log-level", "warning"]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        settings = TektonSettings(nats_url=server.url, data_dir=Path(tmp))
        env = {
            "TEKTON_NATS_URL": server.url,
            "TEKTON_CONFIG": "/nonexistent",
            "TEKTON_MAX_CONCURRENCY": "4096",
            "TEKTON_HTTP_RATE_PER_S": "1000000",
            "TEKTON_HTTP_BURST": "1000000",
        }

        def specialist(name: str, **scripted: str) -> Any:
            argv = [py, "-m", "tekton", "specialist", name, "--provider", "scripted", *quiet]
            return start_child(argv, {**env, **scripted}, "ready")

        children = [
            start_child([py, "-m", "tekton", "gateway", "--http", str(port), *quiet], env, "ready"),
            specialist("apollo", TEKTON_SCRIPTED_TOKENS="8"),
            specialist("athena", TEKTON_SCRIPTED_TOKENS="20000" if args.quick else "100000"),
            specialist("hermes", TEKTON_SCRIPTED_TOKENS="40", TEKTON_SCRIPTED_TOKENS_PER_S="10"),
        ]
        url = f"http://127.0.0.1:{port}"
        try:
            figures = anyio.run(measure, settings, url, args.quick)
            figures["concurrent_websocket_streams"] = [
                anyio.run(hold, url, width) for width in ((100, 300) if args.quick else (100, 500, 1000))
            ]
        finally:
            for child in children:
                child.terminate()
                child.wait()
    nats, sse, ws = figures["nats_direct"], figures["sse"], figures["websocket_json_rpc"]
    figures["over_nats_direct"] = {
        "sse_first_chunk_sequential_p50": round(
            sse["first_chunk_sequential"]["p50_ms"] / nats["first_chunk_sequential"]["p50_ms"], 2
        ),
        "ws_first_chunk_sequential_p50": round(
            ws["first_chunk_sequential"]["p50_ms"] / nats["first_chunk_sequential"]["p50_ms"], 2
        ),
        "sse_first_chunk_100_concurrent_p99": round(
            sse["first_chunk_100_concurrent"]["p99_ms"] / nats["first_chunk_100_concurrent"]["p99_ms"], 2
        ),
        "ws_first_chunk_100_concurrent_p99": round(
            ws["first_chunk_100_concurrent"]["p99_ms"] / nats["first_chunk_100_concurrent"]["p99_ms"], 2
        ),
    }
    path = write_results("http", figures)
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
