"""What NATS over WebSocket costs against plain TCP, in one run on one server.

    python -m bench.websocket [--quick]

The same client code (`bus.stream`) connects once over nats:// and once over ws:// to one
nats-server with both listeners; the specialists stay on TCP. First-chunk latency sequential and at
100 concurrent streams, tokens/s on one stream, and connect time. Writes bench/results/websocket.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import concurrent, start_child, summary, write_results
from bench.stream import bus_first_chunk, bus_tokens_per_s
from bus.client import Bus, connect
from bus.server import EmbeddedNats
from bus.settings import TektonSettings


async def one_transport(url: str, tmp: Path, n: int, width: int, rounds: int) -> dict[str, Any]:
    settings = TektonSettings(nats_url=url, data_dir=tmp)
    connects = []
    for _ in range(20):
        start = time.perf_counter()
        nc = await connect(url)
        connects.append(time.perf_counter() - start)
        await nc.close()
    async with Bus.connect(settings) as bus:
        for _ in range(20):
            await bus_first_chunk(bus, "apollo")
        sequential = [await bus_first_chunk(bus, "apollo") for _ in range(n)]
        wide = await concurrent(lambda: bus_first_chunk(bus, "apollo"), width, rounds)
        rate, tokens = await bus_tokens_per_s(bus, "athena")
    return {
        "connect": summary(connects),
        "first_chunk_sequential": summary(sequential),
        f"first_chunk_{width}_concurrent": summary(wide),
        "one_stream_tokens_per_s": round(rate),
        "one_stream_tokens": tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    n, rounds, long_tokens = (100, 1, 20_000) if args.quick else (1000, 5, 100_000)
    py = sys.executable
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedNats(Path(tmp) / "store", port=0, websocket_port=0) as server,
    ):
        env = {
            "TEKTON_NATS_URL": server.url,
            "TEKTON_CONFIG": "/nonexistent",
            "TEKTON_MAX_CONCURRENCY": "512",
        }
        quiet = ["--provider", "scripted", "--log-level", "warning"]
        children = [
            start_child(
                [py, "-m", "tekton", "specialist", "apollo", *quiet],
                {**env, "TEKTON_SCRIPTED_TOKENS": "8"},
                "ready",
            ),
            start_child(
                [py, "-m", "tekton", "specialist", "athena", *quiet],
                {**env, "TEKTON_SCRIPTED_TOKENS": str(long_tokens)},
                "ready",
            ),
        ]
        try:
            figures: dict[str, Any] = {
                "tcp": anyio.run(one_transport, server.url, Path(tmp), n, 100, rounds),
                "websocket": anyio.run(one_transport, server.ws_url, Path(tmp), n, 100, rounds),
            }
        finally:
            for child in children:
                child.terminate()
                child.wait()
    tcp, ws = figures["tcp"], figures["websocket"]
    figures["websocket_over_tcp"] = {
        "connect_p50": round(ws["connect"]["p50_ms"] / tcp["connect"]["p50_ms"], 2),
        "first_chunk_sequential_p50": round(
            ws["first_chunk_sequential"]["p50_ms"] / tcp["first_chunk_sequential"]["p50_ms"], 2
        ),
        "first_chunk_100_concurrent_p99": round(
            ws["first_chunk_100_concurrent"]["p99_ms"] / tcp["first_chunk_100_concurrent"]["p99_ms"], 2
        ),
        "tokens_per_s": round(ws["one_stream_tokens_per_s"] / tcp["one_stream_tokens_per_s"], 2),
    }
    path = write_results("websocket", figures)
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
