"""aish given contradictory, empty or unreachable settings: one line and the right exit code, and
nothing done silently otherwise (found by a sweep of the command line). Real nats-server, gateway and
specialists in this process (scripted provider), aish as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aish_client.fanout import plan_pipeline
from aish_client.parser import parse
from bus.client import Bus
from bus.discovery import Discover
from bus.errors import BadRequest
from bus.settings import TektonSettings
from bus.subjects import discover_subject
from tests.helpers import child_env, in_process_gateway, in_process_specialists, run_aish

pytestmark = pytest.mark.anyio

OFFLINE = TektonSettings(nats_url="nats://127.0.0.1:9", data_dir=Path("/nonexistent/tekton"))


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


async def test_continue_and_session_together_is_a_usage_error(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings, "apollo"):
        first = await run_aish(settings, "--session", "older", "apollo", "hi")
        assert first.returncode == 0, first.stderr
        both = await run_aish(settings, "--continue", "--session", "foo", "apollo", "again")
        assert both.returncode == 2 and both.stdout == ""
        line = one_line(both.stderr)
        assert "--continue" in line and "--session" in line and "not both" in line
        bare = await run_aish(settings, "--continue", "--session", "-c", 'apollo "again"')
        assert bare.returncode == 2, bare.stderr
        async with Bus.connect(settings) as bus:
            # Neither session got the turn.
            assert await bus.gateway.find("foo") is None
            assert len((await bus.gateway.get("older")).turns) == 2


async def test_route_forget_needs_an_id_and_says_only_what_it_forgot(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "athena", "apollo"),
        Bus.connect(settings) as bus,
    ):
        await bus.gateway.discover(text="what is a mutex?", correct="apollo")
        await bus.gateway.discover(text="tell me about the roman empire", correct="apollo")
        mine = (await bus.gateway.discover(corrections=True)).corrections or []
        assert len(mine) == 2
        for empty in ("", "  "):
            done = await run_aish(settings, "route", "--forget", empty)
            assert done.returncode == 2 and "forgot" not in done.stderr
            assert "--forget needs a correction's id" in one_line(done.stderr)
        assert len((await bus.gateway.discover(corrections=True)).corrections or []) == 2
        # The gateway itself refuses an empty id (the start of every id), from any client.
        with pytest.raises(BadRequest, match="forget"):
            await bus.gateway.call(
                "discover", Discover.model_construct(forget=""), subject=discover_subject(settings.prefix)
            )
        assert len((await bus.gateway.discover(corrections=True)).corrections or []) == 2
        gone, kept = mine
        forgot = await run_aish(settings, "route", "--forget", gone.id)
        assert forgot.returncode == 0, forgot.stderr
        assert f"forgot {gone.id}" in forgot.stderr and kept.id not in forgot.stderr
        assert [c.id for c in (await bus.gateway.discover(corrections=True)).corrections or []] == [kept.id]


@pytest.mark.fast
def test_one_specialist_twice_in_a_stage_gets_distinct_operation_ids() -> None:
    plan, shown = plan_pipeline(parse("apollo,athena,apollo | apollo"), "x", None, None)
    ids = [op.id for op in plan.operations]
    assert ids == ["apollo-1.1", "athena", "apollo-1.2", "apollo-2"]
    assert shown == ["apollo-2"]
    # The next stage sees both samples, each under its own label.
    assert plan.operations[-1].message == (
        "[apollo-1.1]\n{apollo-1.1}\n\n[athena]\n{athena}\n\n[apollo-1.2]\n{apollo-1.2}"
    )


@pytest.mark.fast
def test_operation_ids_of_a_name_of_the_longest_kind_stay_within_64_characters() -> None:
    """A specialist's name may be 64 characters; its ids in a pipeline (``-2``, ``.2``) are cut to fit
    rather than failing the plan, and stay distinct."""
    name = "a" * 63 + "b"
    plan, shown = plan_pipeline(parse(f"{name},{name} | {name} | {name}"), "x", None, None)
    ids = [op.id for op in plan.operations]
    assert len(set(ids)) == 4 and all(len(i) <= 64 for i in ids), ids
    assert shown == [ids[-1]] and all(op.ai == name for op in plan.operations)


async def test_a_tls_url_never_talks_to_a_plain_server_in_clear(settings: TektonSettings) -> None:
    plain = settings.nats_url
    assert plain.startswith("nats://")
    tls_url = "tls://" + plain.removeprefix("nats://")
    async with in_process_specialists(settings, "apollo"):
        sure = await run_aish(settings, "apollo", "hi")
        assert sure.returncode == 0, sure.stderr  # the same specialist answers over nats://
        for fast in ("1", "0"):  # the one-shot hands over to the full client, which must refuse too
            done = await run_aish(settings, "apollo", "hi", TEKTON_NATS_URL=tls_url, TEKTON_AISH_FAST=fast)
            assert done.returncode == 1 and done.stdout == "", done.stderr
            line = one_line(done.stderr)
            assert tls_url in line and "does not require TLS" in line
        listed = await run_aish(settings, "list", TEKTON_NATS_URL=tls_url)
        assert listed.returncode == 1 and "does not require TLS" in one_line(listed.stderr)


@pytest.mark.fast
@pytest.mark.parametrize("command", ["aish", "tekton"])
@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_missing_or_bad_tls_ca_is_one_line_naming_it(command: str, how: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for ca in (tmp_path / "nonexistent.pem", junk):
        argv = ["apollo", "hi"] if command == "aish" else ["status"]
        env: dict[str, str] = {}
        if how == "option":
            argv = ["--tls-ca", str(ca), *argv] if command == "aish" else [*argv, "--tls-ca", str(ca)]
        else:
            env["TEKTON_TLS_CA"] = str(ca)
        done = subprocess.run(
            [sys.executable, "-m", "aish_client" if command == "aish" else "tekton", *argv],
            env=child_env(OFFLINE, **env),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 1, done.stderr
        line = one_line(done.stderr)
        assert f"TLS CA certificate {ca}" in line and "cannot write the answer" not in line
