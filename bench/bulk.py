"""Bulk fan-out against running the same requests one after another, in one run.

    python -m bench.bulk [--quick] [--no-local]

- k = 2, 4, 8 independent operations through the gateway's bulk request versus the same k requests
  sent one by one, on 8 replicas of a scripted specialist with a realistic first-token delay and
  token rate. Speedup = one-by-one time / bulk time; the gateway's overhead = bulk time against the
  ideal (the slowest single operation, measured in the one-by-one run).
- A three-stage pipeline with a parallel first stage, `{a|b|c} | d | e`, as a bulk graph versus the
  five requests one by one.
- The real local model (SmolLM2-135M) with k = 2 on 2 replica processes, 1 thread each.

Prints the figures and writes bench/results/bulk.json.
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

from bench.common import start_child, write_results
from bus.bulk import BulkOperation, BulkPlan
from bus.client import Bus
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions

FIRST_TOKEN_MS = 150
TOKENS_PER_S = 60
TOKENS = 30


async def one_by_one(
    bus: Bus, asks: list[tuple[str, str]], options: ChatOptions
) -> tuple[float, list[float]]:
    """Each request after the previous one ended: total wall time and each request's own."""
    each = []
    start = time.perf_counter()
    for name, message in asks:
        began = time.perf_counter()
        async with bus.stream(name, [ChatMessage(role="user", content=message)], options) as s:
            async for _ in s:
                pass
        each.append(time.perf_counter() - began)
    return time.perf_counter() - start, each


async def through_bulk(bus: Bus, plan: BulkPlan) -> float:
    start = time.perf_counter()
    async with bus.bulk(plan, idle_timeout=60) as bulk:
        done = await bulk.result()
    if done.status != "ok":
        raise RuntimeError(f"bulk run failed: {[r.error for r in done.operations if r.error]}")
    return time.perf_counter() - start


async def fan_out(bus: Bus, name: str, ks: list[int], rounds: int, options: ChatOptions) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for k in ks:
        seq_s, bulk_s, ideal_s = [], [], []
        for r in range(rounds):
            asks = [(name, f"question {r}.{i}") for i in range(k)]
            total, each = await one_by_one(bus, asks, options)
            seq_s.append(total)
            ideal_s.append(max(each))
            plan = BulkPlan(
                operations=[
                    BulkOperation(id=f"q{i}", ai=name, message=m, options=options)
                    for i, (_, m) in enumerate(asks)
                ]
            )
            bulk_s.append(await through_bulk(bus, plan))
        seq, bulk, ideal = statistics.median(seq_s), statistics.median(bulk_s), statistics.median(ideal_s)
        figures[f"k={k}"] = {
            "one_by_one_s": round(seq, 3),
            "bulk_s": round(bulk, 3),
            "ideal_s": round(ideal, 3),
            "speedup": round(seq / bulk, 2),
            "speedup_over_k": round(seq / bulk / k, 3),
            "overhead_vs_ideal_pct": round((bulk - ideal) / ideal * 100, 1),
        }
    return figures


async def three_stages(bus: Bus, name: str, rounds: int, options: ChatOptions) -> dict[str, Any]:
    """`{a|b|c} | d | e` on one specialist name: 5 requests one by one, or 3 stages as a graph."""
    seq_s, bulk_s = [], []
    for r in range(rounds):
        total, _ = await one_by_one(bus, [(name, f"stage {r}.{i}") for i in range(5)], options)
        seq_s.append(total)
        plan = BulkPlan(
            operations=[
                BulkOperation(id="a", ai=name, message=f"a {r}", options=options),
                BulkOperation(id="b", ai=name, message=f"b {r}", options=options),
                BulkOperation(id="c", ai=name, message=f"c {r}", options=options),
                BulkOperation(id="d", ai=name, message="join: {a} {b} {c}", options=options),
                BulkOperation(id="e", ai=name, message="finish: {d}", options=options),
            ]
        )
        bulk_s.append(await through_bulk(bus, plan))
    seq, bulk = statistics.median(seq_s), statistics.median(bulk_s)
    return {
        "one_by_one_s": round(seq, 3),
        "bulk_s": round(bulk, 3),
        "speedup": round(seq / bulk, 2),
        "faster_pct": round((seq / bulk - 1) * 100, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--no-local", action="store_true", help="skip the local model")
    args = parser.parse_args()
    rounds = 1 if args.quick else 5
    py = sys.executable
    quiet = ["--log-level", "warning"]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        settings = TektonSettings(nats_url=server.url, data_dir=Path(tmp))
        env = {"TEKTON_NATS_URL": server.url, "TEKTON_CONFIG": "/nonexistent"}
        scripted = {
            **env,
            "TEKTON_SCRIPTED_FIRST_TOKEN_MS": str(FIRST_TOKEN_MS),
            "TEKTON_SCRIPTED_TOKENS_PER_S": str(TOKENS_PER_S),
            "TEKTON_SCRIPTED_TOKENS": str(TOKENS),
        }
        children = [
            start_child([py, "-m", "tekton", "gateway", *quiet], env, "ready"),
            start_child(
                [
                    py,
                    "-m",
                    "tekton",
                    "specialist",
                    "apollo",
                    "--replicas",
                    "8",
                    "--provider",
                    "scripted",
                    *quiet,
                ],
                scripted,
                "ready apollo x8",
                timeout=120,
            ),
        ]
        figures: dict[str, Any] = {
            "scripted": {
                "replicas": 8,
                "first_token_ms": FIRST_TOKEN_MS,
                "tokens_per_s": TOKENS_PER_S,
                "tokens": TOKENS,
                "rounds": rounds,
            }
        }

        async def scripted_run() -> None:
            async with Bus.connect(settings) as bus:
                await through_bulk(
                    bus, BulkPlan(operations=[BulkOperation(id="warm", ai="apollo", message="x")])
                )
                figures["independent"] = await fan_out(bus, "apollo", [2, 4, 8], rounds, ChatOptions())
                figures["three_stage_pipeline"] = await three_stages(bus, "apollo", rounds, ChatOptions())

        try:
            anyio.run(scripted_run)
        finally:
            for child in children[1:]:
                child.terminate()
                child.wait()
        if not args.no_local:
            local_env = {**env, "TEKTON_LOCAL_THREADS": "1"}
            local = start_child(
                [py, "-m", "tekton", "specialist", "sophia", "--replicas", "2", *quiet],
                local_env,
                "ready sophia x2",
                timeout=120,
            )

            async def local_run() -> None:
                async with Bus.connect(settings) as bus:
                    options = ChatOptions(max_tokens=48, temperature=0)
                    await bus.ask("sophia", "warm up", options)
                    figures["local_model"] = {
                        "replicas": 2,
                        "threads_each": 1,
                        "max_tokens": 48,
                        **(await fan_out(bus, "sophia", [2], max(1, rounds // 2), options)),
                    }

            try:
                anyio.run(local_run)
            finally:
                local.terminate()
                local.wait()
        children[0].terminate()
        children[0].wait()
    figures["targets"] = {
        "overhead_vs_ideal_pct_lt": 5,
        "speedup_over_k_ge_while_k_le_replicas": 0.9,
        "three_stage_faster_pct_ge": 50,
    }
    path = write_results("bulk", figures)
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
