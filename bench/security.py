"""What auth + TLS cost on the hot path: first chunk, sequential and 100 at once, secure against plain.

    python -m bench.security [--quick]

Three nats-servers in the same run: plain (no users, no TLS), users only ("auth"), and as
`tekton up --tls` makes it ("secure": nkey users with subject permissions, TLS with tekton's CA).
Each gets its own specialist process (`tekton specialist apollo`, scripted provider at 0 ms) and the
same client code; they are measured in rotating rounds so machine noise hits all alike.
Writes bench/results/security.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from bench.common import concurrent, start_child, summary, write_results
from bus.client import Bus
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from tekton import certs
from tekton.users import Users

PROMPT = [ChatMessage(role="user", content="hello")]


async def first_chunk(bus: Bus) -> float:
    async with bus.stream("apollo", PROMPT) as s:
        async for _ in s:
            pass
    assert s.first_chunk_at is not None
    return s.first_chunk_at - s.sent_at


def specialist(settings: TektonSettings) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tekton", "specialist", "apollo", "--provider", "scripted"]
    argv += ["--nats", settings.nats_url, "--data-dir", str(settings.data_dir), "--log-level", "warning"]
    return start_child(argv, {"TEKTON_SCRIPTED_FIRST_TOKEN_MS": "0"}, "ready apollo")


KINDS = ("plain", "auth", "secure")


async def measure(settings: dict[str, TektonSettings], args: argparse.Namespace) -> dict[str, Any]:
    seq_n, width, rounds = (100, 100, 3) if args.quick else (1000, 100, 12)
    samples: dict[str, dict[str, list[float]]] = {k: {"seq": [], "c100": []} for k in KINDS}
    async with AsyncExitStack() as stack:
        buses = {}
        for kind in KINDS:
            buses[kind] = await stack.enter_async_context(Bus.connect(settings[kind], name=f"bench-{kind}"))
        for bus in buses.values():
            for _ in range(50):  # warm up
                await first_chunk(bus)
        # One request of each kind in turn (each going first in turn): noise from the rest of the machine
        # lands on all three alike.
        for i in range(seq_n):
            for kind in KINDS[i % 3 :] + KINDS[: i % 3]:
                samples[kind]["seq"].append(await first_chunk(buses[kind]))
        for r in range(rounds):
            for kind in KINDS[r % 3 :] + KINDS[: r % 3]:
                bus = buses[kind]
                samples[kind]["c100"] += await concurrent(lambda b=bus: first_chunk(b), width, 1)  # type: ignore[misc]
    figures: dict[str, Any] = {
        "kinds": {
            "plain": "no users, no TLS",
            "auth": "nkey users with subject permissions, no TLS",
            "secure": "nkey users with subject permissions and TLS (tekton up --tls)",
        }
    }
    for kind, got in samples.items():
        figures[kind] = {
            "first_chunk_sequential": summary(got["seq"]),
            "first_chunk_c100": summary(got["c100"]),
        }

    def ratio(kind: str, what: str, stat: str) -> float:
        return round(figures[kind][what][stat] / figures["plain"][what][stat], 3)

    figures["over_plain"] = {
        kind: {
            "sequential_p50": ratio(kind, "first_chunk_sequential", "p50_ms"),
            "sequential_p99": ratio(kind, "first_chunk_sequential", "p99_ms"),
            "c100_p99": ratio(kind, "first_chunk_c100", "p99_ms"),
        }
        for kind in ("auth", "secure")
    }
    figures["goal"] = "secure/plain <= 1.10"
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        users = Users(root / "secure", "tekton")
        users.ensure_local()
        tls = certs.generate(root / "secure" / "tls")
        servers = {
            "plain": EmbeddedNats(root / "plain" / "nats", port=0),
            "auth": EmbeddedNats(root / "secure" / "nats-auth", port=0, auth_file=users.auth_file),
            "secure": EmbeddedNats(root / "secure" / "nats", port=0, auth_file=users.auth_file, tls=tls),
        }
        children: list[subprocess.Popen[str]] = []
        try:
            for server in servers.values():
                server.start()
            settings = {
                kind: TektonSettings(
                    nats_url=server.url, data_dir=root / ("plain" if kind == "plain" else "secure")
                )
                for kind, server in servers.items()
            }
            children = [specialist(s) for s in settings.values()]
            figures: dict[str, Any] = {}

            async def run() -> None:
                figures.update(await measure(settings, args))

            anyio.run(run)
        finally:
            for child in children:
                child.terminate()
                child.wait(10)
            for server in servers.values():
                server.stop()
    path = write_results("security" + ("-quick" if args.quick else ""), figures)
    for kind in KINDS:
        seq, c100 = figures[kind]["first_chunk_sequential"], figures[kind]["first_chunk_c100"]
        print(
            f"{kind:>6}: first chunk p50 {seq['p50_ms']:.3f} ms, p99 {seq['p99_ms']:.3f} ms; "
            f"100 at once p99 {c100['p99_ms']:.1f} ms"
        )
    print(f"over plain: {figures['over_plain']} (goal: secure <= 1.10); {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
