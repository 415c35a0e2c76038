"""Fairness benchmark: what a stream at full speed costs everyone else on its specialist, and itself.

    python -m bench.fairness [--quick]

A specialist process on the scripted provider at full speed. In the same run, two builds of it: the
specialist as it is (a stream yields the event loop every ``SLICE_S`` of producing, and sends the
slice's tokens as one chunk frame) and, as the baseline, the same code with that yielding turned off.
Measured with a plain nats-py client:

- one stream's throughput (tokens/s), to show what yielding costs;
- while such a stream floods, how long another request waits for its ``start`` frame (p50/p99), and
  whether its cancel (sent once that start arrived) stops it before its end.

Prints the figures and writes bench/results/fairness.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgpack
import nats

from bench.common import free_port, pct, start_child, summary, write_results
from bus.server import EmbeddedNats
from bus.subjects import cancel_subject

# Runs `tekton specialist apollo` with the slice of specialists.service set to ``slice_s`` seconds.
LAUNCH = (
    "import sys, specialists.service as s; s.SLICE_S = float(sys.argv[1]); "
    "from tekton.cli import main; sys.exit(main(sys.argv[2:]))"
)


def request(request_id: str, max_tokens: int) -> bytes:
    body = {"v": 1, "id": request_id, "messages": [{"role": "user", "content": "go"}]}
    return msgpack.packb({**body, "options": {"max_tokens": max_tokens}})


async def throughput(nc: Any, tokens: int) -> float:
    sub = await nc.subscribe(nc.new_inbox(), pending_msgs_limit=10_000_000, pending_bytes_limit=-1)
    start = time.perf_counter()
    await nc.publish("tekton.ai.apollo.chat", request(f"t{time.monotonic_ns()}", tokens), reply=sub.subject)
    while True:
        frame = msgpack.unpackb((await sub.next_msg(timeout=60)).data)
        if frame["type"] in ("done", "error"):
            break
    took = time.perf_counter() - start
    await sub.unsubscribe()
    return tokens / took


async def start_delay(nc: Any, tokens: int) -> tuple[float, bool]:
    """Seconds until another request's start frame while a flood runs; whether the flood's cancel
    (sent once that start arrived) stopped it before its end."""
    flood_id = f"f{time.monotonic_ns()}"
    flood = await nc.subscribe(nc.new_inbox(), pending_msgs_limit=10_000_000, pending_bytes_limit=-1)
    other = await nc.subscribe(nc.new_inbox())
    await nc.publish("tekton.ai.apollo.chat", request(flood_id, tokens), reply=flood.subject)
    await flood.next_msg(timeout=60)  # start: it is generating
    sent = time.perf_counter()
    await nc.publish("tekton.ai.apollo.chat", request(f"o{time.monotonic_ns()}", 1), reply=other.subject)
    await other.next_msg(timeout=60)
    waited = time.perf_counter() - sent
    await nc.publish(cancel_subject(flood_id), b"")
    await nc.flush()
    while True:
        frame = msgpack.unpackb((await flood.next_msg(timeout=60)).data)
        if frame["type"] in ("done", "error"):
            break
    await flood.unsubscribe()
    await other.unsubscribe()
    return waited, frame.get("code") == "cancelled"


async def measure(url: str, slice_s: float, args: argparse.Namespace) -> dict[str, Any]:
    env = {"TEKTON_NATS_URL": url, "TEKTON_CONFIG": "/nonexistent", "TEKTON_SCRIPTED_TOKENS": "10000000"}
    argv = [sys.executable, "-c", LAUNCH, str(slice_s), "specialist", "apollo", "--provider", "scripted"]
    child = start_child([*argv, "--log-level", "warning"], env, "ready apollo")
    try:
        nc = await nats.connect(url)
        try:
            rates = [await throughput(nc, args.tokens) for _ in range(args.rounds)]
            delays, stopped = [], 0
            for _ in range(args.rounds):
                waited, cancelled = await start_delay(nc, args.tokens)
                delays.append(waited)
                stopped += cancelled
        finally:
            await nc.close()
    finally:
        child.terminate()
        child.wait()
    return {
        "slice_s": slice_s,
        "stream_tokens_per_s": {"p50": round(pct(rates, 50)), "min": round(min(rates))},
        "other_start_during_flood": summary(delays),
        "floods_stopped_by_cancel": f"{stopped}/{args.rounds}",
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "store", port=free_port())
        server.start()
        try:
            from specialists.service import SLICE_S

            baseline = await measure(server.url, 1e9, args)  # never yields
            now = await measure(server.url, SLICE_S, args)
            others = [await measure(server.url, slice_s, args) for slice_s in args.compare]
        finally:
            server.stop()
    figures = {
        "tokens_per_stream": args.tokens,
        "rounds": args.rounds,
        "yielding": now,
        "baseline_no_yielding": baseline,
        "other_slices": others,
        "throughput_ratio": round(
            now["stream_tokens_per_s"]["p50"] / baseline["stream_tokens_per_s"]["p50"], 3
        ),
        "other_start_p50_ratio": round(
            now["other_start_during_flood"]["p50_ms"] / baseline["other_start_during_flood"]["p50_ms"], 4
        ),
    }
    rows = [("baseline (no yielding)", baseline), (f"slice {SLICE_S * 1000:g} ms", now)]
    rows += [(f"slice {f['slice_s'] * 1000:g} ms", f) for f in others]
    for label, f in rows:
        d = f["other_start_during_flood"]
        print(
            f"{label:<24} stream {f['stream_tokens_per_s']['p50']:>8} tokens/s  "
            f"other start p50 {d['p50_ms']:8.2f} ms p99 {d['p99_ms']:8.2f} ms  "
            f"floods stopped by cancel {f['floods_stopped_by_cancel']}"
        )
    print(f"throughput ratio (yielding / baseline): {figures['throughput_ratio']}")
    print(f"wrote {write_results('fairness', figures)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens of one flood")
    parser.add_argument(
        "--compare", type=float, nargs="*", default=[], metavar="S", help="also measure slices of S seconds"
    )
    parsed = parser.parse_args()
    parsed.rounds = 3 if parsed.quick else 10
    anyio.run(main, parsed)
