"""What auth + TLS cost on the hot path: first chunk, sequential and 100 at once, secure against plain.

    python -m bench.security [--quick]

Four nats-servers in the same run: plain (no users, no TLS), users only ("auth"), as `tekton up --tls`
makes it ("secure": nkey users with subject permissions, TLS with tekton's CA, through bus/tls.py's
transport), and the same with TLS through nats-py's own transport, asyncio's TLS layer ("tls-asyncio",
what Tekton used before: the same-run baseline of bus/tls.py). Each gets its own specialist process
(`tekton specialist apollo`, scripted provider at 0 ms) and the same client code; they are measured
in rotating rounds so machine noise hits all alike. Besides the latencies it counts CPU per sequential
request in each of the three processes a request crosses (this client, the specialist, the
nats-server): on a busy machine those ratios hold where latencies wander.
Prints the ratios over plain in its last lines; writes bench/results/security.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from nats.aio.transport import TcpTransport

from bench.common import concurrent, cpu_s, start_child, summary, write_results
from bus import client
from bus.client import Bus
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from tekton import certs
from tekton.users import Users

PROMPT = [ChatMessage(role="user", content="hello")]
# The scripted specialist answers "apollo heard: " and the question: 202 chunks, as fast as they go.
LONG = [ChatMessage(role="user", content=" ".join(["word"] * 200))]


async def first_chunk(bus: Bus) -> float:
    async with bus.stream("apollo", PROMPT) as s:
        async for _ in s:
            pass
    assert s.first_chunk_at is not None
    return s.first_chunk_at - s.sent_at


async def whole_stream(bus: Bus) -> int:
    async with bus.stream("apollo", LONG) as s:
        return len([t async for t in s])


# The "tls-asyncio" kind: TLS as nats-py does it (its TcpTransport over asyncio's TLS layer) instead of
# bus.tls.TlsSocketTransport: the same-run baseline of that transport.
ASYNCIO_TLS = "import bus.client as c, nats.aio.transport as t; c.TlsSocketTransport = t.TcpTransport;"


def specialist(settings: TektonSettings, asyncio_tls: bool = False) -> subprocess.Popen[str]:
    run = ["-m", "tekton"]
    if asyncio_tls:
        run = ["-c", ASYNCIO_TLS + "from tekton.cli import main; raise SystemExit(main())"]
    argv = [sys.executable, *run, "specialist", "apollo", "--provider", "scripted"]
    argv += ["--nats", settings.nats_url, "--data-dir", str(settings.data_dir), "--log-level", "warning"]
    return start_child(argv, {"TEKTON_SCRIPTED_FIRST_TOKEN_MS": "0"}, "ready apollo")


KINDS = ("plain", "auth", "secure", "tls-asyncio")


async def measure(
    settings: dict[str, TektonSettings], pids: dict[str, dict[str, int]], args: argparse.Namespace
) -> dict[str, Any]:
    """``pids``: per kind, the pids of its ``specialist`` and ``server`` processes."""
    seq_n, width, rounds = (100, 100, 3) if args.quick else (1000, 100, 12)
    samples: dict[str, dict[str, list[float]]] = {k: {"seq": [], "c100": []} for k in KINDS}
    client_cpu = dict.fromkeys(KINDS, 0.0)
    async with AsyncExitStack() as stack:
        buses = {}
        for kind in KINDS:
            ours = client.TlsSocketTransport
            if kind == "tls-asyncio":  # nats-py keeps the transport it connected with
                client.TlsSocketTransport = TcpTransport  # type: ignore[misc,assignment]
            try:
                bus = await stack.enter_async_context(Bus.connect(settings[kind], name=f"bench-{kind}"))
            finally:
                client.TlsSocketTransport = ours  # type: ignore[misc]
            buses[kind] = bus
        assert type(buses["tls-asyncio"].nc._transport) is TcpTransport
        assert type(buses["secure"].nc._transport) is client.TlsSocketTransport
        for bus in buses.values():
            for _ in range(50):  # warm up
                await first_chunk(bus)
        # One request of each kind in turn (each going first in turn): noise from the rest of the machine
        # lands on all three alike.
        before = {kind: {what: cpu_s(pid) for what, pid in pids[kind].items()} for kind in KINDS}
        for i in range(seq_n):
            for kind in KINDS[i % len(KINDS) :] + KINDS[: i % len(KINDS)]:
                started = time.process_time()
                samples[kind]["seq"].append(await first_chunk(buses[kind]))
                client_cpu[kind] += time.process_time() - started
        cpu_us = {
            kind: {
                "client": round(client_cpu[kind] / seq_n * 1e6, 1),
                **{
                    what: round((cpu_s(pid) - before[kind][what]) / seq_n * 1e6, 1)
                    for what, pid in pids[kind].items()
                },
            }
            for kind in KINDS
        }
        # Long answers: where TLS records per flush and read sizes count.
        streams_n = 30 if args.quick else 300
        stream_cpu = dict.fromkeys(KINDS, 0.0)
        before = {kind: cpu_s(pids[kind]["specialist"]) for kind in KINDS}
        for i in range(streams_n):
            for kind in KINDS[i % len(KINDS) :] + KINDS[: i % len(KINDS)]:
                started = time.process_time()
                assert await whole_stream(buses[kind]) == 202
                stream_cpu[kind] += time.process_time() - started
        stream_us = {
            kind: round(
                (stream_cpu[kind] + cpu_s(pids[kind]["specialist"]) - before[kind]) / streams_n * 1e6, 1
            )
            for kind in KINDS
        }
        for r in range(rounds):
            for kind in KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]:
                bus = buses[kind]
                samples[kind]["c100"] += await concurrent(lambda b=bus: first_chunk(b), width, 1)  # type: ignore[misc]
    figures: dict[str, Any] = {
        "kinds": {
            "plain": "no users, no TLS",
            "auth": "nkey users with subject permissions, no TLS",
            "secure": "nkey users with subject permissions and TLS (tekton up --tls)",
            "tls-asyncio": "as secure, TLS through nats-py's own transport (asyncio's TLS layer)",
        }
    }
    for kind, got in samples.items():
        figures[kind] = {
            "first_chunk_sequential": summary(got["seq"]),
            "first_chunk_c100": summary(got["c100"]),
            "cpu_us_per_sequential_request": cpu_us[kind],
            "cpu_us_per_202_chunk_stream_client_and_specialist": stream_us[kind],
        }

    def ratio(kind: str, what: str, stat: str) -> float:
        return round(figures[kind][what][stat] / figures["plain"][what][stat], 3)

    figures["over_plain"] = {
        kind: {
            "sequential_p50": ratio(kind, "first_chunk_sequential", "p50_ms"),
            "sequential_p99": ratio(kind, "first_chunk_sequential", "p99_ms"),
            "c100_p99": ratio(kind, "first_chunk_c100", "p99_ms"),
            **{
                f"cpu_{what}": round(cpu_us[kind][what] / max(cpu_us["plain"][what], 0.1), 3)
                for what in cpu_us[kind]
            },
            "cpu_202_chunk_stream": round(stream_us[kind] / stream_us["plain"], 3),
        }
        for kind in ("auth", "secure", "tls-asyncio")
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
            "tls-asyncio": EmbeddedNats(
                root / "secure" / "nats-asyncio", port=0, auth_file=users.auth_file, tls=tls
            ),
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
            children = [specialist(s, asyncio_tls=kind == "tls-asyncio") for kind, s in settings.items()]
            pids = {
                kind: {"specialist": child.pid, "server": servers[kind].process.pid}  # type: ignore[union-attr]
                for kind, child in zip(KINDS, children, strict=True)
            }
            figures: dict[str, Any] = {}

            async def run() -> None:
                figures.update(await measure(settings, pids, args))

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
        cpu = figures[kind]["cpu_us_per_sequential_request"]
        stream = figures[kind]["cpu_us_per_202_chunk_stream_client_and_specialist"]
        print(
            f"{kind:>11}: first chunk p50 {seq['p50_ms']:.3f} ms, p99 {seq['p99_ms']:.3f} ms; "
            f"100 at once p99 {c100['p99_ms']:.1f} ms; CPU per request: "
            + ", ".join(f"{what} {us:.0f} µs" for what, us in cpu.items())
            + f"; a 202-chunk stream: {stream:.0f} µs CPU (client + specialist)"
        )
    for kind in ("auth", "secure", "tls-asyncio"):
        r = figures["over_plain"][kind]
        print(
            f"{kind}/plain: first chunk p50 {r['sequential_p50']:.2f}x, p99 {r['sequential_p99']:.2f}x, "
            f"100 at once p99 {r['c100_p99']:.2f}x; CPU client {r['cpu_client']:.2f}x, "
            f"specialist {r['cpu_specialist']:.2f}x, nats-server {r['cpu_server']:.2f}x; "
            f"CPU of a 202-chunk stream {r['cpu_202_chunk_stream']:.2f}x"
        )
    print(f"goal: secure/plain <= 1.10; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
