"""Bulk fan-out through the gateway, on a real nats-server with real specialists and aish processes."""

from __future__ import annotations

import json
import signal
from functools import partial
from pathlib import Path

import anyio
import msgpack
import pytest

from bus.bulk import BulkOperation, BulkPlan, OpChunk, OpEnd, OpStart
from bus.client import Bus
from bus.errors import BadRequest
from bus.settings import TektonSettings
from bus.subjects import bulk_subject
from gateway.bulk import validate
from tests.helpers import (
    AISH,
    aish,
    child_env,
    env,
    eventually,
    in_process_gateway,
    in_process_specialists,
    run_aish,
    spawn,
    specialist_process,
)

pytestmark = pytest.mark.anyio


def op(op_id: str, ai: str = "apollo", message: str = "hi", **fields: object) -> BulkOperation:
    return BulkOperation(id=op_id, ai=ai, message=message, **fields)  # type: ignore[arg-type]


def test_validation_lists_every_problem_at_once() -> None:
    with pytest.raises(BadRequest) as info:
        validate(
            [
                op("a", message="{c}"),
                op("b", ai="apolo", depends_on=["a", "ghost"]),
                op("c", ai="nobody", message="after {b}"),
                op("a"),
            ],
            running=["apollo", "athena"],
        )
    text = str(info.value)
    assert "operation id 'a' is used 2 times" in text
    assert "'b' depends on unknown operation(s): ghost" in text
    assert "apolo (did you mean apollo?), nobody" in text
    assert "dependency cycle: a -> c -> b -> a" in text
    with pytest.raises(BadRequest, match="at least one operation"):
        validate([], running=["apollo"])
    with pytest.raises(BadRequest, match="'a' depends on itself"):
        validate([op("a", depends_on=["a"])], running=["apollo"])
    graph = validate([op("a"), op("b", message="use {a} and {unrelated}")], running=["apollo"])
    assert graph == {"a": set(), "b": {"a"}}


async def test_parallel_sequential_and_dependencies(settings: TektonSettings) -> None:
    with env(TEKTON_SCRIPTED_FIRST_TOKEN_MS="100"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo", "athena", "prometheus"),
            Bus.connect(settings) as bus,
        ):
            plan = BulkPlan(
                operations=[
                    op("a", "apollo", "alpha"),
                    op("b", "athena", "beta"),
                    op("c", "prometheus", "combine {a} + {b}"),
                ]
            )
            async with bus.bulk(plan) as bulk:
                events = [e async for e in bulk]
            kinds = [
                (e.type, getattr(e, "op", None) or getattr(getattr(e, "result", None), "op", None))
                for e in events
            ]
            kinds = [k for k in kinds if k[0] != "op_chunk"]
            # a and b start together; c only after both ended.
            assert kinds[:2] == [("op_start", "a"), ("op_start", "b")]
            assert kinds.index(("op_start", "c")) > max(
                kinds.index(("op_end", "a")), kinds.index(("op_end", "b"))
            )
            assert bulk.output("c") == "prometheus heard: combine apollo heard: alpha + athena heard: beta"
            assert bulk.done is not None and bulk.done.status == "ok"
            assert [r.status for r in bulk.done.operations] == ["ok", "ok", "ok"]
            assert all(r.first_token_ms and r.first_token_ms >= 100 for r in bulk.done.operations)

            sequential = BulkPlan(operations=[op("x", "apollo"), op("y", "athena")], execution="sequential")
            async with bus.bulk(sequential) as bulk:
                order = [e async for e in bulk]
            starts_ends = [e.type for e in order if isinstance(e, OpStart | OpEnd)]
            assert starts_ends == ["op_start", "op_end", "op_start", "op_end"]


async def test_a_timeout_skips_only_its_dependents(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        with env(TEKTON_SCRIPTED_FIRST_TOKEN_MS="3000"):
            async with in_process_specialists(settings, "athena"):
                plan = BulkPlan(
                    operations=[
                        op("slow", "athena", "take your time", timeout_ms=200),
                        op("after", "apollo", "use {slow}"),
                        op("fine", "apollo", "quick"),
                    ]
                )
                async with bus.bulk(plan) as bulk:
                    done = await bulk.result()
    by_op = {r.op: r for r in done.operations}
    assert by_op["slow"].status == "timeout" and "did not finish within 200 ms" in (by_op["slow"].error or "")
    assert by_op["after"].status == "skipped" and "slow did not succeed" in (by_op["after"].error or "")
    assert by_op["fine"].status == "ok"
    assert done.status == "partial"
    assert bulk.output("fine") == "apollo heard: quick"


async def test_a_specialist_killed_during_a_bulk_run(settings: TektonSettings) -> None:
    quick = settings.model_copy(update={"idle_timeout_s": 1.0})
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "200"}
    with specialist_process(quick, "athena", **slow) as (child, _):
        async with (
            in_process_gateway(quick),
            in_process_specialists(quick, "apollo"),
            Bus.connect(quick) as bus,
        ):
            plan = BulkPlan(operations=[op("doomed", "athena", "long"), op("fine", "apollo", "short")])
            async with bus.bulk(plan) as bulk:
                async for event in bulk:
                    if isinstance(event, OpChunk) and event.op == "doomed" and child.process.poll() is None:
                        child.process.kill()
    assert bulk.done is not None and bulk.done.status == "partial"
    by_op = {r.op: r for r in bulk.done.operations}
    assert by_op["doomed"].status == "failed" and "sent nothing for 1 s" in (by_op["doomed"].error or "")
    assert by_op["fine"].status == "ok"


async def test_a_thousand_operations_all_complete_within_the_concurrency_limit(
    settings: TektonSettings,
) -> None:
    limited = settings.model_copy(update={"bulk_max_concurrency": 16})
    async with (
        in_process_gateway(limited),
        in_process_specialists(limited, "apollo"),
        Bus.connect(limited) as bus,
    ):
        plan = BulkPlan(operations=[op(f"op{i}", "apollo", f"n{i}") for i in range(1000)])
        running = peak = 0
        async with bus.bulk(plan, idle_timeout=30) as bulk:
            async for event in bulk:
                if isinstance(event, OpStart):
                    running += 1
                    peak = max(peak, running)
                elif isinstance(event, OpEnd):
                    running -= 1
    assert bulk.done is not None and bulk.done.status == "ok"
    assert len(bulk.done.operations) == 1000
    assert all(bulk.output(f"op{i}") == f"apollo heard: n{i}" for i in range(1000))
    assert 1 < peak <= 16


async def test_leaving_a_bulk_run_cancels_every_operation_on_its_specialist(settings: TektonSettings) -> None:
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20", TEKTON_SCRIPTED_TOKENS="1000"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo", "athena") as services,
            Bus.connect(settings) as bus,
        ):
            plan = BulkPlan(operations=[op("a", "apollo"), op("b", "athena"), op("c", "apollo", "{a}")])
            async with bus.bulk(plan) as bulk:
                seen: set[str] = set()
                async for event in bulk:
                    if isinstance(event, OpChunk):
                        seen.add(event.op)
                    if seen == {"a", "b"}:
                        break

            def stopped() -> bool:
                return all(s.counters.cancelled == 1 and s.counters.in_flight == 0 for s in services.values())

            await eventually(stopped)
            assert services["apollo"].counters.served == 0  # c never started


async def test_malformed_and_empty_bulk_requests(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        reply = await bus.nc.request(
            bulk_subject(settings.prefix), msgpack.packb({"operations": 3}), timeout=5
        )
        error = msgpack.unpackb(reply.data)
        assert error["type"] == "error" and error["code"] == "bad_request"
        with pytest.raises(BadRequest, match="at least one operation"):
            async with bus.bulk(BulkPlan(operations=[])):
                pass


async def test_aish_fan_out_forms(settings: TektonSettings, tmp_path: Path) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo", "athena", "prometheus"),
    ):
        # Each answer labelled by its op id: the specialist's name, or with a suffix when one
        # specialist answers twice in a stage (two samples).
        exactly = {
            'apollo,athena << "msg"': "── apollo ──\napollo heard: msg\n── athena ──\nathena heard: msg\n",
            'echo "idea" | {apollo|athena} | prometheus': (
                "prometheus heard: [apollo]\napollo heard: idea\n\n[athena]\nathena heard: idea\n"
            ),
            'apollo,apollo << "x"': "── apollo-1.1 ──\napollo heard: x\n── apollo-1.2 ──\napollo heard: x\n",
            'echo "idea" | {apollo|apollo} | prometheus': (
                "prometheus heard: [apollo-1.1]\napollo heard: idea\n\n[apollo-1.2]\napollo heard: idea\n"
            ),
        }
        for pipeline, expected in exactly.items():
            done = await run_aish(settings, "-c", pipeline)
            assert done.returncode == 0, (pipeline, done.stderr)
            assert done.stdout == expected, pipeline
        in_lines = {
            'echo "x" | apollo,athena': ["apollo │ apollo heard: x", "athena │ athena heard: x"],
            'apollo,athena,apollo << "y"': [
                "apollo-1.1 │ apollo heard: y",
                "apollo-1.2 │ apollo heard: y",
                "athena     │ athena heard: y",
            ],
        }
        for pipeline, rows in in_lines.items():
            done = await run_aish(settings, "--layout", "lines", "-c", pipeline)
            assert done.returncode == 0, (pipeline, done.stderr)
            assert sorted(done.stdout.splitlines()) == rows, pipeline
        # A capability that picks a specialist also named in the stage.
        picked = await run_aish(settings, "-c", '@code-analysis,apollo << "why does this crash?"')
        assert picked.returncode == 0, picked.stderr
        assert "── apollo-1.1 ──" in picked.stdout and "── apollo-1.2 ──" in picked.stdout
        typo = await run_aish(settings, "-c", 'apollo,apolo << "x"')
        assert typo.returncode == 1 and typo.stdout == ""
        assert "apolo (did you mean apollo?)" in typo.stderr
        plan = tmp_path / "plan.yaml"
        plan.write_text(
            "operations:\n"
            "  - {id: draft, ai: rhetor, message: 'write it'}\n"
            "  - {id: check, ai: athena, message: 'check: {draft}'}\n"
        )
        missing = await run_aish(settings, "bulk", str(plan))
        assert missing.returncode == 1 and "rhetor" in missing.stderr
        plan.write_text(plan.read_text().replace("rhetor", "apollo"))
        ran = await run_aish(settings, "bulk", str(plan))
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == [
            "── draft ──",
            "apollo heard: write it",
            "── check ──",
            "athena heard: check: apollo heard: write it",
        ]
        as_json = tmp_path / "plan.json"
        as_json.write_text(json.dumps({"operations": [{"id": "one", "ai": "apollo", "message": "j"}]}))
        assert (await run_aish(settings, "bulk", str(as_json))).stdout == "apollo heard: j\n"
        broken = tmp_path / "broken.yaml"
        broken.write_text("operations: [{id: 'bad id!', ai: apollo}]\n")
        refused = await run_aish(settings, "bulk", str(broken))
        assert refused.returncode == 2 and "broken.yaml" in refused.stderr and "message" in refused.stderr


async def test_fan_out_and_aish_bulk_give_json_events_and_log_entries(
    settings: TektonSettings, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "operations:\n"
        "  - {id: draft, ai: apollo, message: 'write it'}\n"
        "  - {id: check, ai: athena, message: 'check: {draft}'}\n"
    )
    missing = tmp_path / "missing.yaml"
    missing.write_text("operations: [{id: x, ai: rhetor, message: 'hi'}]\n")
    async with in_process_gateway(settings), in_process_specialists(settings, "apollo", "athena"):
        fan = await run_aish(settings, "--json", "-c", 'apollo,athena << "fan question"')
        ran = await run_aish(settings, "bulk", str(plan), "--json")
        quiet = await run_aish(settings, "bulk", "--no-log", str(plan))
        refused = await run_aish(settings, "--json", "bulk", str(missing))
    assert fan.returncode == 0, fan.stderr
    events = [json.loads(line) for line in fan.stdout.splitlines()]  # nothing but JSON on stdout
    assert sorted(e["op"] for e in events if e["event"] == "op_start") == ["apollo", "athena"]
    for name in ("apollo", "athena"):
        said = "".join(e["text"] for e in events if e["event"] == "op_chunk" and e["op"] == name)
        assert said == f"{name} heard: fan question"
        (end,) = [e for e in events if e["event"] == "op_end" and e["op"] == name]
        assert end["specialist"] == name and end["status"] == "ok" and end["tokens"] == 4
    assert events[-1]["event"] == "bulk_done" and events[-1]["status"] == "ok"
    assert sorted(r["op"] for r in events[-1]["operations"]) == ["apollo", "athena"]
    assert ran.returncode == 0, ran.stderr
    bulk_events = [json.loads(line) for line in ran.stdout.splitlines()]
    check = "".join(e["text"] for e in bulk_events if e["event"] == "op_chunk" and e["op"] == "check")
    assert check == "athena heard: check: apollo heard: write it"
    assert quiet.returncode == 0 and "── draft ──" in quiet.stdout
    assert refused.returncode == 1
    error = json.loads(refused.stdout.splitlines()[-1])
    assert error["event"] == "error" and "rhetor" in error["message"]
    # Every operation that ran is in the log (the --no-log run is not), its prompt as it was sent.
    logged = aish(settings, "logs", "-n", "10", "--json")
    entries = [json.loads(line) for line in logged.stdout.splitlines()]
    rows = [(e["specialist"], e["prompt"], e["answer"], e["status"], e["tokens_out"]) for e in entries]
    assert sorted(rows[:2]) == [  # the two answers of the fan-out, in the order they ended
        ("apollo", "fan question", "apollo heard: fan question", "ok", 4),
        ("athena", "fan question", "athena heard: fan question", "ok", 4),
    ]
    assert rows[2:] == [
        ("apollo", "write it", "apollo heard: write it", "ok", 4),
        ("athena", "check: apollo heard: write it", "athena heard: check: apollo heard: write it", "ok", 7),
    ]
    assert "> check: apollo heard: write it" in aish(settings, "logs", "-n", "1").stdout


async def test_fan_out_in_a_session_records_every_operation(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings, "apollo", "athena"):
        result = await run_aish(settings, "-c", "--session", "team", 'apollo,athena << "plan"')
        assert result.returncode == 0, result.stderr
        async with Bus.connect(settings) as bus:
            turns = (await bus.gateway.get("team")).turns
    assert sorted((t.role, t.specialist, t.status) for t in turns) == [
        ("assistant", "apollo", "ok"),
        ("assistant", "athena", "ok"),
        ("user", "apollo", "ok"),
        ("user", "athena", "ok"),
    ]


async def test_ctrl_c_in_aish_cancels_a_fan_out(settings: TektonSettings) -> None:
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "1000"}
    with env(**slow):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo", "athena") as services,
        ):
            client = spawn([*AISH, "-c", 'apollo,athena << "go on"'], child_env(settings))

            def streaming() -> bool:
                return all(s.counters.in_flight == 1 for s in services.values())

            await eventually(streaming)
            client.process.send_signal(signal.SIGINT)
            assert await anyio.to_thread.run_sync(partial(client.process.wait, 10)) == 130

            def stopped() -> bool:
                return all(s.counters.cancelled == 1 and s.counters.in_flight == 0 for s in services.values())

            await eventually(stopped)


async def test_the_whole_request_runs_out_of_time(settings: TektonSettings) -> None:
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="10", TEKTON_SCRIPTED_TOKENS="1000"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "athena") as services,
            Bus.connect(settings) as bus,
        ):
            plan = BulkPlan(
                operations=[op("long", "athena"), op("after", "athena", "{long}")], timeout_ms=300
            )
            async with bus.bulk(plan) as bulk:
                done = await bulk.result()
            assert done.status == "timeout"
            by_op = {r.op: r for r in done.operations}
            assert by_op["long"].status == "timeout" and "out of time" in (by_op["long"].error or "")
            assert by_op["after"].status == "timeout"
            await eventually(lambda: services["athena"].counters.cancelled == 1)
