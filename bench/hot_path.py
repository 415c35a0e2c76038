"""The hot path against a raw nats-py floor, every pair measured in the same run, interleaved.

    python -m bench.hot_path [--quick] [--profile DIR] [--skip aish,bridge,wide,rss] [--only-aish]

- the floor: a raw nats-py subscriber (``python -m bench.hot_path floor URL``) publishing the same
  start/chunk/done msgpack frames to the reply subject, and a plain inbox client;
- Tekton: `tekton specialist` processes on the scripted provider at unlimited rate, asked by the
  project's client (``bus.client.Bus``, durable runs on as by default, and again with runs off: frames
  on an inbox only, none stored by JetStream) and by the client written only from docs/protocol.md
  (``bench/foreign_client.py``);
- the HTTP/SSE bridge (`tekton gateway --http`) against the bus in the same run;
- the real `aish apollo hi` console script (its light one-shot path, and its full path) against
  `python -c pass`; the specialist's RSS per 1,000 open streams;
- tracing: the specialist's CPU per request, and the first chunk's wait (sequential p50, 100 at once
  p99), with OpenTelemetry on (every request traced, and 5 % sampled, by the specialist or by a
  caller with tracing on; the real OTLP/HTTP exporter posting to a sink, a process of the bench's)
  against the same answer with tracing off, in two processes (``--skip tracing`` leaves it out).

Floor and Tekton rounds alternate; rows report medians and Tekton/floor ratios, plus the CPU each side's
server process and nats-server spent per request (from each process's CPU-time clock, to the nanosecond;
CPU time is far less noisy than wall time on a busy machine) and the messages through nats-server per
request (in + out, from its /varz). Prints the table and writes bench/results/hot_path.json (date,
machine, load average included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import nats
from nats.aio.client import Client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from bench import foreign_client
from bench.common import cpu_s, free_port, pct, start_child, write_results
from bus import tracing
from bus.client import Bus
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage

SHORT_TOKENS = 8
PROMPT = [ChatMessage(role="user", content="hello")]
WORDS = ["apollo ", "heard: ", "hello"]

# ---------------------------------------------------------------------------------------------- floor


async def floor_service(url: str, long_tokens: int) -> None:
    """A plain subscriber per subject publishing start, N chunks and done to the reply subject."""
    nc = await nats.connect(url)

    def serve(name: str, tokens: int) -> Callable[[Any], Awaitable[None]]:
        async def on_request(msg: Any) -> None:
            request = msgpack.unpackb(msg.data)
            n = min(tokens, (request.get("options") or {}).get("max_tokens") or tokens)
            reply, started = msg.reply, time.perf_counter()
            start = {"v": 1, "type": "start", "seq": 0, "specialist": name, "instance": "floor"}
            await nc.publish(reply, msgpack.packb({**start, "provider": "raw", "model": "raw"}))
            for i in range(n):
                chunk = {"v": 1, "type": "chunk", "seq": i + 1, "text": WORDS[i % 3]}
                await nc.publish(reply, msgpack.packb(chunk))
            total_ms = (time.perf_counter() - started) * 1000
            done = {"v": 1, "type": "done", "seq": n + 1, "finish_reason": "stop"}
            usage = {"completion_tokens": n}
            await nc.publish(
                reply, msgpack.packb({**done, "usage": usage, "timings": {"total_ms": total_ms}})
            )

        return on_request

    await nc.subscribe("tekton.ai.floor.chat", queue="tekton.ai.floor", cb=serve("floor", SHORT_TOKENS))
    await nc.subscribe(
        "tekton.ai.floorlong.chat", queue="tekton.ai.floorlong", cb=serve("floorlong", long_tokens)
    )
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def floor_first_chunk(nc: Client, specialist: str = "floor") -> float:
    """The plain inbox client: subscribe, publish, read frames until done."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    request = {"v": 1, "id": uuid.uuid4().hex, "messages": [{"role": "user", "content": "hello"}]}
    sent = time.perf_counter()
    await nc.publish(f"tekton.ai.{specialist}.chat", msgpack.packb(request), reply=inbox)
    first = 0.0
    while True:
        frame = msgpack.unpackb((await sub.next_msg(timeout=60)).data)
        if frame["type"] == "chunk" and not first:
            first = time.perf_counter() - sent
        elif frame["type"] in ("done", "error"):
            break
    await sub.unsubscribe()
    return first


async def bus_first_chunk(bus: Bus, specialist: str = "apollo") -> float:
    async with bus.stream(specialist, PROMPT) as s:
        async for _ in s:
            pass
    assert s.first_chunk_at is not None
    return s.first_chunk_at - s.sent_at


async def foreign_first_chunk(nc: Client, specialist: str) -> float:
    answer = await foreign_client.ask(nc, specialist, "hello", keep_text=False)
    assert answer.first_chunk_at is not None
    return answer.first_chunk_at - answer.sent_at


# -------------------------------------------------------------------------------------------- helpers


def server_pid(pid: int) -> int:
    """The server's own pid: ``pid``, or its child when ``pid`` is py-spy running it."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if "py-spy" in Path(f"/proc/{pid}/cmdline").read_text() and children:
        return int(children[0])
    return pid


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ms(values: list[float], q: float) -> float:
    return round(pct(values, q) * 1000, 3)


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


async def sequential(fn: Callable[[], Awaitable[float]], n: int) -> list[float]:
    return [await fn() for _ in range(n)]


async def wide(fn: Callable[[], Awaitable[float]], width: int) -> list[float]:
    return list(await asyncio.gather(*(fn() for _ in range(width))))


# nats-server's monitoring endpoint (/varz), set in main(): messages in and out per request.
VARZ = ""


def nats_msgs() -> int:
    """Messages nats-server took in and sent out so far (0 without monitoring)."""
    if not VARZ:
        return 0
    with urllib.request.urlopen(VARZ, timeout=5) as reply:
        varz = json.load(reply)
    return int(varz["in_msgs"]) + int(varz["out_msgs"])


class Side:
    """One side of a comparison: its client call and its server process (for CPU per request)."""

    def __init__(self, name: str, fn: Callable[[], Awaitable[float]], pid: int, nats_pid: int = 0):
        self.name, self.fn, self.pid, self.nats_pid = name, fn, pid, nats_pid
        self.cpu_s = 0.0  # the server's CPU seconds over ``requests``
        self.nats_cpu_s = 0.0  # nats-server's, over the same requests
        self.nats_cpu = 0.0  # nats-server's CPU microseconds per request, set by cpu_us()
        self.msgs = 0  # messages through nats-server (in + out) over ``requests``
        self.nats_msgs = 0.0  # per request, set by cpu_us()
        self.requests = 0

    async def run(self, width: int, n: int) -> list[float]:
        before = cpu_s(self.pid)
        nats_before = cpu_s(self.nats_pid) if self.nats_pid else 0.0
        msgs_before = nats_msgs() if self.nats_pid else 0
        samples = await (sequential(self.fn, n) if width == 1 else wide(self.fn, width))
        self.cpu_s += cpu_s(self.pid) - before
        self.nats_cpu_s += (cpu_s(self.nats_pid) - nats_before) if self.nats_pid else 0.0
        self.msgs += (nats_msgs() - msgs_before) if self.nats_pid else 0
        self.requests += len(samples)
        return samples

    def cpu_us(self) -> float:
        """Server CPU microseconds per request since the last call (nats-server's in ``nats_cpu``)."""
        per = self.cpu_s / self.requests * 1e6 if self.requests else 0.0
        self.nats_cpu = round(self.nats_cpu_s / self.requests * 1e6, 1) if self.requests else 0.0
        self.nats_msgs = round(self.msgs / self.requests, 2) if self.requests else 0.0
        self.cpu_s, self.nats_cpu_s, self.requests, self.msgs = 0.0, 0.0, 0, 0
        return round(per, 1)


async def uncounted(*sides: Side, sequential: int = 0) -> None:
    """Warm-up rounds left out of every figure: ``sequential`` requests one at a time, then a round of
    100 at once (the first such round was the slowest of every run: the floor's 63-85 ms against
    14-21, the bridge's 160-240 against 60-83 while it opened its connections)."""
    for side in sides:
        if sequential:
            await side.run(1, sequential)
        await side.run(100, 100)
        side.cpu_us()


async def interleaved(
    a: Side, b: Side, width: int, rounds: int, n: int = 0
) -> tuple[list[list[float]], list[list[float]]]:
    """``rounds`` rounds of each side, alternating which goes first."""
    ra: list[list[float]] = []
    rb: list[list[float]] = []
    for r in range(rounds):
        for side in (a, b) if r % 2 == 0 else (b, a):
            (ra if side is a else rb).append(await side.run(width, n or width))
    return ra, rb


def latency_row(
    what: str, floor: list[list[float]], tekton: list[list[float]], q: float, goal: float
) -> dict[str, Any]:
    """Per-round percentile ``q``; the row is the median over rounds, plus the worst round."""
    f = [ms(r, q) for r in floor]
    t = [ms(r, q) for r in tekton]
    row = {
        "what": what,
        "floor_ms": med(f),
        "tekton_ms": med(t),
        "ratio": ratio(med(t), med(f)),
        "goal": f"<= {goal}x",
        "rounds_floor_ms": f,
        "rounds_tekton_ms": t,
    }
    if len(f) > 1:
        row["worst_round_ratio"] = ratio(max(t), max(f))
    return row


# ------------------------------------------------------------------------------------------- measures


async def measure_bus(args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    settings = TektonSettings(nats_url=args.url, data_dir=Path(args.tmp))
    out: dict[str, Any] = {"rows": []}
    rows = out["rows"]
    seq_n, rounds = (100, 3) if args.quick else (500, 5)
    nc = await nats.connect(args.url)
    live_only = settings.model_copy(update={"runs": False})
    async with Bus.connect(settings) as bus, Bus.connect(live_only) as live_bus:
        ns = pids["nats-server"]
        floor = Side("floor", lambda: floor_first_chunk(nc), pids["floor"], ns)
        tekton = Side("tekton", lambda: bus_first_chunk(bus), pids["apollo"], ns)
        # The project client without durable runs: frames on an inbox only, no JetStream capture.
        live = Side("live", lambda: bus_first_chunk(live_bus), pids["apollo"], ns)
        foreign = Side("foreign", lambda: foreign_first_chunk(nc, "apollo"), pids["apollo"], ns)
        for side in (floor, tekton, live, foreign):  # warm up
            await side.run(1, 50)
            side.cpu_us()

        def cpu(*sides: Side) -> dict[str, dict[str, float]]:
            return {
                s.name: {"server_us": s.cpu_us(), "nats_server_us": s.nats_cpu, "nats_msgs": s.nats_msgs}
                for s in sides
            }

        f, t = await interleaved(floor, tekton, 1, rounds, seq_n)
        rows.append(latency_row("first chunk, sequential p50", f, t, 50, 1.5))
        f2, lv = await interleaved(floor, live, 1, rounds, seq_n)
        rows.append(latency_row("  (project client, runs off: no JetStream capture)", f2, lv, 50, 1.5))
        f3, fo = await interleaved(floor, foreign, 1, rounds, seq_n)
        rows.append(latency_row("  (foreign client, sequential p50)", f3, fo, 50, 1.5))
        out["cpu_per_request_sequential_us"] = cpu(floor, tekton, live, foreign)
        await uncounted(floor, tekton, live)
        f, t = await interleaved(floor, tekton, 100, 3 if args.quick else 5)
        row = latency_row("first chunk, 100 concurrent p99", f, t, 99, 1.5)
        row["worst_round_goal"] = "<= 2x"
        rows.append(row)
        f2, lv = await interleaved(floor, live, 100, 3 if args.quick else 5)
        rows.append(latency_row("  (project client, runs off, 100 concurrent p99)", f2, lv, 99, 1.5))
        out["cpu_per_request_c100_us"] = cpu(floor, tekton, live)
        if "wide" not in args.skip:
            for width in (1000,) if args.quick else (1000, 5000):
                f, t = await interleaved(floor, tekton, width, 1 if args.quick else 2)
                rows.append(latency_row(f"first chunk, {width} concurrent p99", f, t, 99, 3))
                rows[-1]["p50"] = {
                    "floor_ms": med([ms(r, 50) for r in f]),
                    "tekton_ms": med([ms(r, 50) for r in t]),
                }
        rates: dict[str, list[float]] = {"floor": [], "tekton": []}
        firsts: dict[str, list[float]] = {"floor": [], "tekton": []}
        for r in range(3):
            for name in ("floorlong", "athena") if r % 2 == 0 else ("athena", "floorlong"):
                answer = await foreign_client.ask(
                    nc, name, "long", max_tokens=args.long_tokens, keep_text=False
                )
                assert answer.first_chunk_at is not None and answer.done_at is not None
                # Over the whole stream: the plain floor subscriber sends nothing until its first
                # buffer flush (~2 MB in), so a rate counted from the first chunk would flatter it.
                # Tokens, not frames: a specialist sends a burst of tokens in one chunk frame.
                assert answer.done is not None
                rate = answer.done["usage"]["completion_tokens"] / (answer.done_at - answer.sent_at)
                side = "floor" if name == "floorlong" else "tekton"
                rates[side].append(rate)
                firsts[side].append(round((answer.first_chunk_at - answer.sent_at) * 1000, 1))
        rows.append(
            {
                "what": "one stream, tokens/s, foreign client (protocol.md), specialist vs floor",
                "floor": round(statistics.median(rates["floor"])),
                "tekton": round(statistics.median(rates["tekton"])),
                "ratio": ratio(statistics.median(rates["tekton"]), statistics.median(rates["floor"])),
                "goal": ">= 0.8",
                "rounds": rates,
                "first_chunk_ms": firsts,
            }
        )
    await nc.close()
    return out


def otlp_sink_service(port_file: str) -> None:
    """An OTLP/HTTP endpoint that takes every export and keeps nothing (a collector's stand-in, so
    the traced specialists pay the exporter's real encoding and HTTP posts), in a process of its own
    so that reading the exports takes no turns from the bench's client; writes its port to
    ``port_file``."""
    import http.server

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


def otlp_sink(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    """The sink's process (``python -m bench.hot_path sink FILE``) and its URL."""
    port_file = Path(tmp) / "otlp-sink.port"
    proc = subprocess.Popen([sys.executable, "-m", "bench.hot_path", "sink", str(port_file)])
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the OTLP sink did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


async def measure_tracing(args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    """Tracing off against on, the same 8-chunk scripted answer: the specialist's CPU per request (all
    its threads, the exporter's included), and what a caller waits, first chunk sequential p50 and
    100 at once p99. On: telos traces every request; sophia samples 5 % of requests that come with
    no trace context (a foreign client's: it decides, the root); penia is sophia again, asked by a
    client with tracing on at 5 % (this process, its spans made and dropped), as aish, the gateway
    and the bridge ask when the deployment traces: the caller decides and says so in ``traceparent``.

    "Off" is two untraced processes (apollo, metis), each round's figure their mean: two identical
    processes differ by up to ~5 % in CPU per request (which one started first, where it landed),
    as much as the goal, so one alone would be as likely to hide a cost as to invent one; the
    control row shows that spread in this run. Each round runs every side once, in an order rotated
    round by round (none always first); a row's ratio is the median of the rounds' own ratios, on and
    off measured within seconds of each other."""
    settings = TektonSettings(nats_url=args.url, data_dir=Path(args.tmp))
    seq_n, rounds = (300, 4) if args.quick else (800, 12)
    out: dict[str, Any] = {"rows": []}
    off, names = ("apollo", "metis"), ("apollo", "metis", "telos", "sophia", "penia")
    client_tracing = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.05)), shutdown_on_exit=False)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    waits: dict[str, list[list[float]]] = {name: [] for name in names}
    wide_waits: dict[str, list[list[float]]] = {name: [] for name in names}
    async with Bus.connect(settings) as bus:
        sides = [
            Side(name, lambda name=name: bus_first_chunk(bus, name), pids[name])  # type: ignore[misc]
            for name in names
        ]
        await uncounted(*sides, sequential=50)
        for r in range(rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order if r % 2 == 0 else reversed(order):
                tracing.install(client_tracing if side.name == "penia" else None)
                try:
                    waits[side.name].append(await side.run(1, seq_n))
                    cpu[side.name].append(side.cpu_us())
                    wide_waits[side.name].append(await side.run(100, 100))
                    side.cpu_us()
                finally:
                    tracing.install(None)
    off_cpu = [statistics.mean(pair) for pair in zip(*(cpu[name] for name in off), strict=True)]
    off_waits = [a + b for a, b in zip(*(waits[name] for name in off), strict=True)]
    off_wide = [a + b for a, b in zip(*(wide_waits[name] for name in off), strict=True)]

    def cpu_row(what: str, on: list[float], base: list[float]) -> dict[str, Any]:
        return {
            "what": what,
            "floor": round(statistics.median(base), 1),
            "tekton": round(statistics.median(on), 1),
            "ratio": round(statistics.median(t / f for t, f in zip(on, base, strict=True)), 2),
            "goal": "<= 1.05x",
            "rounds_off_us": base,
            "rounds_on_us": on,
        }

    control = cpu_row(
        "specialist CPU us per request, off vs off (metis vs apollo: the spread)", cpu["metis"], cpu["apollo"]
    )
    control["goal"] = ""
    out["rows"].append(control)
    for name, what in (
        ("telos", "every request"),
        ("sophia", "5 % sampled"),
        ("penia", "5 % sampled by the caller"),
    ):
        out["rows"].append(
            cpu_row(f"specialist CPU us per request, tracing {what} (OTLP) vs off", cpu[name], off_cpu)
        )
        out["rows"].append(
            latency_row(
                f"  (first chunk sequential p50, tracing {what} vs off)", off_waits, waits[name], 50, 1.05
            )
        )
        out["rows"].append(
            latency_row(
                f"  (first chunk 100 concurrent p99, tracing {what} vs off)",
                off_wide,
                wide_waits[name],
                99,
                1.05,
            )
        )
    return out


async def sse_first(session: aiohttp.ClientSession, url: str) -> float:
    sent = time.perf_counter()
    first = 0.0
    async with session.post(url, json={"specialist": "apollo", "message": "hello"}) as reply:
        reply.raise_for_status()
        async for line in reply.content:
            if not first and line.startswith(b"event: content"):
                first = time.perf_counter() - sent
    if not first:
        raise RuntimeError("no content event")
    return first


async def measure_bridge(args: argparse.Namespace, pids: dict[str, int], http_url: str) -> dict[str, Any]:
    settings = TektonSettings(nats_url=args.url, data_dir=Path(args.tmp))
    errors: list[str] = []
    url = http_url + "/api/chat/stream"

    async def sse() -> float:
        try:
            return await sse_first(session, url)
        except (aiohttp.ClientError, RuntimeError) as err:
            errors.append(f"{type(err).__name__}: {err}")
            return float("nan")

    connector = aiohttp.TCPConnector(limit=0)
    async with Bus.connect(settings) as bus, aiohttp.ClientSession(connector=connector) as session:
        bus_side = Side("bus", lambda: bus_first_chunk(bus), pids["apollo"])
        sse_side = Side("sse", sse, pids["gateway"])
        await uncounted(bus_side, sse_side, sequential=20)  # (the 100 connections opened here)
        n = 100 if args.quick else 300
        b, s = await interleaved(bus_side, sse_side, 1, 3, n)
        rows = [latency_row("SSE bridge vs bus, sequential first chunk p50", b, s, 50, 3)]
        b, s = await interleaved(bus_side, sse_side, 100, 3 if args.quick else 5)
        s = [[x for x in r if x == x] or [float("inf")] for r in s]
        rows.append(latency_row("SSE bridge vs bus, 100 concurrent p99", b, s, 99, 3))
        return {
            "rows": rows,
            "sse_read_errors": errors,
            "gateway_cpu_per_sse_request_us": sse_side.cpu_us(),
        }


def measure_aish(args: argparse.Namespace) -> dict[str, Any]:
    """The real `aish` console script (the light one-shot path), its full path (TEKTON_AISH_FAST=0)
    and `python -c pass`, alternating, medians of wall and CPU time; every answer is checked."""
    env = {**os.environ, "TEKTON_NATS_URL": args.url, "TEKTON_CONFIG": "/nonexistent"}
    env = {
        k: v
        for k, v in env.items()
        if not k.startswith("TEKTON_") or k in ("TEKTON_NATS_URL", "TEKTON_CONFIG")
    }
    env["TEKTON_DATA_DIR"] = str(Path(args.tmp) / "aish-data")
    # An installed aish runs from byte-compiled modules; this machine's PYTHONDONTWRITEBYTECODE would
    # otherwise make every round compile ours from source (the stdlib's are compiled already).
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(root / "aish_client"), str(root / "bus")], check=True
    )
    aish = [str(Path(sys.executable).parent / "aish"), "apollo", "hi"]
    sides = {"bare": ([sys.executable, "-c", "pass"], env), "aish": (aish, env)}
    sides["full"] = (aish, {**env, "TEKTON_AISH_FAST": "0"})
    walls: dict[str, list[float]] = {k: [] for k in sides}
    cpus: dict[str, list[float]] = {k: [] for k in sides}
    rounds = 5 if args.quick else 15
    for r in range(rounds):
        order = list(sides)[r % 3 :] + list(sides)[: r % 3]
        for name in order:
            argv, side_env = sides[name]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run(argv, env=side_env, capture_output=True, text=True)
            walls[name].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            if done.returncode != 0 or (name != "bare" and not done.stdout.startswith("apollo heard: hi")):
                raise RuntimeError(
                    f"{argv} failed ({done.returncode}): {done.stdout!r} {done.stderr.strip()}"
                )
    wall = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    return {
        "rows": [
            {
                "what": f"`aish apollo hi` vs `python -c pass`, wall (median of {rounds})",
                "floor_s": round(wall["bare"], 3),
                "tekton_s": round(wall["aish"], 3),
                "ratio": ratio(wall["aish"], wall["bare"]),
                "goal": "<= 4x",
            },
            {
                "what": "  (the same, CPU user+sys)",
                "floor_s": round(cpu["bare"], 3),
                "tekton_s": round(cpu["aish"], 3),
                "ratio": ratio(cpu["aish"], cpu["bare"]),
                "goal": "",
            },
            {
                "what": "  the full path (TEKTON_AISH_FAST=0, nats-py), wall",
                "floor_s": round(wall["bare"], 3),
                "tekton_s": round(wall["full"], 3),
                "ratio": ratio(wall["full"], wall["bare"]),
                "goal": "",
            },
        ],
        "aish_rounds_s": {k: [round(x, 3) for x in v] for k, v in walls.items()},
    }


async def measure_rss(args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    """Open N slow streams at once on `hermes` (1 token/s), wait until each has its first chunk."""
    settings = TektonSettings(nats_url=args.url, data_dir=Path(args.tmp))
    n = 1000
    pid = pids["hermes"]
    async with Bus.connect(settings) as bus:
        await bus_first_chunk(bus, "hermes")  # warm
        before = rss_kib(pid)
        all_open = asyncio.Event()
        got = 0

        async def hold() -> None:
            nonlocal got
            async with bus.stream("hermes", PROMPT) as s:
                async for _ in s:
                    got += 1
                    if got == n:
                        all_open.set()
                    await asyncio.Event().wait()  # hold it open until cancelled

        tasks = [asyncio.create_task(hold()) for _ in range(n)]
        await asyncio.wait_for(all_open.wait(), 120)
        during = rss_kib(pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "rows": [
            {
                "what": "specialist RSS per 1,000 open streams",
                "tekton_mib": round((during - before) / 1024 * 1000 / n, 1),
                "specialist_rss_before_mib": round(before / 1024, 1),
                "specialist_rss_open_mib": round(during / 1024, 1),
            }
        ]
    }


# ----------------------------------------------------------------------------------------------- main


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"| {'what':<72} | {'floor':>10} | {'Tekton':>10} | {'ratio':>6} | goal |")
    print(f"| {'-' * 72} | {'-' * 10} | {'-' * 10} | {'-' * 6} | ---- |")
    for row in rows:
        floor = row.get("floor_ms", row.get("floor_s", row.get("floor", "")))
        tekton = row.get("tekton_ms", row.get("tekton_s", row.get("tekton", row.get("tekton_mib", ""))))
        cells = [row["what"].ljust(72), f"{floor!s:>10}", f"{tekton!s:>10}", f"{row.get('ratio', '')!s:>6}"]
        print("| " + " | ".join([*cells, row.get("goal", "")]) + " |")
        if "worst_round_ratio" in row and "100 concurrent" in row["what"]:
            worst = [max(row["rounds_floor_ms"]), max(row["rounds_tekton_ms"]), row["worst_round_ratio"]]
            print(
                "| "
                + "  the same, worst round".ljust(72)
                + "".join(f" | {w!s:>10}" for w in worst)
                + f" | {row.get('worst_round_goal', '')} |"  # a goal only where the issue set one
            )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        asyncio.run(floor_service(sys.argv[2], int(sys.argv[3])))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "sink":
        otlp_sink_service(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--profile", type=Path, help="run the servers under cProfile, writing DIR/<name>.prof"
    )
    parser.add_argument("--skip", default="", help="comma-separated: aish, bridge, wide, rss, tracing")
    parser.add_argument("--only-aish", action="store_true", help="just the `aish apollo hi` rows")
    parser.add_argument("--long-tokens", type=int, default=200_000)
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    if args.only_aish:
        args.skip |= {"bus", "bridge", "wide", "rss"}
    if args.quick:
        args.long_tokens = min(args.long_tokens, 50_000)
    py = sys.executable
    load_before = os.getloadavg()
    monitor = free_port()
    global VARZ
    VARZ = f"http://127.0.0.1:{monitor}/varz"
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedNats(Path(tmp) / "store", port=0, extra_config=f"http: 127.0.0.1:{monitor}\n") as server,
    ):
        args.url, args.tmp = server.url, tmp
        env = {
            "TEKTON_NATS_URL": server.url,
            "TEKTON_CONFIG": "/nonexistent",
            "TEKTON_MAX_CONCURRENCY": "8192",
            "TEKTON_HTTP_RATE_PER_S": "1000000",
            "TEKTON_HTTP_BURST": "1000000",
        }

        def launch(name: str, argv: list[str], **extra: str) -> subprocess.Popen[str]:
            argv = [py, *argv]
            if args.profile:  # py-spy samples on-CPU stacks only: a CPU profile, not a wall-clock one
                args.profile.mkdir(parents=True, exist_ok=True)
                out = str(args.profile / f"{name}.txt")
                argv = [
                    str(Path(py).parent / "py-spy"),
                    "record",
                    "-r",
                    "400",
                    "-f",
                    "raw",
                    "-o",
                    out,
                    "--",
                    *argv,
                ]
            return start_child(argv, {**env, **extra}, "ready")

        def specialist(name: str, **extra: str) -> subprocess.Popen[str]:
            argv = ["-m", "tekton", "specialist", name, "--provider", "scripted", "--log-level", "warning"]
            return launch(name, argv, **extra)

        sink: subprocess.Popen[bytes] | None = None
        procs = {"apollo": specialist("apollo", TEKTON_SCRIPTED_TOKENS=str(SHORT_TOKENS))}
        if "bus" not in args.skip:
            procs["floor"] = launch(
                "floor", ["-m", "bench.hot_path", "floor", server.url, str(args.long_tokens)]
            )
            procs["athena"] = specialist("athena", TEKTON_SCRIPTED_TOKENS=str(args.long_tokens))
        if "tracing" not in args.skip:  # the same scripted answer, tracing on: every request, 5 %
            sink, sink_url = otlp_sink(tmp)
            otlp = {"TEKTON_SCRIPTED_TOKENS": str(SHORT_TOKENS), "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url}
            procs["metis"] = specialist("metis", TEKTON_SCRIPTED_TOKENS=str(SHORT_TOKENS))  # off, again
            procs["telos"] = specialist("telos", **otlp)
            sampled = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.05"}
            procs["sophia"] = specialist("sophia", **otlp, **sampled)
            procs["penia"] = specialist("penia", **otlp, **sampled)  # its callers decide
        if "rss" not in args.skip:
            procs["hermes"] = specialist(
                "hermes", TEKTON_SCRIPTED_TOKENS="30", TEKTON_SCRIPTED_TOKENS_PER_S="1"
            )
        http_port = free_port()
        if "bridge" not in args.skip:
            procs["gateway"] = launch(
                "gateway", ["-m", "tekton", "gateway", "--http", str(http_port), "--log-level", "warning"]
            )
        pids = {name: server_pid(p.pid) for name, p in procs.items()}
        assert server.process is not None
        pids["nats-server"] = server.process.pid
        results: dict[str, Any] = {}
        try:
            if "bus" not in args.skip:
                results["bus"] = asyncio.run(measure_bus(args, pids))
                if "tracing" not in args.skip:
                    results["tracing"] = asyncio.run(measure_tracing(args, pids))
            if "bridge" not in args.skip:
                results["bridge"] = asyncio.run(measure_bridge(args, pids, f"http://127.0.0.1:{http_port}"))
            if "aish" not in args.skip:
                results["aish"] = measure_aish(args)
            if "rss" not in args.skip:
                results["rss"] = asyncio.run(measure_rss(args, pids))
        finally:
            for name in procs:  # (not nats-server: EmbeddedNats stops it)
                os.kill(pids[name], signal.SIGTERM)  # the server itself; py-spy then writes its profile
            for proc in procs.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if sink is not None:
                sink.kill()
                sink.wait()
    rows = [row for part in results.values() for row in part["rows"]]
    print_table(rows)
    extra = {k: v for part in results.values() for k, v in part.items() if k != "rows"}
    print(json.dumps(extra, indent=2))
    figures = {
        "quick": args.quick,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
        **extra,
    }
    name = "hot_path-aish" if args.only_aish else "hot_path"
    path = write_results(f"{name}-quick" if args.quick else name, figures)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
