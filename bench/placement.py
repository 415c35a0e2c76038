"""Placement under a burst larger than all the slots, with replicas of different sizes.

    python -m bench.placement [--quick]

Three replicas of one specialist on a real nats-server, in this process: 8 slots, 1 and 1 (a big
machine and two small ones), each answer ~0.5 s (the scripted provider, 20 tokens at 40 a second:
waiting, not CPU). A burst of N requests at once, N = 30 and 60 (3x and 6x the 10 slots): when does
the last answer end (the makespan), and the median, against the ideal (N / 10 rounds of 0.5 s). Two
placements in the same run: ``slots`` (specialists/placement.py, the default) and ``random`` (NATS's
queue group alone, ``TEKTON_PLACEMENT=random``: the baseline). Which replica is the anchor (the one
that stays in the queue group when full) is up to the ids drawn; the figures name its size.

Prints the figures and writes bench/results/placement.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from bench.common import write_results
from bus.client import Bus
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from specialists.runtime import serve_specialists

SLOTS = (8, 1, 1)
ANSWER_S = 0.5
TOKENS, TOKENS_PER_S = "20", "40"


async def burst(bus: Bus, n: int) -> list[float]:
    """``n`` requests at once; when each answer ended, from the burst's start."""
    ends: list[float] = []
    start = time.monotonic()

    async def one(i: int) -> None:
        await bus.ask("sophia", f"q{i}")
        ends.append(time.monotonic() - start)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return sorted(ends)


async def replica(stack: AsyncExitStack, settings: TektonSettings) -> Any:
    stop = anyio.Event()
    tg = await stack.enter_async_context(anyio.create_task_group())
    stack.callback(stop.set)
    [service] = await tg.start(
        lambda task_status: serve_specialists(settings, ["sophia"], stop=stop, task_status=task_status)
    )
    return service


async def measure(url: str, tmp: str, placement: str, sizes: tuple[int, ...], rounds: int) -> dict[str, Any]:
    base = TektonSettings(
        nats_url=url, data_dir=Path(tmp) / placement, provider="scripted", placement=placement
    )
    out: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        services = [await replica(stack, base.model_copy(update={"max_concurrency": s})) for s in SLOTS]
        if placement == "slots":
            deadline = time.monotonic() + 10
            while not all(len(s.placement.peers) == len(SLOTS) - 1 for s in services):
                if time.monotonic() > deadline:
                    raise RuntimeError("the replicas did not hear each other")
                await anyio.sleep(0.05)
            out["anchor_slots"] = next(s.placement.slots for s in services if s.placement.is_anchor())
        bus = await stack.enter_async_context(Bus.connect(base))
        for n in sizes:
            makespans, medians = [], []
            for _ in range(rounds):
                ends = await burst(bus, n)
                makespans.append(round(ends[-1], 2))
                medians.append(round(statistics.median(ends), 2))
                await anyio.sleep(1.0)  # (every replica idle again, and said so)
            out[str(n)] = {"makespan_s": makespans, "median_s": medians}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 30 (a smoke run)")
    args = parser.parse_args()
    os.environ["TEKTON_SCRIPTED_TOKENS"], os.environ["TEKTON_SCRIPTED_TOKENS_PER_S"] = TOKENS, TOKENS_PER_S
    sizes, rounds = ((30,), 1) if args.quick else ((30, 60), 3)
    results: dict[str, Any] = {"slots_per_replica": SLOTS, "answer_s": ANSWER_S}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        for placement in ("slots", "random"):
            results[placement] = anyio.run(measure, server.url, tmp, placement, sizes, rounds)
    rows = []
    for n in sizes:
        ideal = n / sum(SLOTS) * ANSWER_S
        for placement in ("slots", "random"):
            got = results[placement][str(n)]
            rows.append(
                {
                    "what": f"{n} at once, placement {placement}",
                    "makespan_s": statistics.median(got["makespan_s"]),
                    "median_s": statistics.median(got["median_s"]),
                    "ideal_makespan_s": ideal,
                    "vs_ideal": round(statistics.median(got["makespan_s"]) / ideal, 2),
                }
            )
    results["rows"] = rows
    anchor = results["slots"].get("anchor_slots")
    print(f"replicas of {SLOTS} slots, answers of {ANSWER_S} s; the anchor has {anchor} slots")
    for row in rows:
        print(
            f"{row['what']:<32} makespan {row['makespan_s']:5.2f} s (ideal {row['ideal_makespan_s']:.2f}, "
            f"{row['vs_ideal']}x)  median {row['median_s']:.2f} s"
        )
    path = write_results("placement-quick" if args.quick else "placement", results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
