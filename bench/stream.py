"""Streaming benchmark: the NATS bus against a FastAPI + uvicorn SSE server, in the same run.

    python -m bench.stream [--quick]

Specialists run as their own processes (`tekton specialist`) on the scripted provider at 0 ms, so only
the bus is measured; then the real local model. Prints the figures and writes bench/results/stream.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.common import concurrent, free_port, start_child, summary, write_results
from bus.client import Bus
from bus.errors import SpecialistUnavailable
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions

PROMPT = [ChatMessage(role="user", content="hello")]


async def bus_first_chunk(bus: Bus, name: str) -> float:
    async with bus.stream(name, PROMPT) as s:
        async for _ in s:
            pass
    assert s.first_chunk_at is not None
    return s.first_chunk_at - s.sent_at


async def sse_first_chunk(client: httpx.AsyncClient, url: str) -> float:
    sent = time.perf_counter()
    first = None
    async with client.stream("GET", url) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - sent
    assert first is not None
    return first


async def bus_tokens_per_s(bus: Bus, name: str) -> tuple[float, int]:
    """Tokens/s of one long stream from its first chunk to its end, and its tokens. Counted from the
    done frame: a chunk after the first may carry a burst of tokens (the first carries one)."""
    # The roster caps answers at 256 tokens; this stream is meant to be long.
    start = 0.0
    async with bus.stream(name, PROMPT, ChatOptions(max_tokens=1_000_000)) as s:
        async for _ in s:
            if not start:
                start = time.perf_counter()
    assert s.tokens is not None
    return (s.tokens - 1) / (time.perf_counter() - start), s.tokens


async def sse_tokens_per_s(client: httpx.AsyncClient, url: str) -> tuple[float, int]:
    """The same for the plain SSE server, which sends one token per event."""
    n = 0
    async with client.stream("GET", url) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                if n == 0:
                    start = time.perf_counter()
                n += 1
    return (n - 1) / (time.perf_counter() - start), n


async def measure(settings: TektonSettings, sse_port: int, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    seq_n, width, rounds = (100, 100, 2) if args.quick else (1000, 100, 5)
    async with Bus.connect(settings) as bus:
        for _ in range(50):  # warm up both paths
            await bus_first_chunk(bus, "apollo")
        seq = [await bus_first_chunk(bus, "apollo") for _ in range(seq_n)]
        conc = await concurrent(lambda: bus_first_chunk(bus, "apollo"), width, rounds)
        rate, n = await bus_tokens_per_s(bus, "athena")
        unknown = []
        for _ in range(10):
            started = time.perf_counter()
            try:
                await bus.ask("apolo", "x")
            except SpecialistUnavailable:
                unknown.append(time.perf_counter() - started)
        figures["nats"] = {
            "first_chunk_sequential": summary(seq),
            f"first_chunk_{width}_concurrent": summary(conc),
            "one_stream_tokens_per_s": round(rate),
            "one_stream_tokens": n,
            "unknown_specialist_error": summary(unknown),
        }
    limits = httpx.Limits(max_connections=width * 2, max_keepalive_connections=width * 2)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        url = f"http://127.0.0.1:{sse_port}/stream"
        for _ in range(50):
            await sse_first_chunk(client, url)
        seq = [await sse_first_chunk(client, url) for _ in range(seq_n)]
        conc = await concurrent(lambda: sse_first_chunk(client, url), width, rounds)
        rate, n = await sse_tokens_per_s(client, url + "?long=true")
        figures["sse_fastapi_uvicorn"] = {
            "first_chunk_sequential": summary(seq),
            f"first_chunk_{width}_concurrent": summary(conc),
            "one_stream_tokens_per_s": round(rate),
            "one_stream_tokens": n,
        }
    nats, sse = figures["nats"], figures["sse_fastapi_uvicorn"]
    key = f"first_chunk_{width}_concurrent"
    figures["ratios_sse_over_nats"] = {
        "first_chunk_sequential_p50": round(
            sse["first_chunk_sequential"]["p50_ms"] / nats["first_chunk_sequential"]["p50_ms"], 2
        ),
        "first_chunk_concurrent_p50": round(sse[key]["p50_ms"] / nats[key]["p50_ms"], 2),
        "first_chunk_concurrent_p99": round(sse[key]["p99_ms"] / nats[key]["p99_ms"], 2),
        "tokens_per_s_nats_over_sse": round(
            nats["one_stream_tokens_per_s"] / sse["one_stream_tokens_per_s"], 2
        ),
    }
    return figures


async def measure_local(settings: TektonSettings, prompts: int) -> dict[str, Any]:
    firsts, rates, client_first = [], [], []
    options = ChatOptions(max_tokens=128, temperature=0.7)
    async with Bus.connect(settings) as bus:
        for i in range(prompts):
            messages = [
                ChatMessage(
                    role="user", content=f"Explain in a few sentences why message queues help (take {i})."
                )
            ]
            async with bus.stream("sophia", messages, options) as s:
                async for _ in s:
                    pass
            result = await s.result()
            assert s.first_chunk_at is not None
            client_first.append(s.first_chunk_at - s.sent_at)
            if result.done.timings.first_token_ms is not None:
                firsts.append(result.done.timings.first_token_ms / 1000)
            if result.done.timings.tokens_per_s:
                rates.append(result.done.timings.tokens_per_s)
    return {
        "model": result.start.model,
        "prompts": prompts,
        "max_tokens": 128,
        "first_token_at_specialist": summary(firsts),
        "first_chunk_at_client": summary(client_first),
        "tokens_per_s_mean": round(sum(rates) / len(rates), 1),
        "tokens_per_s_min": round(min(rates), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--long-tokens", type=int, default=200_000)
    args = parser.parse_args()
    long_tokens = 20_000 if args.quick else args.long_tokens
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        settings = TektonSettings(nats_url=server.url, data_dir=Path(tmp))
        base = {
            "TEKTON_NATS_URL": server.url,
            "TEKTON_MAX_CONCURRENCY": "512",
            "TEKTON_CONFIG": "/nonexistent",
        }
        children = [
            start_child(
                [
                    py,
                    "-m",
                    "tekton",
                    "specialist",
                    "apollo",
                    "--provider",
                    "scripted",
                    "--log-level",
                    "warning",
                ],
                {**base, "TEKTON_SCRIPTED_TOKENS": "8"},
                "ready",
            ),
            start_child(
                [
                    py,
                    "-m",
                    "tekton",
                    "specialist",
                    "athena",
                    "--provider",
                    "scripted",
                    "--log-level",
                    "warning",
                ],
                {**base, "TEKTON_SCRIPTED_TOKENS": str(long_tokens)},
                "ready",
            ),
        ]
        sse_port = free_port()
        sse = __import__("subprocess").Popen([py, "-m", "bench.sse_server", str(sse_port), str(long_tokens)])
        try:
            anyio.run(_wait_http, sse_port)
            figures = anyio.run(measure, settings, sse_port, args)
        finally:
            sse.terminate()
            for child in children:
                child.terminate()
                child.wait()
        local = start_child(
            [py, "-m", "tekton", "specialist", "sophia", "--log-level", "warning"], base, "ready"
        )
        try:
            figures["local_model"] = anyio.run(measure_local, settings, 3 if args.quick else 8)
        finally:
            local.terminate()
            local.wait()
    figures["targets"] = {
        "nats_first_chunk_sequential_p50_ms_lt": 1.0,
        "nats_first_chunk_100_concurrent_p99_ms_lt": 25.0,
        "nats_one_stream_tokens_per_s_ge": 100_000,
        "local_tokens_per_s_ge": 80,
    }
    path = write_results("stream", figures)
    print(__import__("json").dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


async def _wait_http(port: int) -> None:
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(30):
            while True:
                try:
                    await client.get(f"http://127.0.0.1:{port}/docs")
                    return
                except httpx.TransportError:
                    await asyncio.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
