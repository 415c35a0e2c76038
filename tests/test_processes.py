"""Real `tekton` and `aish` subprocesses against a real nats-server: replicas, faults, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from bus.client import Bus
from bus.errors import IdleTimeout
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from tests.helpers import AISH, aish, child_env, eventually, spawn, specialist_process

TEKTON = [sys.executable, "-m", "tekton"]


async def served_by_instance(bus: Bus, name: str) -> dict[str, dict[str, int]]:
    return {s["id"]: s["endpoints"][0]["data"] for s in await bus.stats(name, window=0.5, thorough=True)}


def test_aish_runs_a_pipeline_against_specialist_processes(settings: TektonSettings) -> None:
    with specialist_process(settings, "apollo", "athena"):
        done = aish(settings, "-c", 'echo "explain queue groups" | apollo | athena')
        assert done.returncode == 0, done.stderr
        assert done.stdout == "athena heard: apollo heard: explain queue groups\n"
        asked = aish(settings, "apollo", "what", "now?")
        assert asked.stdout == "apollo heard: what now?\n"
        piped = aish(settings, "-c", "athena", stdin="notes from stdin\n")
        assert piped.stdout == "athena heard: notes from stdin\n"
        listed = aish(settings, "list")
        assert listed.returncode == 0
        names = [line.split()[0] for line in listed.stdout.splitlines() if not line.startswith(" ")]
        assert names == ["apollo", "athena"] and "  Knowledge: explains concepts" in listed.stdout
        assert "code-analysis 0.95" in listed.stdout


def test_aish_redirects_to_files(settings: TektonSettings, tmp_path: Path) -> None:
    out = tmp_path / "answer.txt"
    with specialist_process(settings, "apollo"):
        assert aish(settings, "-c", f'apollo "first" > {out}').returncode == 0
        assert aish(settings, "-c", f"echo second | apollo >> {out}").returncode == 0
    assert out.read_text() == "apollo heard: firstapollo heard: second"


def test_aish_errors_are_one_clear_line(settings: TektonSettings) -> None:
    with specialist_process(settings, "apollo"):
        unknown = aish(settings, "-c", 'apolo "x"')
        assert unknown.returncode == 1
        assert (
            unknown.stderr.strip() == "aish: no specialist named 'apolo' is running; did you mean 'apollo'?"
        )
        syntax = aish(settings, "-c", 'apollo | "')
        assert syntax.returncode == 2 and syntax.stderr.count("\n") == 1
        assert "column 10" in syntax.stderr and syntax.stderr.rstrip().endswith('in: apollo | "')
        no_gateway = aish(settings, "-c", 'apollo,athena << "x"')
        assert no_gateway.returncode == 1 and "no gateway is running" in no_gateway.stderr
        routed = aish(settings, "-c", '@code-analysis << "x"')
        assert routed.returncode == 1 and "no gateway is running" in routed.stderr
        empty = aish(settings, "-c", "apollo")
        assert empty.returncode == 2 and "got no input" in empty.stderr


def test_no_nats_server_says_how_to_start_one(settings: TektonSettings) -> None:
    down = settings.model_copy(update={"nats_url": "nats://127.0.0.1:9"})
    done = aish(down, "-c", 'apollo "x"')
    assert done.returncode == 1
    assert "no NATS server answers at nats://127.0.0.1:9" in done.stderr and "tekton up" in done.stderr
    status = subprocess.run(
        [*TEKTON, "status"], env=child_env(down), capture_output=True, text=True, timeout=30
    )
    assert status.returncode == 1 and "tekton up" in status.stderr


@pytest.mark.anyio
async def test_two_replicas_share_the_load(settings: TektonSettings) -> None:
    with (
        specialist_process(settings, "apollo") as (_, one),
        specialist_process(settings, "apollo") as (_, two),
    ):
        async with Bus.connect(settings) as bus:
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(bus.ask, "apollo", f"request {i}")
            served = await served_by_instance(bus, "apollo")
    assert set(served) == {one["apollo"], two["apollo"]}
    assert all(data["served"] > 0 for data in served.values()), served
    assert sum(data["served"] for data in served.values()) == 40


@pytest.mark.anyio
async def test_killed_replica_mid_stream_is_a_clear_error_and_the_next_request_works(
    settings: TektonSettings,
) -> None:
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "400"}
    with (
        specialist_process(settings, "apollo", **slow) as (a, ids_a),
        specialist_process(settings, "apollo", **slow) as (b, ids_b),
    ):
        by_instance = {ids_a["apollo"]: a, ids_b["apollo"]: b}
        async with Bus.connect(settings) as bus:
            with anyio.fail_after(10), pytest.raises(IdleTimeout, match="died mid-stream"):
                async with bus.stream(
                    "apollo", [ChatMessage(role="user", content="x")], idle_timeout=1.0
                ) as s:
                    async for _ in s:
                        assert s.start_frame is not None
                        victim = by_instance[s.start_frame.instance]
                        if victim.process.poll() is None:
                            victim.process.kill()
            survivor = next(c for c in by_instance.values() if c is not victim)
            assert survivor.process.poll() is None
            async with bus.stream(
                "apollo", [ChatMessage(role="user", content="again")], idle_timeout=2.0
            ) as s2:
                async for _ in s2:
                    break
            assert s2.start_frame is not None and by_instance[s2.start_frame.instance] is survivor


@pytest.mark.anyio
async def test_ctrl_c_in_aish_stops_generation_on_the_specialist(settings: TektonSettings) -> None:
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "1000"}
    with specialist_process(settings, "apollo", **slow):
        client = spawn([*AISH, "-c", 'apollo "talk for a long time"'], child_env(settings))
        # Wait for tokens on aish's stdout, then press Ctrl-C.
        client.process.stdout  # noqa: B018 - the reader thread owns it
        async with Bus.connect(settings) as bus:

            async def streaming() -> bool:
                stats = await served_by_instance(bus, "apollo")
                return any(d["in_flight"] == 1 for d in stats.values())

            await eventually(streaming)
            client.process.send_signal(signal.SIGINT)
            assert client.process.wait(10) == 130

            async def stopped() -> bool:
                stats = list((await served_by_instance(bus, "apollo")).values())
                return stats[0]["cancelled"] == 1 and stats[0]["in_flight"] == 0

            await eventually(stopped)
            stats = next(iter((await served_by_instance(bus, "apollo")).values()))
            assert stats["served"] == 0


def test_missing_model_file_is_a_clear_error(settings: TektonSettings, tmp_path: Path) -> None:
    env = child_env(settings, TEKTON_LOCAL_MODEL_PATH=str(tmp_path / "nope.gguf"))
    done = subprocess.run(
        [*TEKTON, "specialist", "apollo"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert f"local model file not found: {tmp_path / 'nope.gguf'}" in done.stderr


def test_missing_api_key_is_a_clear_error(settings: TektonSettings) -> None:
    done = subprocess.run(
        [*TEKTON, "specialist", "apollo", "--provider", "openai"],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "TEKTON_OPENAI_API_KEY" in done.stderr
    done = subprocess.run(
        [*TEKTON, "specialist", "apollo", "--provider", "anthropic"],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "TEKTON_ANTHROPIC_API_KEY" in done.stderr


def test_unknown_specialist_in_tekton_specialist(settings: TektonSettings) -> None:
    done = subprocess.run(
        [*TEKTON, "specialist", "apolo", "--provider", "scripted"],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "not in the roster: apolo" in done.stderr


def _pids_of_session(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:  # parent pid
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("processes", [False, True], ids=["one-process", "processes"])
def test_tekton_up_runs_everything_and_stops_cleanly(tmp_path: Path, processes: bool) -> None:
    settings = TektonSettings(nats_url="nats://127.0.0.1:0", data_dir=tmp_path / "data")
    # Port 0 is not a usable URL: pick a free port by asking the OS.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"})
    argv = [*TEKTON, "up", "--provider", "scripted", "--log-level", "warning"]
    if processes:
        argv.append("--processes")
    up = spawn(argv, child_env(settings))
    try:
        up.wait_for(lambda line: line.startswith("Tekton is up: gateway + 10 specialists"), timeout=60)
        children = _pids_of_session(up.process.pid)
        assert children, "tekton up should have started nats-server (and specialists) as children"
        done = aish(settings, "-c", 'echo "hello" | prometheus | rhetor')
        assert done.stdout == "rhetor heard: prometheus heard: hello\n", done.stderr
        talked = aish(settings, "--session", "up-test", "athena", "remember this")
        assert talked.returncode == 0, talked.stderr
        shown = aish(settings, "sessions", "show", "up-test")
        assert "[2] athena: athena heard: remember this" in shown.stdout, shown.stderr
        status = subprocess.run(
            [*TEKTON, "status", "--json"], env=child_env(settings), capture_output=True, text=True, timeout=30
        )
        listed = json.loads(status.stdout)
        assert len({i["name"] for i in listed}) == 10
        assert up.stop(signal.SIGTERM, timeout=40) == 0
        up.wait_for(lambda line: line == "Tekton stopped")
        for pid in children:
            assert (
                not Path(f"/proc/{pid}").exists() or "Z" in (Path(f"/proc/{pid}/stat").read_text().split()[2])
            ), pid
    finally:
        if up.process.poll() is None:
            # SIGTERM first: tekton up then stops its nats-server too (a SIGKILL would orphan it).
            try:
                up.stop(signal.SIGTERM, timeout=40)
            except subprocess.TimeoutExpired:
                up.process.kill()


def test_tekton_up_uses_a_running_server_and_runs_a_command(settings: TektonSettings) -> None:
    up = spawn(
        [*TEKTON, "up", "--provider", "scripted", "--log-level", "warning", "--", *AISH, "-c", 'athena "hi"'],
        child_env(settings),
    )
    assert up.process.wait(60) == 0
    out = list(up.seen)
    while (line := up.lines.get(timeout=5)) is not None:
        out.append(line)
    assert "athena heard: hi" in out
    # What tekton up says goes to its log file, not into the command's terminal.
    assert f"using the nats-server already running at {settings.nats_url}" not in out
    log = (settings.data_dir / "tekton.log").read_text()
    assert f"using the nats-server already running at {settings.nats_url}" in log


def test_environment_is_clean() -> None:
    assert "TEKTON_PROVIDER" not in os.environ


def _child_with(up_pid: int, *words: str) -> int | None:
    """The pid of a process started by ``up_pid`` whose command line has ``words`` in order."""
    for pid in _pids_of_session(up_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if " ".join(words) in text:
            return pid
    return None


def test_tekton_up_processes_restarts_a_child_that_dies(settings: TektonSettings) -> None:
    up = spawn(
        [*TEKTON, "up", "--provider", "scripted", "--processes", "--log-level", "warning"],
        child_env(settings),
    )
    try:
        up.wait_for(lambda line: line.startswith("Tekton is up"), timeout=60)
        assert aish(settings, "apollo", "before").stdout == "apollo heard: before\n"
        for words in (("specialist", "apollo"), ("tekton", "gateway")):
            pid = _child_with(up.process.pid, *words)
            assert pid is not None, words
            os.kill(pid, signal.SIGKILL)

        async def back() -> bool:
            new_apollo = _child_with(up.process.pid, "specialist", "apollo")
            new_gateway = _child_with(up.process.pid, "tekton", "gateway")
            if new_apollo is None or new_gateway is None:
                return False
            async with Bus.connect(settings) as bus:
                gateways = await bus.instances(window=0.2, role="gateway")
                return bool(gateways) and bool(await bus.instances(window=0.2, name="apollo"))

        anyio.run(lambda: eventually(back, within=30))
        assert aish(settings, "apollo", "after").stdout == "apollo heard: after\n"
        talked = aish(settings, "--session", "after-restart", "athena", "hello")
        assert talked.returncode == 0, talked.stderr
    finally:
        up.stop(signal.SIGTERM, timeout=40)
    log = (settings.data_dir / "tekton.log").read_text()  # `tekton up` logs to a file (tekton logs)
    assert "child died; restarting" in log and "apollo" in log and "gateway" in log, log


def test_a_gateway_with_its_http_bridge_stops_on_sigterm_without_a_traceback(
    settings: TektonSettings,
) -> None:
    """uvicorn, cancelled in the middle of its shutdown, printed the app lifespan's CancelledError
    traceback on every stop of `tekton gateway --http` (and so of `tekton up`)."""
    child = spawn([*TEKTON, "gateway", "--http", "0"], child_env(settings), stderr=subprocess.STDOUT)
    try:
        child.wait_for(lambda line: line.startswith("ready gateway"))
        assert child.stop(signal.SIGTERM) == 0
        rest = []
        while (line := child.lines.get(timeout=10)) is not None:
            rest.append(line)
    finally:
        if child.process.poll() is None:
            child.process.kill()
    output = "\n".join(child.seen + rest)
    assert "stopping" in output and "Traceback" not in output, output
