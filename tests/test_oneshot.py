"""The one-shot's light path (aish_client/oneshot.py over bus/lite.py) says exactly what the full path says.

Each case runs the real `aish` twice against a real nats-server and a scripted specialist process: on the
light path, and with TEKTON_AISH_FAST=0 on the full one (nats-py), and compares stdout, stderr, the exit
code and the logbook. Which path ran is read from the process itself (which modules it imported).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from aish_client.completion import SUBCOMMANDS
from aish_client.logbook import Logbook
from aish_client.oneshot import NOT_NAMES, chat_request, plan
from bus.auth import save_credentials
from bus.cluster import free_ports
from bus.frames import pack_request
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions, ChatRequest, encode_request
from tekton import certs
from tekton.users import Users, new_credentials
from tests.helpers import child_env, spawn, specialist_process
from tests.test_hot_path import LIGHT_PATH_NEVER

# Runs `aish ARGS` as the console script does, then notes which path answered in $AISH_PATH_MARK.
WRAP = (
    "import os, sys\n"
    "from aish_client.oneshot import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "finally:\n"
    "    path = 'full' if 'aish_client.cli' in sys.modules else 'fast'\n"
    "    if path == 'fast' and 'nats' in sys.modules:\n"
    "        path = 'resumed'  # the light path, then the full client reading the rest of the run\n"
    "    open(os.environ['AISH_PATH_MARK'], 'w').write(path)\n"
    "sys.exit(code)\n"
)


class Run:
    def __init__(self, done: subprocess.CompletedProcess[str], path: str):
        self.code, self.out, self.err, self.path = done.returncode, done.stdout, done.stderr, path


def run(
    settings: TektonSettings, tmp: Path, *args: str, stdin: str | None = None, full: bool = False, **env: str
) -> Run:
    mark = tmp / f"mark-{os.urandom(4).hex()}"
    extra = {"AISH_PATH_MARK": str(mark), **env}
    if full:
        extra["TEKTON_AISH_FAST"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", WRAP, *args],
        env=child_env(settings, **extra),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(done, mark.read_text() if mark.exists() else "?")


def both(settings: TektonSettings, tmp: Path, *args: str, stdin: str | None = None) -> tuple[Run, Run]:
    return run(settings, tmp, *args, stdin=stdin), run(settings, tmp, *args, stdin=stdin, full=True)


def events(out: str) -> list[dict[str, Any]]:
    """--json events with what differs from run to run blanked: timings, the request's own figures, and
    how the answer's tokens fell into chunks (a burst shares one; consecutive chunks are joined)."""
    found: list[dict[str, Any]] = []
    for event in map(json.loads, out.splitlines()):
        if "timings" in event:
            event["timings"] = {k: type(v).__name__ for k, v in event["timings"].items()}
        last = found[-1] if found else {}
        if (
            event["event"] == "chunk"
            and last.get("event") == "chunk"
            and last.get("stage") == event.get("stage")
        ):
            last["text"] += event["text"]
            continue
        found.append(event)
    return found


def logged(settings: TektonSettings) -> list[dict[str, Any]]:
    keep = (
        "specialist",
        "provider",
        "model",
        "system",
        "prompt",
        "answer",
        "status",
        "error",
        "finish_reason",
    )
    return [
        {k: e[k] for k in (*keep, "tokens_in", "tokens_out")}
        for e in Logbook(settings.data_dir / "logs.db").entries(50)
    ]


@pytest.fixture
def apollo(settings: TektonSettings) -> Iterator[None]:
    with specialist_process(settings, "apollo", TEKTON_SCRIPTED_ECHO_CONTEXT="true"):
        yield


@pytest.mark.fast
def test_the_light_path_takes_only_what_it_does_exactly() -> None:
    taken = plan(
        ["apollo", "what", "is", "a", "mutex?", "--json", "-m", "ollama:qwen2.5:7b", "--timeout", "3"]
    )
    assert taken is not None
    assert (taken.name, taken.message, taken.model, taken.json, taken.timeout) == (
        "apollo",
        "what is a mutex?",
        "ollama:qwen2.5:7b",
        True,
        3.0,
    )
    assert plan(["--max-tokens=5", "--temperature", "0.5", "athena"]).options == {  # type: ignore[union-attr]
        "max_tokens": 5,
        "temperature": 0.5,
    }
    for argv in (
        [],
        ["-c", "apollo hi"],
        ["list"],
        ["route", "x"],
        ["sessions", "ls"],
        ["apollo", "--json", "hi"],  # argparse takes one run of words: a usage error on the full path
        ["apollo", "--jso"],  # an abbreviation: the full parser's
        ["apollo", "--session", "x", "hi"],
        ["apollo", "-o", "max_tokens=3", "hi"],
        ["apollo", "-f", "x.py"],
        ["apollo", "--timeout", "0", "hi"],
        ["apollo", "--max-tokens", "0", "hi"],
        ["apollo", "-m", "bad model", "hi"],
        ["apollo", "-m=ollama:x", "hi"],
        ["@code", "hi"],
        ["Apollo", "hi"],
        ["what is a mutex?"],
    ):
        assert plan(argv) is None, argv
    # Every subcommand and builtin is a word the light path never takes for a specialist's name.
    assert {*SUBCOMMANDS, "list", "help", "route", "echo"} <= NOT_NAMES


@pytest.mark.fast
def test_the_light_request_is_byte_for_byte_the_full_paths() -> None:
    for argv in (
        ["apollo", "hi"],
        ["apollo", "hi", "--system", "be brief", "-m", "ollama:qwen2.5:7b", "--timeout", "2.5"],
        ["apollo", "hi", "--max-tokens", "7", "--temperature", "0.25"],
    ):
        a = plan(argv)
        assert a is not None
        messages = [ChatMessage(role="user", content="hi")]
        if a.system:
            messages.insert(0, ChatMessage(role="system", content=a.system))
        full = ChatRequest(
            id="r1",
            messages=messages,
            options=ChatOptions(**a.options),
            timeout_ms=int((a.timeout + 1.0) * 1000) if a.timeout else None,
            model=a.model,
        )
        assert pack_request(chat_request(a, "hi", "r1")) == encode_request(full), argv


pytestmark = pytest.mark.anyio


async def test_answers_json_and_logbook_match_the_full_path(
    settings: TektonSettings, apollo: None, tmp_path: Path
) -> None:
    for args, stdin in (
        (("apollo", "what is a mutex?"), None),
        (("apollo",), "piped text\n"),
        (("apollo", "summarise:"), "piped text"),
        (("apollo", "hi", "--system", "be brief", "-m", "scripted:other", "--max-tokens", "3"), None),
        (("--json", "apollo", "hi"), None),
        (("apollo", "hi", "--json", "--no-log"), None),
    ):
        fast, full = await anyio.to_thread.run_sync(
            lambda a=args, s=stdin: both(settings, tmp_path, *a, stdin=s)
        )
        assert (fast.path, full.path) == ("fast", "full"), args
        assert fast.code == full.code == 0, (args, fast.err, full.err)
        assert fast.err == full.err, args
        if "--json" in args:
            assert events(fast.out) == events(full.out), args
            assert [e["event"] for e in events(fast.out)] == ["start", "chunk", "done"], args
        else:
            assert fast.out == full.out and fast.out.startswith("apollo heard: "), args
    entries = logged(settings)
    assert len(entries) == 10  # five asked twice; --no-log records nothing
    assert entries[0::2] == entries[1::2]
    assert entries[6]["system"] == "be brief" and entries[6]["model"] == "other"
    assert entries[6]["finish_reason"] == "length"


async def test_a_specialist_error_and_an_unknown_name_say_the_same(
    settings: TektonSettings, tmp_path: Path
) -> None:
    # A scripted tool call without MCP servers: the specialist answers with an error frame.
    with specialist_process(settings, "apollo", TEKTON_SCRIPTED_TOOL='{"server": "s", "tool": "t"}'):
        for args in (("apollo", "hi"), ("apollo", "hi", "--json")):
            fast, full = await anyio.to_thread.run_sync(lambda a=args: both(settings, tmp_path, *a))
            assert (fast.path, full.path) == ("fast", "full")
            assert fast.code == full.code == 1
            assert fast.err == full.err == "aish: 'apollo' has no MCP servers for its scripted tool call\n"
            assert fast.out == full.out
        # No such specialist: the light path hands over before printing anything; the full client says
        # who runs instead.
        fast, full = await anyio.to_thread.run_sync(lambda: both(settings, tmp_path, "apolo", "hi"))
        assert (fast.path, full.path) == ("full", "full")
        assert fast.code == full.code == 1
        assert (
            fast.err == full.err == "aish: no specialist named 'apolo' is running; did you mean 'apollo'?\n"
        )
    entries = logged(settings)
    # The error twice, with and without --json, then the unknown name once on each path.
    assert [e["status"] for e in entries] == ["error"] * 6
    assert entries[0] == entries[1] and entries[4] == entries[5]


@pytest.fixture
async def cancels(settings: TektonSettings) -> Any:
    """Every cancel published on the server: receive() gives the next one's subject."""
    nc = await nats.connect(settings.nats_url)
    send, receive = anyio.create_memory_object_stream[str](100)

    async def keep(msg: Any) -> None:
        send.send_nowait(msg.subject)

    await nc.subscribe("tekton.cancel.*.*", cb=keep)
    await nc.flush()
    yield receive
    await nc.close()


async def test_timeout_and_ctrl_c_cancel_the_request(
    settings: TektonSettings, tmp_path: Path, cancels: Any
) -> None:
    slow = {
        "TEKTON_SCRIPTED_TEXT": "line\n",
        "TEKTON_SCRIPTED_TOKENS": "200",
        "TEKTON_SCRIPTED_TOKENS_PER_S": "10",
    }
    with specialist_process(settings, "apollo", **slow):
        fast, full = await anyio.to_thread.run_sync(
            lambda: both(settings, tmp_path, "apollo", "hi", "--timeout", "1")
        )
        assert (fast.path, full.path) == ("fast", "full")
        assert fast.code == full.code == 1
        assert fast.err == full.err == "aish: no complete answer within --timeout 1 s; stopped the request\n"
        assert fast.out.startswith("line\n")
        with anyio.fail_after(10):
            seen = [await cancels.receive(), await cancels.receive()]
        # Ctrl-C while the answer streams.
        child = spawn(
            [sys.executable, "-c", WRAP, "apollo", "hi"],
            child_env(settings, AISH_PATH_MARK=str(tmp_path / "ctrl-c")),
            stderr=subprocess.PIPE,
        )
        await anyio.to_thread.run_sync(lambda: child.wait_for(lambda line: line == "line"))
        child.process.send_signal(signal.SIGINT)
        code = await anyio.to_thread.run_sync(lambda: child.process.wait(20))
        assert child.process.stderr is not None
        assert (code, child.process.stderr.read()) == (130, "aish: interrupted\n")
        assert (tmp_path / "ctrl-c").read_text() == "fast"
        with anyio.fail_after(10):
            seen.append(await cancels.receive())
    assert {subject.split(".")[2] for subject in seen} == {"anonymous"}
    entries = logged(settings)
    assert [e["status"] for e in entries] == ["interrupted"] * 3
    assert all(e["answer"].startswith("line\n") for e in entries)


async def test_signs_in_with_the_data_dirs_credentials_over_tls(tmp_path: Path) -> None:
    data = tmp_path / "data"
    users = Users(data, "tekton")
    users.ensure_local()
    tls = certs.generate(data / "tls")
    server = EmbeddedNats(data / "nats", port=0, auth_file=users.auth_file, tls=tls)
    server.start()
    try:
        assert server.url.startswith("tls://")
        settings = TektonSettings(nats_url=server.url, data_dir=data, heartbeat_s=0.2, idle_timeout_s=5.0)
        with specialist_process(settings, "apollo"):
            fast, full = await anyio.to_thread.run_sync(lambda: both(settings, tmp_path, "apollo", "hi"))
            assert (fast.path, full.path) == ("fast", "full")
            assert fast.code == full.code == 0, (fast.err, full.err)
            assert fast.out == full.out == "apollo heard: hi\n"
            # Credentials the server does not know: the light path hands over, the full client says so.
            eve = tmp_path / "eve.creds"
            save_credentials(eve, new_credentials("eve", "user")[0])
            denied = await anyio.to_thread.run_sync(
                lambda: run(settings, tmp_path, "apollo", "hi", TEKTON_CREDS=str(eve))
            )
            assert (denied.path, denied.code) == ("full", 1)
            assert "refused the credentials of 'eve'" in denied.err
    finally:
        server.stop()


async def test_what_the_light_path_does_not_do_goes_to_the_full_client(
    settings: TektonSettings, apollo: None, tmp_path: Path
) -> None:
    for args in (
        ("-c", "apollo hi"),
        ("apollo", "hi", "-o", "max_tokens=5"),
        ("apollo", "hi", "--nats", f"{settings.nats_url},nats://127.0.0.1:1"),
    ):
        got = await anyio.to_thread.run_sync(lambda a=args: run(settings, tmp_path, *a))
        assert (got.path, got.code) == ("full", 0), (args, got.err)
        assert got.out.startswith("apollo heard: "), args
    # A routed request not long ago: maybe a rerun that corrects the routing, the full client's to see.
    # What was piped in is read once, and the full client gets it all the same.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "last_route.json").write_text('{"text": "x", "chosen": "athena", "at": 0}')
    got = await anyio.to_thread.run_sync(lambda: run(settings, tmp_path, "apollo", stdin="piped text"))
    assert (got.path, got.code, got.out) == ("full", 0, "apollo heard: user: piped text\n"), got.err
    # An argument that is not UTF-8 (the shell passed bytes): one line, from the full client.
    got = await anyio.to_thread.run_sync(lambda: run(settings, tmp_path, "apollo", "\udcff"))
    assert (got.path, got.code) == ("full", 1)
    assert got.err == "aish: the request has text that is not valid Unicode (surrogates not allowed at 0)\n"
    # A setting only the full loader checks: it decides.
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "aish_client", "apollo", "hi"],
            env=child_env(settings, TEKTON_MAX_CONCURRENCY="many"),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    )
    assert done.returncode == 1 and re.match(r"aish: bad setting max_concurrency: ", done.stderr), done.stderr


async def test_a_real_one_shot_imports_nothing_heavy(settings: TektonSettings, apollo: None) -> None:
    """`python -X importtime -m aish_client apollo hi`, answered: no pydantic, structlog, asyncio..."""
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "aish_client", "apollo", "hi"],
            env=child_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    )
    assert (done.returncode, done.stdout) == (0, "apollo heard: user: hi\n"), done.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    heavy = sorted(m for m in loaded if m.split(".")[0] in LIGHT_PATH_NEVER)
    assert heavy == [], f"a one-shot imported {heavy}"


async def test_a_dropped_connection_mid_answer_goes_on_from_the_runs_stream(tmp_path: Path) -> None:
    """The server restarts while the light path streams: the full client reads the rest of the run."""
    server = EmbeddedNats(tmp_path / "store", port=free_ports(1)[0])
    server.start()
    settings = TektonSettings(
        nats_url=server.url, data_dir=tmp_path / "data", heartbeat_s=0.2, idle_timeout_s=5.0
    )
    slow = {"TEXT": "line\n", "TOKENS": "40", "TOKENS_PER_S": "10"}
    try:
        with specialist_process(settings, "apollo", **{f"TEKTON_SCRIPTED_{k}": v for k, v in slow.items()}):
            child = spawn(
                [sys.executable, "-c", WRAP, "apollo", "hi"],
                child_env(settings, AISH_PATH_MARK=str(tmp_path / "mark")),
                stderr=subprocess.PIPE,
            )
            await anyio.to_thread.run_sync(lambda: child.wait_for(lambda line: line == "line"))
            await anyio.to_thread.run_sync(server.stop)
            await anyio.to_thread.run_sync(server.start)
            code = await anyio.to_thread.run_sync(lambda: child.process.wait(60))
            assert child.process.stderr is not None
            err = child.process.stderr.read()
            assert code == 0, err
            out = [line for line in child.seen] + list(iter(lambda: child.lines.get(timeout=10), None))
            assert out == ["line"] * 40, out
            assert "(the connection dropped frames; the answer goes on from frame " in err
            assert (tmp_path / "mark").read_text() == "resumed"
    finally:
        server.stop()


def _on_a_terminal(settings: TektonSettings, tmp: Path, *args: str, full: bool = False) -> tuple[str, str]:
    """`aish ARGS` with stderr on a pseudo-terminal (so the spinner and the footer show), stdout piped."""
    import pty

    main, side = pty.openpty()
    extra = {"AISH_PATH_MARK": str(tmp / "tty-mark"), "NO_COLOR": "1"}
    if full:
        extra["TEKTON_AISH_FAST"] = "0"
    try:
        done = subprocess.run(
            [sys.executable, "-c", WRAP, *args],
            env=child_env(settings, **extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=side,
            text=True,
            timeout=60,
        )
        os.close(side)
        err = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(main)
    assert done.returncode == 0, err
    # Figures that differ from run to run: the first token's ms, tokens/s.
    return done.stdout, re.sub(r"\d+ (ms|tok/s)", r"N \1", err.decode())


async def test_the_footer_on_a_terminal_matches(
    settings: TektonSettings, apollo: None, tmp_path: Path
) -> None:
    fast = await anyio.to_thread.run_sync(lambda: _on_a_terminal(settings, tmp_path, "apollo", "hi"))
    assert (tmp_path / "tty-mark").read_text() == "fast"
    full = await anyio.to_thread.run_sync(
        lambda: _on_a_terminal(settings, tmp_path, "apollo", "hi", full=True)
    )
    assert fast == full
    assert "── apollo · first token N ms · N tok/s · " in fast[1] and "scripted:scripted" in fast[1]
