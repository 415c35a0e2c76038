"""What people expect of a shell tool, tried as they would: --version, help per subcommand, completion,
--system, -o, -f, stdin plus prompt, --json, the max-tokens mark, `aish logs`, `tekton logs`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aish_client.cli import build_parser
from aish_client.completion import SUBCOMMANDS
from aish_client.completion import script as completion_script
from aish_client.prompt_parts import UsageError, attachments, chat_options
from bus.client import Bus
from bus.settings import TektonSettings
from bus.wire import ChatOptions
from tests.helpers import AISH, aish, child_env, env, in_process_gateway, in_process_specialists, run_aish

pytestmark = pytest.mark.anyio

TEKTON = [sys.executable, "-m", "tekton"]


def run(argv: list[str], settings: TektonSettings, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=child_env(settings, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_version_on_both_commands(settings: TektonSettings) -> None:
    for argv, prog in ((AISH, "aish"), (TEKTON, "tekton")):
        done = run([*argv, "--version"], settings)
        assert done.returncode == 0 and done.stdout.startswith(f"{prog} 0."), done.stdout + done.stderr


@pytest.mark.parametrize(
    ("words", "usage"),
    [
        (["sessions", "-h"], "usage: aish sessions"),
        (["sessions", "fork", "-h"], "usage: aish sessions fork"),
        (["logs", "-h"], "usage: aish logs"),
        (["list", "--help"], "usage: aish list"),
        (["bulk", "-h"], "usage: aish bulk"),
        (["completion", "-h"], "usage: aish completion"),
        (["-h"], "usage: aish"),
    ],
)
def test_every_subcommand_has_its_own_help(settings: TektonSettings, words: list[str], usage: str) -> None:
    done = run([*AISH, *words], settings)
    assert done.returncode == 0 and done.stdout.startswith(usage), done.stdout + done.stderr


def test_tekton_subcommands_have_help(settings: TektonSettings) -> None:
    for sub in ("models", "logs", "up"):
        done = run([*TEKTON, sub, "-h"], settings)
        assert done.returncode == 0 and f"usage: tekton {sub}" in done.stdout


@pytest.mark.fast
def test_bash_completion_completes_subcommands_names_and_options(settings: TektonSettings) -> None:
    script = completion_script("bash")  # what `aish completion bash` prints (checked below for zsh/fish)
    if shutil.which("bash") is None:
        pytest.skip("no bash")

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        probe = (
            f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
            '_aish; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        return subprocess.run(
            ["bash", "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()

    assert {"apollo", "athena"} <= set(complete("aish a"))
    assert "sessions" in complete("aish se")
    assert set(complete("aish sessions ")) >= {"list", "show", "rm", "fork", "rename"}
    assert "--model" in complete("aish --mo")
    assert "repeat_penalty=" in complete("aish -o rep")
    # Everything aish takes completes: each subcommand it dispatches and each option of its parser.
    assert set(complete("aish ")) >= set(SUBCOMMANDS)
    options = {o for action in build_parser()._actions for o in action.option_strings}
    assert set(complete("aish -")) >= options, options - set(complete("aish -"))


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_parse(settings: TektonSettings, shell: str) -> None:
    script = run([*AISH, "completion", shell], settings).stdout
    assert "apollo" in script
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    check = ["zsh", "-n", "-c", script] if shell == "zsh" else ["fish", "--no-execute", "-c", script]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0


@pytest.mark.fast
def test_options_and_attachments_in_process(tmp_path: Path) -> None:
    assert chat_options(["temperature=0.2", "repeat-penalty=1.2"], max_tokens=5) == ChatOptions(
        max_tokens=5, temperature=0.2, repeat_penalty=1.2
    )
    with pytest.raises(UsageError, match="no such option"):
        chat_options(["colour=red"])
    with pytest.raises(UsageError, match="less than or equal to 2"):
        chat_options(["temperature=9"])
    (tmp_path / "x.md").write_text("hello\n")
    assert (
        attachments([str(tmp_path / "*.md")])
        == f"--- {tmp_path / 'x.md'} ---\nhello\n--- end of {tmp_path / 'x.md'} ---"
    )
    assert attachments([]) is None


async def test_system_options_files_and_stdin_reach_the_specialist(
    settings: TektonSettings, tmp_path: Path
) -> None:
    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "b.py").write_text("print('b')\n")
    with env(TEKTON_SCRIPTED_ECHO_CONTEXT="1"):
        async with in_process_specialists(settings, "apollo"):
            done = await run_aish(
                settings, "--system", "answer in French", "-f", str(tmp_path / "*.py"), "apollo", "review"
            )
            assert done.returncode == 0, done.stderr
            assert "system: answer in French | user: review" in done.stdout
            assert f"--- {tmp_path / 'a.py'} ---\nprint('a')" in done.stdout and "print('b')" in done.stdout
            piped = await anyio_run(settings, "apollo", "summarize", stdin="piped text")
            assert "user: summarize\n\npiped text" in piped.stdout
            capped = await run_aish(
                settings, "-o", "max_tokens=2", "-o", "temperature=0.2", "apollo", "x y z"
            )
            assert capped.returncode == 0
            assert capped.stdout.split() == ["apollo", "heard:"]
            assert "stopped at max tokens (2)" in capped.stderr  # a visible mark, not a silent cut


async def anyio_run(settings: TektonSettings, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    from functools import partial

    import anyio

    return await anyio.to_thread.run_sync(partial(aish, settings, *args, stdin=stdin))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "colour=red"], "-o colour: no such option"),
        (["-o", "temperature=hot"], "-o temperature=hot"),
        (["-o", "max_tokens"], "-o takes key=value"),
        (["-f", "/nonexistent/x.txt"], "-f /nonexistent/x.txt: no such file"),
        (["-f", "/nonexistent/*.txt"], "no file matches"),
    ],
)
def test_bad_options_and_files_are_usage_errors(
    settings: TektonSettings, args: list[str], message: str
) -> None:
    done = aish(settings, *args, "apollo", "hi")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1


def test_attachments_have_size_limits_and_must_be_text(settings: TektonSettings, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("x" * (300 * 1024))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 10)
    done = aish(settings, "-f", str(big), "apollo", "hi")
    assert done.returncode == 2 and "over the 256 KiB limit" in done.stderr
    done = aish(settings, "-f", str(binary), "apollo", "hi")
    assert done.returncode == 2 and "not UTF-8 text" in done.stderr


async def test_timeout_is_each_requests_deadline(settings: TektonSettings) -> None:
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="10", TEKTON_SCRIPTED_TOKENS="1000"):
        async with in_process_specialists(settings, "apollo"):
            done = await run_aish(settings, "--timeout", "0.5", "apollo", "talk")
    assert done.returncode == 1
    # The whole run's deadline (the request carries it too, so the specialist stops on its own as well).
    assert "within --timeout 0.5 s" in done.stderr and "Traceback" not in done.stderr


async def test_json_events_for_scripts(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"):
        done = await run_aish(settings, "--json", "apollo", "one two")
        missing = await run_aish(settings, "--json", "nobody", "hi")
    assert done.returncode == 0
    seen = [json.loads(line) for line in done.stdout.splitlines()]
    # The first token alone, the other three in one to three more chunks (a burst shares a chunk).
    kinds = [e["event"] for e in seen]
    assert kinds[:2] == ["start", "chunk"] and kinds[-1] == "done" and set(kinds[1:-1]) == {"chunk"}, kinds
    assert seen[1]["text"] == "apollo " and 2 <= len(kinds) - 2 <= 4, kinds
    assert "".join(e["text"] for e in seen if e["event"] == "chunk") == "apollo heard: one two"
    assert seen[-1]["finish_reason"] == "stop" and seen[-1]["usage"]["completion_tokens"] == 4
    assert seen[-1]["usage"]["prompt_tokens"] > 2
    assert missing.returncode == 1
    error = json.loads(missing.stdout.splitlines()[-1])
    assert error["event"] == "error" and error["code"] == "specialist_unavailable"


async def test_logs_record_every_prompt_and_answer(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo", "athena"):
        await run_aish(settings, "apollo", "first question")
        await run_aish(settings, "-c", 'echo "piped" | athena "second question"')
        await run_aish(settings, "--no-log", "apollo", "secret question")
    last = aish(settings, "logs", "-n", "1")
    assert "athena" in last.stdout and "> second question" in last.stdout and "first" not in last.stdout
    assert "? in" not in last.stdout and " in / 5 out" in last.stdout  # token counts, both ways
    found = aish(settings, "logs", "-q", "FIRST", "--json")
    entries = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(entries) == 1 and entries[0]["answer"] == "apollo heard: first question"
    assert entries[0]["tokens_out"] == 4 and entries[0]["model"] == "scripted"
    # The scripted provider counts words: the persona's and the question's.
    assert entries[0]["tokens_in"] > 2  # more than "first question"
    assert "secret" not in aish(settings, "logs", "-n", "10").stdout


async def test_sessions_last_until_deleted_by_default(settings: TektonSettings) -> None:
    assert TektonSettings().session_ttl_s == 0
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        await bus.gateway.create(name="keeps")
        kv = await bus.nc.jetstream().key_value("tekton_sessions")
        status = await kv.status()
    assert not status.ttl  # max_age 0: no expiry


@pytest.mark.fast
async def test_an_existing_sessions_bucket_takes_the_configured_ttl(settings: TektonSettings) -> None:
    async def bucket_ttl(ttl_s: float) -> float:
        """Start a gateway configured with ``ttl_s``; the TTL the bucket then has (max_age, seconds)."""
        async with (
            in_process_gateway(settings.model_copy(update={"session_ttl_s": ttl_s})),
            Bus.connect(settings) as bus,
        ):
            if await bus.gateway.find("kept") is None:
                await bus.gateway.create(name="kept")
            kv = await bus.nc.jetstream().key_value("tekton_sessions")
            return (await kv.status()).ttl or 0.0

    assert await bucket_ttl(0) == 0
    assert await bucket_ttl(3600) == 3600  # the bucket was made without one: it takes the new TTL
    assert await bucket_ttl(30) == 30
    assert await bucket_ttl(0) == 0  # and back to "until deleted"
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        assert (await bus.gateway.get("kept")).name == "kept"  # nothing stored was lost on the way


def test_tekton_up_logs_to_a_file_not_into_the_command(settings: TektonSettings) -> None:
    up = run(
        [*TEKTON, "up", "--provider", "scripted", "--log-level", "info", "--", *AISH, "-c", 'athena "hi"'],
        settings,
    )
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == "athena heard: hi"  # nothing but the answer on the terminal
    assert up.stderr == ""
    logs = run([*TEKTON, "logs"], settings)
    assert f"using the nats-server already running at {settings.nats_url}" in logs.stdout
    assert "Tekton is up" in logs.stdout and "Tekton stopped" in logs.stdout


@pytest.mark.fast
def test_markdown_is_redrawn_block_by_block_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from aish_client.render import Renderer

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    out = Tty()
    renderer = Renderer(out, Tty())
    renderer.render_markdown()
    for token in ["# Ti", "tle\n", "\n", "some **bo", "ld** text"]:
        renderer.answer(token)
    first = out.getvalue()
    assert "# Title\n\n" in first and "\x1b[2A\x1b[J" in first  # raw, then back up over it
    assert "some **bold** text" in first.split("\x1b[J")[-1]  # the unfinished block stays raw for now
    renderer.end_answer()
    assert "**" not in out.getvalue().split("\x1b[J")[-1]  # redrawn rendered
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Tty()
    piped = Renderer(plain, Tty())
    piped.render_markdown()
    piped.answer("# Title\n\n**x**\n\n")
    assert plain.getvalue() == "# Title\n\n**x**\n\n"
