"""Durable runs benchmark: answers as durable runs (run subject + runs stream) against plain core-NATS
inbox streams, in the same run against the same specialist processes; then resume latency.

    python -m bench.runs [--quick] [--storage file|memory]

Specialists run as their own processes on the scripted provider at 0 ms, so only the bus is measured.
Plain and durable rounds alternate so drift on a shared machine hits both alike. Prints the figures
and writes bench/results/runs.json. Goals (issue 17): first chunk durable/plain <= 1.2, tokens/s
durable/plain >= 0.8, resume p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import concurrent, cpu_s, start_child, summary, write_results
from bench.stream import bus_tokens_per_s
from bus.client import Bus
from bus.runs import ensure_runs_stream
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions

PROMPT = [ChatMessage(role="user", content="hello")]


async def first_chunk(bus: Bus) -> float:
    async with bus.stream("apollo", PROMPT) as s:
        async for _ in s:
            pass
    assert s.first_chunk_at is not None
    return s.first_chunk_at - s.sent_at


async def resume_midway(bus: Bus, tokens: int, at_chunk: int, name: str = "athena") -> float:
    """Read an answer live up to its chunk ``at_chunk``, then resume it from the runs stream: seconds
    until the next chunk. Chunks, not tokens: a burst of tokens shares a chunk (at the scripted
    provider's unlimited rate most of an answer is one burst; at a model's pace each token is one)."""
    chunks = 0
    resumed_at = 0.0
    took = 0.0
    async with bus.stream(name, PROMPT, ChatOptions(max_tokens=tokens)) as s:
        async for _ in s:
            chunks += 1
            if resumed_at:
                took = time.perf_counter() - resumed_at
                resumed_at = 0.0
            if chunks == at_chunk:
                resumed_at = time.perf_counter()
                await s.resume()
    # Every token exactly once, across the resume (the done frame counts them).
    assert s.tokens == tokens and took, (s.tokens, took)
    return took


async def attach_finished(bus: Bus, run_id: str, after: int) -> float:
    start = time.perf_counter()
    async with bus.attach(run_id, after=after) as a:
        async for _ in a:
            return time.perf_counter() - start
    raise AssertionError("nothing after the resume point")


async def measure(url: str, data_dir: Path, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    seq_rounds, seq_n, width, conc_rounds, long_rounds, resumes = (
        (2, 50, 100, 3, 2, 30) if args.quick else (5, 200, 100, 10, 3, 200)
    )
    common = {"nats_url": url, "data_dir": data_dir, "idle_timeout_s": 30, **runs_stream(args)}
    plain_s = TektonSettings(runs=False, **common)
    durable_s = TektonSettings(runs=True, **common)
    samples: dict[str, dict[str, list[float]]] = {
        k: {"seq": [], "conc": [], "rate": []} for k in ("plain", "durable")
    }
    # CPU per request at 100 at once, per process: this client, nats-server, the specialist.
    cpu: dict[str, dict[str, float]] = {k: dict.fromkeys(("client", *pids), 0.0) for k in samples}
    async with Bus.connect(plain_s) as plain, Bus.connect(durable_s) as durable:
        buses = {"plain": plain, "durable": durable}
        for bus in buses.values():
            for _ in range(50):
                await first_chunk(bus)
        for _ in range(seq_rounds):
            for name, bus in buses.items():
                samples[name]["seq"] += [await first_chunk(bus) for _ in range(seq_n)]
        for _ in range(conc_rounds):
            for name, bus in buses.items():
                before = {"client": time.process_time(), **{k: cpu_s(p) for k, p in pids.items()}}
                samples[name]["conc"] += await concurrent(lambda b=bus: first_chunk(b), width, 1)
                after = {"client": time.process_time(), **{k: cpu_s(p) for k, p in pids.items()}}
                for k in before:
                    cpu[name][k] += after[k] - before[k]
        for _ in range(long_rounds):
            for name, bus in buses.items():
                samples[name]["rate"].append((await bus_tokens_per_s(bus, "athena"))[0])
        # Resumed after the first chunk (one token; the rest follows in bursts).
        midway = [await resume_midway(durable, args.resume_tokens, 1) for _ in range(resumes)]
        # At a model's pace (prometheus: 200 tokens/s, a chunk a token), resumed at 300 (1.5 s in).
        paced = [await resume_midway(durable, 600, 300, "prometheus") for _ in range(resumes // 5)]
        finished = await durable.ask("athena", "x", ChatOptions(max_tokens=args.resume_tokens))
        run = (await durable.runs())[-1]
        assert run.state == "done" and run.frames > 2, run
        attach = [await attach_finished(durable, run.run_id, run.frames // 2) for _ in range(resumes)]
        assert finished.text
    figures: dict[str, Any] = {}
    for name, s in samples.items():
        figures[name] = {
            "first_chunk_sequential": summary(s["seq"]),
            f"first_chunk_{width}_concurrent": summary(s["conc"]),
            "one_stream_tokens_per_s_median": round(statistics.median(s["rate"])),
            "one_stream_tokens_per_s_all": [round(r) for r in s["rate"]],
            f"cpu_us_per_request_{width}_concurrent": {
                k: round(v / (conc_rounds * width) * 1e6, 1) for k, v in cpu[name].items()
            },
        }
    p, d = figures["plain"], figures["durable"]
    key = f"first_chunk_{width}_concurrent"
    figures["ratios_durable_over_plain"] = {
        "first_chunk_sequential_p50": round(
            d["first_chunk_sequential"]["p50_ms"] / p["first_chunk_sequential"]["p50_ms"], 2
        ),
        "first_chunk_sequential_p99": round(
            d["first_chunk_sequential"]["p99_ms"] / p["first_chunk_sequential"]["p99_ms"], 2
        ),
        "first_chunk_concurrent_p50": round(d[key]["p50_ms"] / p[key]["p50_ms"], 2),
        "first_chunk_concurrent_p99": round(d[key]["p99_ms"] / p[key]["p99_ms"], 2),
        "tokens_per_s": round(d["one_stream_tokens_per_s_median"] / p["one_stream_tokens_per_s_median"], 2),
    }
    figures["runs_stream_storage"] = args.storage
    figures["resume"] = {
        "answer_tokens": args.resume_tokens,
        "resume_midway_to_next_chunk": summary(midway),
        "paced_200_tokens_per_s_resume_at_300_of_600": summary(paced),
        "attach_finished_run_to_first_chunk": summary(attach),
    }
    figures["long_stream_tokens"] = args.long_tokens
    return figures


async def create_stream(url: str, data_dir: Path, args: argparse.Namespace) -> None:
    settings = TektonSettings(nats_url=url, data_dir=data_dir, **runs_stream(args))
    async with Bus.connect(settings) as bus:
        await ensure_runs_stream(bus.nc, settings)


def runs_stream(args: argparse.Namespace) -> dict[str, Any]:
    """The runs stream's settings for ``--storage`` (memory: a smaller byte cap, which nats-server
    reserves out of its memory store)."""
    if args.storage == "memory":
        return {"runs_storage": "memory", "runs_max_bytes": 64 * 1024 * 1024}
    return {"runs_storage": "file"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--long-tokens", type=int, default=100_000)
    parser.add_argument("--resume-tokens", type=int, default=1000, help="length of the resumed answers")
    parser.add_argument("--storage", choices=["file", "memory"], default="file", help="the runs stream's")
    args = parser.parse_args()
    if args.quick:
        args.long_tokens = min(args.long_tokens, 20_000)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        base = {
            "TEKTON_NATS_URL": server.url,
            "TEKTON_MAX_CONCURRENCY": "512",
            "TEKTON_CONFIG": "/nonexistent",
            **{f"TEKTON_{k.upper()}": str(v) for k, v in runs_stream(args).items()},
        }
        argv = [py, "-m", "tekton", "specialist", "--provider", "scripted", "--log-level", "warning"]
        children = [
            start_child([*argv[:4], "apollo", *argv[4:]], {**base, "TEKTON_SCRIPTED_TOKENS": "8"}, "ready"),
            start_child(
                [*argv[:4], "athena", *argv[4:]],
                {**base, "TEKTON_SCRIPTED_TOKENS": str(args.long_tokens)},
                "ready",
            ),
            start_child(
                [*argv[:4], "prometheus", *argv[4:]],
                {**base, "TEKTON_SCRIPTED_TOKENS": "600", "TEKTON_SCRIPTED_TOKENS_PER_S": "200"},
                "ready",
            ),
        ]
        try:
            assert server.process is not None
            pids = {"nats_server": server.process.pid, "specialist_apollo": children[0].pid}
            # The gateway is not part of this bench; the stream is created as the gateway would.
            anyio.run(create_stream, server.url, Path(tmp), args)
            figures = anyio.run(measure, server.url, Path(tmp), args, pids)
        finally:
            for child in children:
                child.terminate()
                child.wait(30)
    figures["quick"] = args.quick
    path = write_results("runs" if args.storage == "file" else "runs_memory", figures)
    print(
        json.dumps(
            {k: figures[k] for k in ("plain", "durable", "ratios_durable_over_plain", "resume")}, indent=1
        )
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
