"""Session names and listing beside large sessions: this tree's gateway against a baseline's, same run.

    python -m bench.session_names [--baseline REV] [--quick]

For each gateway (this tree's, then the one at git revision REV, default the branch's merge base with
main, extracted with `git archive`), on a fresh nats-server with BIG sessions of ~900 KB in the bucket:
`get` of a small session by name, a named `create` and a `list`, sequential; then 200 named creates
and 100 lists at once (how many succeed within the client's 5 s timeout, and their p50/p99).

Prints the figures and writes bench/results/session_names.json.
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
from bus.errors import BusError
from bus.server import EmbeddedNats
from bus.settings import TektonSettings

BIG = 30
HERE = Path(__file__).resolve().parent.parent


async def measure(settings: TektonSettings, n: int) -> dict[str, Any]:
    async with Bus.connect(settings) as bus:
        api = bus.gateway
        for i in range(BIG):
            await api.create(name=f"big{i}", metadata={"pad": "p" * 900_000})
        await api.create(name="small")
        counter = iter(range(10**9))
        figures: dict[str, Any] = {
            "get_small_by_name_sequential": summary(await timed(lambda: api.get("small"), n)),
            "create_named_sequential": summary(await timed(lambda: api.create(name=f"s{next(counter)}"), n)),
            "list_sequential": summary(await timed(lambda: api.list(limit=1000), n)),
        }
        took: dict[str, list[float]] = {"create": [], "list": []}
        failed: dict[str, int] = {"create": 0, "list": 0}

        async def one(kind: str, i: int) -> None:
            start = time.perf_counter()
            try:
                if kind == "create":
                    await api.create(name=f"c{i}")
                else:
                    await api.list(limit=1000)
            except BusError:
                failed[kind] += 1
                return
            took[kind].append(time.perf_counter() - start)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, "create", i)
            for i in range(100):
                tg.start_soon(one, "list", i)
        figures["burst_200_creates_100_lists"] = {
            "wall_s": round(time.perf_counter() - start, 3),
            "creates_ok": len(took["create"]),
            "lists_ok": len(took["list"]),
            "failed": failed,
            "create": summary(took["create"]) if took["create"] else None,
            "list": summary(took["list"]) if took["list"] else None,
        }
        # Responsive afterwards? How long until a get answers again, then its latency.
        start = time.perf_counter()
        while True:
            try:
                await api.get("small")
                break
            except BusError:
                if time.perf_counter() - start > 120:
                    break
                await anyio.sleep(0.5)  # a retry's pause: it is busy, or gone
        figures["answering_again_after_burst_s"] = round(time.perf_counter() - start, 3)
        after: list[float] = []
        errors: list[str] = []
        for _ in range(20):
            began = time.perf_counter()
            try:
                await api.get("small")
                after.append(time.perf_counter() - began)
            except BusError as err:  # the baseline's gateway may be gone by now: that is the finding
                errors.append(err.message)
        figures["get_small_by_name_after_burst"] = summary(after) if after else None
        figures["get_after_burst_errors"] = sorted(set(errors))
    return figures


def run_gateway(src: Path, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        settings = TektonSettings(nats_url=server.url, data_dir=Path(tmp))
        env = {"TEKTON_NATS_URL": server.url, "TEKTON_CONFIG": "/nonexistent", "PYTHONPATH": str(src)}
        # Run from ``src`` too: `python -m` puts the working directory first on sys.path.
        argv = ["sh", "-c", f'cd "{src}" && exec "{sys.executable}" -m tekton gateway --log-level error']
        child = start_child(argv, env, "ready")
        try:
            return anyio.run(measure, settings, 20 if quick else 100)
        finally:
            child.terminate()
            child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--baseline", help="git revision of the baseline gateway (default: merge base with main)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    git = ["git", "-C", str(HERE)]
    baseline = (
        args.baseline or subprocess.check_output([*git, "merge-base", "HEAD", "main"], text=True).strip()
    )
    figures: dict[str, Any] = {"baseline_rev": baseline, "big_sessions": BIG}
    figures["this_tree"] = run_gateway(HERE, args.quick)
    write_results("session_names", figures)  # kept even if the baseline run fails
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run([*git, "archive", baseline], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        figures["baseline"] = run_gateway(Path(old), args.quick)
    path = write_results("session_names", figures)
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
