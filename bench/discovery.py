"""Discovery and routing: how long finding the running specialists takes with 8, 16 and 64 instances,
how long a routing decision takes, and how accurate each text router is on tests/data/routing.jsonl.

    python -m bench.discovery [--quick]

- survey, count-stopped: `$SRV.INFO` + `$SRV.STATS` gathered at once, stopping when as many instances
  answered as last time (what the gateway's refresh does).
- survey, stall-stopped: the same, stopping 10 ms after the last answer (a first or thorough look).
- gateway discover: a client asking the gateway, which answers from its refreshed cache.
- routing decisions through the gateway: by capability and by text (@auto).

Prints the figures and writes bench/results/discovery.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import start_child, summary, timed, write_results
from bus.client import Bus
from bus.discovery import aggregate, survey
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from gateway.routing import matcher
from specialists.roster import load_roster

LABELLED = Path(__file__).parents[1] / "tests" / "data" / "routing.jsonl"
NAMES = ["apollo", "athena", "prometheus", "rhetor", "metis", "sophia", "telos", "penia"]


def accuracy() -> dict[str, Any]:
    infos = [
        {"name": s.name, "id": s.name, "description": s.description, "metadata": s.micro_metadata("", "")}
        for s in load_roster().values()
    ]
    views = aggregate(infos, [])
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    figures: dict[str, Any] = {"requests": len(rows)}
    for method in ("lexical", "embedding", "hybrid"):
        match = matcher(method, views)  # type: ignore[arg-type]
        right = {"dev": 0, "test": 0}
        took = []
        for row in rows:
            start = time.perf_counter()
            scores = match.scores(row["text"])
            took.append(time.perf_counter() - start)
            right[row["split"]] += max(scores, key=lambda n: scores[n]) == row["specialist"]
        per = {split: sum(r["split"] == split for r in rows) for split in right}
        figures[method] = {
            "accuracy_all": round(sum(right.values()) / len(rows), 3),
            "accuracy_dev": round(right["dev"] / per["dev"], 3),
            "accuracy_held_out": round(right["test"] / per["test"], 3),
            "score_one_request": summary(took),
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    n = 50 if args.quick else 300
    py = sys.executable
    quiet = ["--log-level", "warning"]
    figures: dict[str, Any] = {"accuracy": accuracy()}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        settings = TektonSettings(nats_url=server.url, data_dir=Path(tmp))
        env = {"TEKTON_NATS_URL": server.url, "TEKTON_CONFIG": "/nonexistent"}
        children: list[subprocess.Popen[str]] = [
            start_child([py, "-m", "tekton", "gateway", *quiet], env, "ready")
        ]
        try:
            running = 0
            for target in (8, 16, 64):
                while running < target:  # one process serves 8 specialist instances
                    children.append(
                        start_child(
                            [py, "-m", "tekton", "specialist", *NAMES, "--provider", "scripted", *quiet],
                            env,
                            "ready",
                            timeout=120,
                        )
                    )
                    running += len(NAMES)
                figures[f"instances={target}"] = anyio.run(measure, settings, target, n)
        finally:
            for child in children:
                child.terminate()
                child.wait()
    figures["targets"] = {"discovery_p50_ms_lt_at_16": 5.0, "routing_accuracy_ge": 0.95}
    path = write_results("discovery", figures)
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


async def measure(settings: TektonSettings, instances: int, n: int) -> dict[str, Any]:
    async with Bus.connect(settings) as bus:
        # Wait until every instance (and the gateway) answers, then measure.
        with anyio.fail_after(30):
            while True:
                views, answered = await survey(bus.nc, window=0.5, stall=0.05)
                if sum(len(v.instances) for v in views) >= instances:
                    break
        counted = await timed(lambda: survey(bus.nc, expected=answered, window=0.5), n)
        stalled = await timed(lambda: survey(bus.nc, window=0.5), max(10, n // 5))
        await bus.gateway.discover(refresh=True)
        cached = await timed(lambda: bus.gateway.discover(), n)
        by_capability = await timed(lambda: bus.gateway.discover(capability="planning"), n)
        by_text = await timed(lambda: bus.gateway.discover(text="how much will the GPUs cost us?"), n)
        return {
            "micro_services_answering": answered,
            "survey_count_stopped": summary(counted),
            "survey_stall_stopped": summary(stalled),
            "gateway_discover_cached": summary(cached),
            "route_by_capability": summary(by_capability),
            "route_by_text": summary(by_text),
        }


if __name__ == "__main__":
    sys.exit(main())
