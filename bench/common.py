"""Shared bits for the benchmarks: percentiles, a free port, child processes, writing results."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

RESULTS = Path(__file__).parent / "results"


_libc = ctypes.CDLL(None, use_errno=True)


def cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` (all its threads, living and ended) has used so far, to the
    nanosecond: its CPU-time clock (``clock_getcpuclockid``). /proc's user and system times count in
    10 ms ticks, a few per cent of a round's figure; the /proc figure is the fallback."""
    clock = ctypes.c_int()
    getclock = getattr(_libc, "clock_getcpuclockid", None)
    if getclock is not None and getclock(pid, ctypes.byref(clock)) == 0:
        try:
            return time.clock_gettime(clock.value)
        except OSError:
            pass  # the process is gone, or the clock cannot be read from here
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """``call`` awaited ``n`` times one after another; each one's seconds."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        took.append(time.perf_counter() - start)
    return took


async def concurrent(fn: Callable[[], Awaitable[float]], width: int, rounds: int) -> list[float]:
    """``rounds`` times, ``width`` calls of ``fn`` at once; every value they return."""
    samples: list[float] = []

    async def one() -> None:
        samples.append(await fn())

    for _ in range(rounds):
        async with anyio.create_task_group() as tg:
            for _ in range(width):
                tg.start_soon(one)
    return samples


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_child(
    argv: list[str], env: dict[str, str], ready: str, timeout: float = 60
) -> subprocess.Popen[str]:
    """Start a child and wait for a stdout line starting with ``ready``."""
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(ready):
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{argv} did not print {ready!r}")


def write_results(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    figures = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        **figures,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return path
