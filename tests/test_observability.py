"""Metrics per specialist (prometheus-client), gathered over NATS; `tekton top`; `/metrics` on `tekton up`."""

from __future__ import annotations

import io
import re
import sys
import urllib.request

import anyio
import pytest
from rich.console import Console

from bridge.metrics import endpoint_data, quantile
from bus.client import Bus
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from tekton.top import TopModel, run_top
from tests.helpers import child_env, env, eventually, in_process_specialists, spawn

pytestmark = pytest.mark.anyio


@pytest.mark.fast
def test_quantile_interpolates_like_promql() -> None:
    buckets = [["0.01", 0.0], ["0.1", 50.0], ["1.0", 100.0], ["+Inf", 100.0]]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 49 / 50)
    assert quantile(0.25, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert quantile(0.99, [["0.1", 0.0], ["+Inf", 0.0]]) is None
    assert quantile(0.99, [["0.1", 1.0], ["+Inf", 10.0]]) == 0.1  # beyond the last bound


def _stats(instance: str, first_chunks: list[list[object]]) -> dict[str, object]:
    """A replica's $SRV.STATS answer as it comes off the bus, with these cumulative buckets."""
    data = {"tekton_first_chunk_seconds": {"buckets": first_chunks, "sum": 0.0}, "slots": 2}
    return {"name": "apollo", "id": instance, "endpoints": [{"name": "chat", "data": data}]}


@pytest.mark.fast
def test_top_s_p99_covers_the_last_window_not_the_replica_s_lifetime() -> None:
    model = TopModel(p99_window_s=60)
    slow = [["0.01", 0.0], ["10.0", 100.0], ["+Inf", 100.0]]  # 100 slow first chunks, long ago
    [row] = model.rows([_stats("i1", slow)], now=0.0)
    assert row.p99_first_chunk_ms is None  # nothing since top started
    # 50 fast ones in the next 30 s: the p99 is theirs, the lifetime's slow ones left out.
    [row] = model.rows([_stats("i1", [["0.01", 50.0], ["10.0", 150.0], ["+Inf", 150.0]])], now=30.0)
    assert row.p99_first_chunk_ms == pytest.approx(10 * 0.99)
    # 80 s on, one slow one: the window (the gather at 0 s is over 60 s old) holds it and the fast ones.
    [row] = model.rows([_stats("i1", [["0.01", 50.0], ["10.0", 151.0], ["+Inf", 151.0]])], now=80.0)
    assert row.p99_first_chunk_ms == pytest.approx(10 + 9990 * (0.99 * 51 - 50))
    # 150 s: 60 s with nothing new.
    [row] = model.rows([_stats("i1", [["0.01", 50.0], ["10.0", 151.0], ["+Inf", 151.0]])], now=150.0)
    assert row.p99_first_chunk_ms is None


async def test_stats_carry_the_metrics(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        for prompt in ("one two", "three"):
            await bus.ask("apollo", prompt)
        [answer] = await bus.stats("apollo", window=0.5)
        data = endpoint_data(answer)
        assert data["tekton_requests"] == 2
        assert data["tekton_tokens_out"] == 7  # "apollo heard: one two" is 4 chunks, "... three" 3
        assert data["tekton_first_chunk_seconds"]["buckets"][-1] == ["+Inf", 2.0]
        assert data["tekton_total_seconds"]["buckets"][-1] == ["+Inf", 2.0]
        assert (data["slots"], data["busy"], data["queued"]) == (settings.max_concurrency, 0, 0)


async def test_an_answer_stopped_after_its_first_chunk_counts_its_wait_for_it(
    settings: TektonSettings,
) -> None:
    """tekton_first_chunk_seconds is every answer's wait for its first chunk, a cancelled one's too
    (before, only answers that reached ``done``: a slow model whose users give up looked fast)."""
    with env(TEKTON_SCRIPTED_TOKENS="500", TEKTON_SCRIPTED_TOKENS_PER_S="100"):
        async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
            async with bus.stream("apollo", [ChatMessage(role="user", content="long")]) as s:
                async for _ in s:
                    break  # the first chunk came: stop (the stream's exit cancels the answer)
            counters = services["apollo"].counters
            await eventually(lambda: counters.cancelled == 1 and counters.in_flight == 0)
            [answer] = await bus.stats("apollo", window=0.5)
    data = endpoint_data(answer)
    assert data["tekton_first_chunk_seconds"]["buckets"][-1] == ["+Inf", 1.0]
    assert data["tekton_total_seconds"]["buckets"][-1] == ["+Inf", 0.0]  # (it never reached done)


async def test_top_shows_busy_slots_queue_and_rate_under_load(settings: TektonSettings) -> None:
    settings = settings.model_copy(update={"max_concurrency": 2, "idle_timeout_s": 60})
    with env(TEKTON_SCRIPTED_TOKENS="2000", TEKTON_SCRIPTED_TOKENS_PER_S="100"):
        async with in_process_specialists(settings, "apollo", "athena"), Bus.connect(settings) as bus:
            streams = [bus.stream("apollo", [ChatMessage(role="user", content=f"q{i}")]) for i in range(5)]
            async with anyio.create_task_group() as tg:
                for s in streams:
                    await s.__aenter__()
                    tg.start_soon(_read, s)

                async def loaded() -> bool:
                    data = endpoint_data((await bus.stats("apollo", window=0.3))[0])
                    return bool(data["busy"] == 2 and data["queued"] == 3)

                await eventually(loaded, within=20)
                console = Console(record=True, width=120, file=io.StringIO(), force_terminal=False)
                rows = await run_top(bus, console, interval=0.5, iterations=3)
                tg.cancel_scope.cancel()
            for s in streams:
                await s.__aexit__(None, None, None)
    shown = console.export_text()
    by_name = {r.specialist: r for r in rows}
    assert (by_name["apollo"].busy, by_name["apollo"].slots, by_name["apollo"].queued) == (2, 2, 3)
    assert by_name["apollo"].tokens_per_s and by_name["apollo"].tokens_per_s > 0
    assert (by_name["athena"].busy, by_name["athena"].queued) == (0, 0)
    apollo_line = next(line for line in shown.splitlines() if line.lstrip("│ ").startswith("apollo"))
    cells = [c.strip() for c in apollo_line.strip("│ ").split("│")]
    assert cells[0] == "apollo" and cells[2:5] == ["2", "0", "3"], apollo_line
    assert re.fullmatch(r"\d+", cells[5]), apollo_line  # tok/s: a rate, not "-", by the last refresh
    # Apollo's two first chunks came before top started: none in its p99 window.
    assert cells[8] == "-" and by_name["apollo"].p99_first_chunk_ms is None, apollo_line
    assert "2 instances · 2/4 slots busy" in shown and "P99 1ST 60s" in shown  # the window, in the header


async def _read(stream) -> None:  # type: ignore[no-untyped-def]
    async for _ in stream:
        pass


def test_tekton_up_serves_the_bus_metrics(settings: TektonSettings) -> None:
    up = spawn(
        [
            sys.executable,
            "-m",
            "tekton",
            "up",
            "--metrics",
            "0",
            "--provider",
            "scripted",
            "--log-level",
            "warning",
        ],
        child_env(settings),
    )
    try:
        url = up.wait_for(lambda s: s.startswith("metrics of the whole bus on")).split()[-1]
        up.wait_for(lambda s: s.startswith("Tekton is up"))

        async def ask() -> None:
            async with Bus.connect(settings) as bus:
                await bus.ask("apollo", "count me")

        anyio.run(ask)
        # The histograms are written last, when the answer is done.
        pattern = re.compile(r'^tekton_total_seconds_count\{instance="\w+",specialist="apollo"\} 1\.0$', re.M)

        def scraped() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        async def counted() -> bool:
            return bool(pattern.search(await anyio.to_thread.run_sync(scraped)))

        anyio.run(eventually, counted, 15.0)
        text = scraped()
        assert re.search(r'tekton_requests_total\{instance="\w+",specialist="apollo"\} 1\.0', text)
        assert re.search(r'tekton_first_chunk_seconds_count\{instance="\w+",specialist="apollo"\} 1\.0', text)
        assert re.search(r'tekton_tokens_out_total\{instance="\w+",specialist="apollo"\} 4\.0', text)
        assert re.search(r'tekton_slots_busy\{instance="\w+",specialist="athena"\} 0\.0', text)
    finally:
        assert up.stop() == 0
