"""Bad input and broken surroundings give one line on stderr, never a traceback (run as a user runs them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from aish_client.fanout import load_plan
from bus.errors import ConfigError, InvalidInput
from bus.settings import TektonSettings, load_settings
from specialists.roster import RosterError, load_roster
from tekton.cli import main as tekton_main
from tests.helpers import AISH, aish, child_env, eventually, in_process_specialists, spawn

TEKTON = [sys.executable, "-m", "tekton"]
OFFLINE = TektonSettings(nats_url="nats://127.0.0.1:9", data_dir=Path("/nonexistent/tekton"))


def run(argv: list[str], settings: TektonSettings = OFFLINE, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=child_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-tokens", "0"),
        ("--temperature", "nan"),
        ("--timeout", "-5"),
        ("--idle-timeout", "0"),
    ],
)
def test_an_option_out_of_range_is_a_usage_error(option: str, value: str) -> None:
    done = run([*AISH, option, value, "apollo", "hi"])
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert option in line and value in line


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "problem"),
    [("idle_timeout_s = = 3\n", "not valid TOML"), ("idle_timeout_s = -1\n", "idle_timeout_s")],
)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path: Path, text: str, problem: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    command = [*AISH, "apollo", "hi"] if "TOML" in problem else [*TEKTON, "status"]
    done = run(command, TEKTON_CONFIG=str(config))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert str(config) in line and problem in line


@pytest.mark.fast
def test_a_bad_environment_value_names_the_variable() -> None:
    done = run([*AISH, "apollo", "hi"], TEKTON_IDLE_TIMEOUT_S="-3")
    assert done.returncode == 1
    assert "$TEKTON_IDLE_TIMEOUT_S" in one_line(done.stderr)


@pytest.mark.fast
def test_closed_stdout_is_one_line() -> None:
    # `aish apollo hi >&-`, as a shell does it.
    done = run(["sh", "-c", 'exec "$@" >&-', "sh", *AISH, "apollo", "hi"])
    assert done.returncode == 1
    assert "standard output is closed" in one_line(done.stderr)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_tekton_up_with_a_missing_api_key_is_one_line(settings: TektonSettings, provider: str) -> None:
    done = run([*TEKTON, "up", "--provider", provider, "--nats", settings.nats_url], settings)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("tekton: ") and f"TEKTON_{provider.upper()}_API_KEY" in line


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["up", "--http", "99999"], "--http"),
        (["gateway", "--http", "x"], "--http"),
        (["a2a", "--port", "-1"], "--port"),
        (["specialist", "apollo", "--replicas", "0"], "--replicas"),
        (["top", "--interval", "0"], "--interval"),
        (["cluster", "up", "--nodes", "0"], "--nodes"),
        (["up", "--no-such-option"], "--no-such-option"),
        (["status", "--log-level", "loud"], "--log-level"),
    ],
)
def test_a_bad_tekton_argument_is_a_one_line_usage_error(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process: the parser is all that runs before the exit (a child took 2 s a case).
    with pytest.raises(SystemExit) as stopped:
        tekton_main(argv)
    assert stopped.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("tekton") and named in line


def test_a_port_already_in_use_is_one_line(settings: TektonSettings) -> None:
    """Every edge that listens says which address it could not have, in one line, and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv in (
            ["gateway", "--http", port],
            ["up", "--provider", "scripted", "--http", port],
            ["up", "--provider", "scripted", "--metrics", port],
            ["mcp", "--http", port],
        ):
            done = run([*TEKTON, *argv, "--nats", settings.nats_url, "--log-level", "warning"], settings)
            assert done.returncode == 1, (argv, done.stderr)
            line = one_line(done.stderr)
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line, argv


@pytest.mark.fast
def test_no_server_at_a_websocket_url_is_one_line() -> None:
    """(nats-py's WebSocket transport left its aiohttp session open: "Unclosed client session" and
    the session's repr after the error.)"""
    done = run([*AISH, "list"], TEKTON_NATS_URL="ws://127.0.0.1:9")
    assert done.returncode == 1 and "no NATS server answers at ws://" in one_line(done.stderr)


@pytest.mark.fast
def test_a_bulk_plan_that_is_no_plan_is_one_line(tmp_path: Path) -> None:
    """Binary, UTF-16, a directory, /dev/zero (it read for ever), YAML with a syntax error (4-8 lines
    with PyYAML's excerpt), a model name that is none. Read in this process (a child takes seconds a
    case); the command's line and exit code once. A plan through a pipe is read as before."""
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "utf16.yaml").write_text("operations: []", encoding="utf-16")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "broken.yaml").write_text("operations: [\n  - {id: a\n")
    (tmp_path / "model.yaml").write_text(
        'operations:\n  - {id: a, ai: apollo, message: x, model: "bad model"}\n'
    )
    for name, said in (
        ("binary.yaml", "is not UTF-8 text"),
        ("utf16.yaml", "is not UTF-8 text"),
        ("dir.yaml", "is a directory"),
        ("/dev/zero", "is over 4 MiB"),
        ("broken.yaml", "is not valid YAML: "),
        ("model.yaml", "operations.0.model: Value error, model must be"),
    ):
        with pytest.raises(InvalidInput) as refused:
            load_plan(str(tmp_path / name))
        assert said in str(refused.value) and "\n" not in str(refused.value), name
    done = run([*AISH, "bulk", "/dev/zero"])
    assert done.returncode == 2 and "is over 4 MiB" in one_line(done.stderr)
    piped = tmp_path / "piped.yaml"
    os.mkfifo(piped)
    writer = threading.Thread(
        target=piped.write_text, args=("operations:\n  - {id: a, ai: apollo, message: x}\n",)
    )
    writer.start()
    assert [op.id for op in load_plan(str(piped)).operations] == ["a"]
    writer.join()


@pytest.mark.fast
def test_a_config_file_that_is_no_toml_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00 not text")
    (tmp_path / "dir.toml").mkdir()
    for name, said in (("binary.toml", "is not UTF-8 text"), ("dir.toml", "is not a file")):
        monkeypatch.setenv("TEKTON_CONFIG", str(tmp_path / name))
        with pytest.raises(ConfigError, match=said):
            load_settings()
    with pytest.raises(RosterError, match="not UTF-8 text"):
        load_roster(tmp_path / "binary.toml")
    done = run([*TEKTON, "status"], TEKTON_CONFIG=str(tmp_path / "binary.toml"))
    assert done.returncode == 1 and "is not UTF-8 text" in one_line(done.stderr)


@pytest.mark.fast
@pytest.mark.parametrize(
    "argv",
    [
        ["sessions", "show"],
        ["sessions", "list", "--limit", "0"],
        ["logs", "-n", "-1"],
        ["logs", "-n", "99999999999999999999999"],
        ["completion", "tcsh"],
        ["runs", "extra"],
        ["-c", "apollo |"],
        ["-c", "{apollo|"],
        ["--log-level", "FOO", "list"],
    ],
)
def test_an_aish_usage_error_is_one_line(argv: list[str]) -> None:
    """A subcommand's own parser and a pipeline's syntax error too (they printed the usage, or the
    line with a caret under it, over two or three lines)."""
    done = run([*AISH, *argv])
    assert done.returncode == 2
    one_line(done.stderr)


def into_full_disk(settings: TektonSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """`aish ARGS > /dev/full`"""
    with open("/dev/full", "w") as full:
        return subprocess.run(
            [*AISH, *args],
            env=child_env(settings),
            stdout=full,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=60,
        )


@pytest.mark.anyio
async def test_a_full_disk_on_stdout_is_one_line(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"):
        done = await anyio.to_thread.run_sync(into_full_disk, settings, "apollo", "hi")
    assert done.returncode == 1
    assert "cannot write the answer: No space left on device" in one_line(done.stderr)


@pytest.mark.fast
def test_a_full_disk_under_a_subcommand_is_one_line_too() -> None:
    """Subcommands end their errors through the same exit-code helper as the rest of aish."""
    done = into_full_disk(OFFLINE, "completion", "bash")
    assert done.returncode == 1
    assert "cannot write the answer: No space left on device" in one_line(done.stderr)


def test_a_redirect_to_an_unknown_users_home_is_one_line(settings: TektonSettings) -> None:
    done = aish(settings, "-c", "echo hello > ~nosuchuser-tekton/x")
    assert done.returncode == 1
    assert "cannot write ~nosuchuser-tekton/x" in one_line(done.stderr)


@pytest.mark.anyio
async def test_timeout_bounds_the_whole_request_and_stops_it(settings: TektonSettings) -> None:
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "10000"}
    os.environ.update(slow)
    try:
        async with in_process_specialists(settings, "apollo") as services:
            done = await anyio.to_thread.run_sync(
                lambda: aish(settings, "--timeout", "1.5", "apollo", "a long answer")
            )
            counters = services["apollo"].counters
            await eventually(lambda: counters.cancelled == 1 and counters.in_flight == 0, within=10)
    finally:
        for key in slow:
            os.environ.pop(key, None)
    assert done.returncode == 1
    assert "within --timeout 1.5 s" in one_line(done.stderr)
    assert done.stdout.startswith("apollo heard:")  # what came in time was shown
    assert counters.served == 0


def test_nats_server_gone_longer_than_the_idle_timeout_is_one_line(
    settings: TektonSettings,
    nats_server,  # type: ignore[no-untyped-def]
) -> None:
    slow = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "10000"}
    specialist = spawn(
        [*TEKTON, "specialist", "apollo", "--provider", "scripted", "--log-level", "warning"],
        child_env(settings, **slow),
    )
    try:
        specialist.wait_for(lambda line: line.startswith("ready apollo"))
        asker = subprocess.Popen(
            [*AISH, "--idle-timeout", "1", "apollo", "hi"],
            env=child_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert asker.stdout is not None and asker.stderr is not None
        # The first token on stdout means the stream is flowing; then the server goes away.
        assert asker.stdout.read(len("apollo")) == "apollo"
        nats_server.stop()
        _, stderr = asker.communicate(timeout=30)
        code = asker.returncode
    finally:
        specialist.process.send_signal(signal.SIGKILL)
        specialist.process.wait()
    assert code == 1
    assert "sent nothing for 1 s" in one_line(stderr)
