"""Discovery and routing on a real nats-server: capability ranking, text routing, health, fallback."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import anyio
import pytest

from bus.client import Bus
from bus.discovery import aggregate
from bus.errors import BadRequest
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from gateway.routing import Method, matcher
from specialists.roster import load_roster
from tests.helpers import (
    child_env,
    in_process_gateway,
    in_process_specialists,
    run_aish,
    spawn,
    specialist_process,
)

TEKTON = [sys.executable, "-m", "tekton"]

pytestmark = pytest.mark.anyio

LABELLED = Path(__file__).parent / "data" / "routing.jsonl"


def roster_views() -> list:  # type: ignore[type-arg]
    infos = [
        {
            "name": s.name,
            "id": f"{s.name}-1",
            "description": s.description,
            "metadata": s.micro_metadata("x", "m"),
        }
        for s in load_roster().values()
    ]
    return aggregate(infos, [])


def accuracy(method: Method, split: str | None = None) -> float:
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    rows = [r for r in rows if split is None or r["split"] == split]
    match = matcher(method, roster_views())
    right = 0
    for row in rows:
        scores = match.scores(row["text"])
        right += max(scores, key=lambda n: scores[n]) == row["specialist"]
    return right / len(rows)


def test_the_default_text_router_is_the_better_one_measured() -> None:
    rows = LABELLED.read_text().splitlines()
    assert len(rows) >= 80
    lexical, embedding = accuracy("lexical"), accuracy("embedding")
    assert lexical >= embedding
    assert TektonSettings().routing_method == "lexical"
    # The held-out half was not used to write the profiles' keywords.
    assert accuracy("lexical", "test") >= 0.8
    assert lexical >= 0.88


def write_roster(tmp_path: Path, name: str, change: dict[str, str]) -> Path:
    text = (Path(__file__).parents[1] / "deploy" / "roster.toml").read_text()
    for old, new in change.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_capability_ranking_threshold_and_nearest(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "prometheus", "metis", "apollo"),
        Bus.connect(settings) as bus,
    ):
        reply = await bus.gateway.discover(capability="planning")
        assert [r.name for r in reply.ranked] == ["prometheus", "metis"]
        assert reply.chosen == "prometheus" and reply.alternatives == []
        assert "planning 0.95 x health" in reply.reason
        assert {v.name for v in reply.specialists} == {"prometheus", "metis"}
        low = await bus.gateway.discover(capability="prioritization")  # only metis, 0.7 x health < 0.7
        assert low.chosen is None and "no specialist scores 0.7 or more" in low.reason
        assert low.ranked[0].name == "metis"
        with pytest.raises(BadRequest, match="nearest: code-analysis"):
            await bus.gateway.discover(capability="code-analisys")
        refused = await run_aish(settings, "-c", '@prioritization << "sort these"')
        assert refused.returncode == 1 and "no specialist scores 0.7" in refused.stderr
        listed = await run_aish(settings, "list", "--capability", "planning")
        assert listed.stdout.splitlines()[0].startswith("* prometheus")


async def test_routed_requests_in_aish(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings):
        plain = await run_aish(settings, "how much will our GPU cluster cost per month?")
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.startswith("penia heard:") and "@auto -> penia" in plain.stderr
        cap = await run_aish(settings, "-c", 'echo "the stack trace" | @code-analysis | @writing')
        assert cap.stdout == "rhetor heard: apollo heard: the stack trace\n", cap.stderr
        assert "@code-analysis -> apollo" in cap.stderr and "@writing -> rhetor" in cap.stderr
        flag = await run_aish(settings, "--capability", "requirements", "what is done?")
        assert flag.stdout.startswith("telos heard:")
        fan = await run_aish(settings, "-c", '@planning,@cost-analysis << "the launch"')
        assert fan.stdout.splitlines() == [
            "── prometheus ──",
            "prometheus heard: the launch",
            "── penia ──",
            "penia heard: the launch",
        ]


async def test_a_failing_specialist_loses_rank_and_routing_falls_back(settings: TektonSettings) -> None:
    lenient = settings.model_copy(update={"routing_threshold": 0.5})
    # A real provider pointed at a port where nothing listens: every request fails before a token.
    broken = child_env(lenient, TEKTON_OPENAI_BASE_URL="http://127.0.0.1:9/v1", TEKTON_OPENAI_API_KEY="test")
    argv = [*TEKTON, "specialist", "prometheus", "--provider", "openai", "--log-level", "warning"]
    async with in_process_gateway(lenient), in_process_specialists(lenient, "metis"):
        child = spawn(argv, broken)
        try:
            child.wait_for(lambda line: line.startswith("ready "))
            first = await run_aish(lenient, "-c", '@planning << "plan it"')
            assert first.returncode == 0, first.stderr
            assert first.stdout == "metis heard: plan it\n"
            assert "@planning -> prometheus" in first.stderr
            assert "prometheus failed before answering" in first.stderr and "trying metis" in first.stderr
            async with Bus.connect(lenient) as bus:
                for _ in range(9):
                    with pytest.raises(Exception, match="cannot reach"):
                        await bus.ask("prometheus", "x")
                reply = await bus.gateway.discover(capability="planning", refresh=True)
            assert reply.chosen == "metis", reply.ranked
            prometheus = next(v for v in reply.specialists if v.name == "prometheus")
            assert prometheus.errors == 10 and prometheus.health < 0.7
        finally:
            child.stop()


async def test_replicas_with_different_metadata_are_reported(
    settings: TektonSettings, tmp_path: Path
) -> None:
    other = write_roster(tmp_path, "other.toml", {"code-analysis = 0.95": "code-analysis = 0.5"})
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_specialists(settings.model_copy(update={"roster": other}), "apollo"),
        Bus.connect(settings) as bus,
    ):
        views = await bus.survey()
    (apollo,) = views
    assert len(apollo.instances) == 2
    assert (
        len(apollo.conflicts) == 1
        and "differs" in apollo.conflicts[0]
        and "capabilities" in apollo.conflicts[0]
    )


async def test_a_specialist_that_stops_answering_does_not_stall_discovery(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        with specialist_process(settings, "athena") as (child, _):
            assert {v.name for v in await bus.survey()} == {"apollo", "athena"}
            os.kill(child.process.pid, signal.SIGSTOP)  # alive, subscribed, silent
            try:
                with anyio.fail_after(5):  # a hang guard: the gather window bounds it, not the silent one
                    names = {v.name for v in (await bus.gateway.discover(refresh=True)).specialists}
            finally:
                os.kill(child.process.pid, signal.SIGCONT)
        assert names == {"apollo"}
        async with bus.stream("apollo", [ChatMessage(role="user", content="still here")]) as s:
            assert "".join([t async for t in s]) == "apollo heard: still here"
