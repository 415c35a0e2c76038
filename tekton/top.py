"""`tekton top`: every specialist instance on the bus, live (rich), from its ``$SRV.STATS`` figures.

One row per replica: slots busy/free, queue, tokens per second since the last refresh, requests
served, errors, p99 of the first chunk over a recent window (the last 60 s by default), refreshed
each second. The p99 is PromQL's ``histogram_quantile(0.99, increase(...[60s]))``: the replica's
cumulative histogram now less the one top gathered a window ago (since top started, for its first
window), so it shows how the replica answers now, not over its lifetime; no first chunk in the
window: ``-``. Into a file or a pipe, each refresh is printed as a table of its own (like ``top -b``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import anyio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from bridge.metrics import BusFigures, endpoint_data, quantile
from bus.client import Bus


@dataclass(frozen=True)
class InstanceRow:
    specialist: str
    instance: str
    busy: int
    slots: int
    queued: int
    tokens_per_s: float | None
    served: int
    errors: int
    p99_first_chunk_ms: float | None


# Seconds of first chunks the p99 covers.
P99_WINDOW_S = 60.0

Buckets = list[list[Any]]


class TopModel:
    """Rows from successive gathers; rates come from the difference between two of them, the p99
    from the difference between now's first-chunk histogram and the one a window ago."""

    def __init__(self, p99_window_s: float = P99_WINDOW_S) -> None:
        self.p99_window_s = p99_window_s
        self._last: dict[str, tuple[float, float]] = {}  # instance -> (time, tokens out)
        self._histograms: dict[str, deque[tuple[float, Buckets]]] = {}  # instance -> gathered, oldest first

    def _p99(self, instance: str, now: float, buckets: Buckets) -> float | None:
        """The p99 of the first chunks since the newest gather at least a window old (or the oldest)."""
        kept = self._histograms.setdefault(instance, deque())
        kept.append((now, buckets))
        while len(kept) > 1 and kept[1][0] <= now - self.p99_window_s:
            kept.popleft()
        _, then = kept[0]
        before = {bound: count for bound, count in then}
        recent = [[bound, count - before.get(bound, 0.0)] for bound, count in buckets]
        return quantile(0.99, recent)

    def rows(self, stats: list[dict[str, Any]], now: float | None = None) -> list[InstanceRow]:
        now = time.monotonic() if now is None else now
        rows = []
        seen: dict[str, tuple[float, float]] = {}
        for answer in stats:
            data = endpoint_data(answer)
            instance = answer.get("id", "")
            tokens = float(data.get("tekton_tokens_out", 0.0))
            seen[instance] = (now, tokens)
            rate = None
            if instance in self._last and now > self._last[instance][0]:
                then, before = self._last[instance]
                rate = max(0.0, tokens - before) / (now - then)
            first = data.get("tekton_first_chunk_seconds")
            p99 = self._p99(instance, now, first["buckets"]) if isinstance(first, dict) else None
            rows.append(
                InstanceRow(
                    specialist=answer.get("name", "?"),
                    instance=instance,
                    busy=int(data.get("busy", 0)),
                    slots=int(data.get("slots", 0)),
                    queued=int(data.get("queued", 0)),
                    tokens_per_s=rate,
                    served=int(data.get("served", 0)),
                    errors=int(data.get("errors", 0)),
                    p99_first_chunk_ms=p99 * 1000 if p99 is not None else None,
                )
            )
        self._last = seen
        self._histograms = {i: h for i, h in self._histograms.items() if i in seen}  # replicas gone
        return rows


def table(
    rows: list[InstanceRow], url: str, p99_window_s: float = P99_WINDOW_S, at: str | None = None
) -> Table:
    """The view of ``rows``; ``at``: the time of the gather, in the title (for output kept in a file)."""
    busy = sum(r.busy for r in rows)
    slots = sum(r.slots for r in rows)
    when = f" · {at}" if at else ""
    t = Table(
        title=f"tekton top · {url}{when} · {len(rows)} instances · {busy}/{slots} slots busy", expand=False
    )
    for name, justify in [
        ("SPECIALIST", "left"),
        ("INSTANCE", "left"),
        ("BUSY", "right"),
        ("FREE", "right"),
        ("QUEUE", "right"),
        ("TOK/S", "right"),
        ("SERVED", "right"),
        ("ERRORS", "right"),
        (f"P99 1ST {p99_window_s:g}s", "right"),
    ]:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(
            r.specialist,
            r.instance[:8],
            str(r.busy),
            str(max(0, r.slots - r.busy)),
            f"[yellow]{r.queued}[/]" if r.queued else "0",
            f"{r.tokens_per_s:.0f}" if r.tokens_per_s is not None else "-",
            str(r.served),
            f"[red]{r.errors}[/]" if r.errors else "0",
            f"{r.p99_first_chunk_ms:.1f} ms" if r.p99_first_chunk_ms is not None else "-",
        )
    if not rows:
        t.caption = "no specialists are running on this bus (start them with `tekton up`)"
    return t


# Columns of a table written to a file or a pipe: wide enough that no name is cut short.
UNBOUNDED_WIDTH = 400


class _TopConsole(Console):
    def on_broken_pipe(self) -> None:
        """`tekton top | head`: the reader left; tekton's main stops quietly, as for any command (rich
        would exit 1)."""
        self.quiet = True
        raise BrokenPipeError


def top_console() -> Console:
    """Stdout; when it is no terminal (and $COLUMNS says no width), a row is as wide as it needs to be
    instead of rich's 80 columns."""
    console = _TopConsole()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = UNBOUNDED_WIDTH
    return console


async def run_top(
    bus: Bus,
    console: Console,
    *,
    interval: float = 1.0,
    iterations: int | None = None,
    p99_window_s: float = P99_WINDOW_S,
) -> list[InstanceRow]:
    """Refresh every ``interval`` seconds until cancelled, or ``iterations`` times; returns the last rows.

    On a terminal the table is redrawn in place. Anywhere else (``tekton top | cat``, ``> file``) each
    refresh is printed as it comes, like ``top -b``: a first, silent gather makes every printed one show
    rates."""
    figures, model = BusFigures(), TopModel(p99_window_s)
    window = min(0.3, interval / 2)
    live = Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else None
    if live is None:
        model.rows(await figures.refresh(bus, window=window))
        await anyio.sleep(interval)
    rows: list[InstanceRow] = []
    with live if live is not None else nullcontext():
        count = 0
        while iterations is None or count < iterations:
            rows = model.rows(await figures.refresh(bus, window=window))
            if live is not None:
                live.update(table(rows, bus.settings.nats_url, p99_window_s), refresh=True)
            else:
                console.print(table(rows, bus.settings.nats_url, p99_window_s, at=time.strftime("%H:%M:%S")))
            count += 1
            if iterations is None or count < iterations:
                await anyio.sleep(interval)
    return rows
