"""The REPL as a person uses it: a real terminal (tmux), real aish, real gateway and specialists."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from aish_client.render import Renderer
from aish_client.repl import needs_more
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from tests.helpers import child_env, env, eventually, in_process_gateway, in_process_specialists

pytestmark = [pytest.mark.anyio, pytest.mark.terminal]

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    """One tmux session running a command; keys in, screen out."""

    def __init__(self, command: str, env: dict[str, str], width: int = 120, height: int = 30):
        self.name = f"aish-{uuid.uuid4().hex[:8]}"
        env_args = [
            arg
            for k, v in env.items()
            if k.startswith(("TEKTON_", "PATH", "HOME"))
            for arg in ("-e", f"{k}={v}")
        ]
        subprocess.run(
            [
                "tmux",
                "new-session",
                "-d",
                "-s",
                self.name,
                "-x",
                str(width),
                "-y",
                str(height),
                *env_args,
                command,
            ],
            check=True,
        )

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)

    def screen(self) -> str:
        done = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return done.stdout

    async def wait_for(self, text: str, within: float = 15.0) -> str:
        async def shows() -> bool:
            return text in await anyio.to_thread.run_sync(self.screen)

        try:
            await eventually(shows, within=within)
        except TimeoutError:
            raise AssertionError(f"{text!r} never appeared; the screen:\n{self.screen()}") from None
        return self.screen()

    async def prompt(self) -> None:
        """Wait for an empty prompt below everything else, so typed keys reach it (not the answer)."""

        def ready() -> bool:
            lines = [line.rstrip() for line in self.screen().splitlines() if line.strip()]
            body = [line for line in lines if not line.startswith(" NATS")]
            return bool(body) and body[-1] == "aish>"

        try:
            await eventually(ready, within=15)
        except TimeoutError:
            raise AssertionError(f"no prompt; the screen:\n{self.screen()}") from None

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()


def aish_command(extra: str = "") -> str:
    return f"{sys.executable} -m aish_client {extra}".strip()


@needs_tmux
async def test_typing_a_pipeline_streams_the_answer_then_a_footer(
    settings: TektonSettings, terminals: list[Terminal]
) -> None:
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="5", TEKTON_SCRIPTED_FIRST_TOKEN_MS="300"):
        async with in_process_gateway(settings), in_process_specialists(settings, "apollo", "athena"):
            term = Terminal(aish_command(), child_env(settings))
            terminals.append(term)
            await term.wait_for("aish>")
            assert "new session" in term.screen() and "session " in term.screen()  # toolbar
            term.type('echo "one two three four" | apollo')
            term.send("Enter")
            await term.wait_for("apollo is thinking")
            partial = await term.wait_for("apollo heard:")
            assert "four" not in partial.split("apollo heard:")[-1]  # tokens arrive one by one
            final = await term.wait_for("── apollo · first token")
            assert "apollo heard: one two three four" in final and "tok/s" in final
            # The session remembers: the next question went through the gateway with context.
            await term.prompt()
            term.type("session")
            term.send("Enter")
            await term.wait_for("[2] apollo: apollo heard: one two three four")


@needs_tmux
async def test_ctrl_c_mid_answer_stops_the_specialist_and_returns_to_the_prompt(
    settings: TektonSettings, terminals: list[Terminal]
) -> None:
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20", TEKTON_SCRIPTED_TOKENS="1000"):
        async with in_process_gateway(settings), in_process_specialists(settings, "athena") as services:
            term = Terminal(aish_command(), child_env(settings))
            terminals.append(term)
            await term.wait_for("aish>")
            term.type('athena "talk for a long time"')
            term.send("Enter")
            await term.wait_for("athena heard: talk for")
            term.send("C-c")
            await term.wait_for("cancelled")
            await term.prompt()

            def stopped() -> bool:
                athena = services["athena"].counters
                return athena.cancelled == 1 and athena.in_flight == 0

            await eventually(stopped)
            assert services["athena"].counters.served == 0
            # Still usable: Ctrl-C at the prompt clears the line, the next question runs.
            term.type("half a line")
            term.send("C-c")
            term.type("help")
            term.send("Enter")
            screen = await term.wait_for("history  numbered history")
            assert "half a line" not in screen


@needs_tmux
async def test_completion_errors_and_history_after_a_restart(
    settings: TektonSettings, terminals: list[Terminal]
) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo", "athena", "prometheus"),
    ):
        term = Terminal(aish_command(), child_env(settings))
        terminals.append(term)
        await term.wait_for("3 specialists")  # the toolbar: names are known, completion can offer them
        term.type("prom")
        term.send("Tab")
        await term.wait_for("aish> prometheus")
        term.type(' "a plan"')
        term.send("Enter")
        await term.wait_for("prometheus heard: a plan")
        await term.prompt()
        term.type("@plan")
        term.send("Tab")
        await term.wait_for("aish> @planning")
        term.send("C-c")
        term.type('apollo "x" | }')
        term.send("Enter")
        screen = await term.wait_for("^")
        await term.prompt()
        assert "expected a specialist name" in screen
        term.type('echo "two lines" |')
        term.send("Enter")
        term.type("athena")
        term.send("Enter")
        await term.wait_for("athena heard: two lines")
        term.send("C-d")
        again = Terminal(aish_command(), child_env(settings))
        terminals.append(again)
        await again.wait_for("aish>")
        again.send("Up")
        await again.wait_for("athena")
        # Up walks the two-line entry's lines first, then older entries.
        again.send("Up", "Up", "Up")
        await again.wait_for('aish> prometheus "a plan"')


@needs_tmux
async def test_answers_go_to_a_file_when_stdout_is_not_a_terminal(
    settings: TektonSettings, terminals: list[Terminal], tmp_path: Path
) -> None:
    out = tmp_path / "answers.txt"
    async with in_process_gateway(settings), in_process_specialists(settings, "apollo"):
        term = Terminal(aish_command(f"> {out}"), child_env(settings))
        terminals.append(term)
        await term.wait_for("aish>")
        term.type('apollo "into the file"')
        term.send("Enter")

        def written() -> bool:
            return out.exists() and "apollo heard: into the file" in out.read_text()

        await eventually(written)
        assert "\x1b" not in out.read_text()


def test_renderer_plain_without_a_terminal_or_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    r = Renderer(out, err)
    r.footers = True
    r.waiting("apollo")
    r.tick()
    r.token("hello")
    r.footer("apollo", 57.4, 68.2)
    r.error("boom")
    assert out.getvalue() == "hello\n"
    assert err.getvalue() == "── apollo · first token 57 ms · 68 tok/s\naish: boom\n"  # no spinner, no colour

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty_err = Tty()
    colored = Renderer(io.StringIO(), tty_err)
    colored.waiting("athena")
    colored.token("x")
    assert "athena is thinking" in tty_err.getvalue() and "\x1b[2m" in tty_err.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain_err = Tty()
    Renderer(io.StringIO(), plain_err).error("boom")
    assert plain_err.getvalue() == "aish: boom\n"


def test_enter_continues_an_unfinished_pipeline() -> None:
    assert needs_more('echo "x" |')
    assert needs_more("apollo,")
    assert needs_more('apollo << "unterminated')
    assert needs_more("{apollo|athena")
    assert needs_more("apollo \\")
    assert not needs_more('apollo "done"')
    assert not needs_more("{apollo|athena} | prometheus")
    assert not needs_more("")


@needs_tmux
async def test_a_lost_nats_connection_shows_in_the_toolbar_and_heals(
    tmp_path: Path, settings: TektonSettings, terminals: list[Terminal]
) -> None:
    server = EmbeddedNats(tmp_path / "own-store", port=0)
    server.start()
    here = settings.model_copy(update={"nats_url": server.url})
    try:
        async with in_process_gateway(here), in_process_specialists(here, "apollo"):
            term = Terminal(aish_command(), child_env(here))
            terminals.append(term)
            await term.wait_for("aish>")
            port = server.port
            server.stop()
            await term.wait_for("NATS disconnected: reconnecting")
            server = EmbeddedNats(tmp_path / "own-store", port=port or 0)
            server.start()
            await term.wait_for(f"NATS {here.nats_url}")
            await term.prompt()

            # The specialist reconnects on its own schedule too: ask until it answers.
            for attempt in range(10):
                term.type(f'apollo "back again {attempt}"')
                term.send("Enter")
                expected = f"apollo heard: back again {attempt}"
                try:
                    await eventually(lambda: expected in term.screen(), within=2)  # noqa: B023
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError(f"no answer after the server came back:\n{term.screen()}")
    finally:
        server.stop()
