"""Output on a real terminal (tmux): markdown rendered, a footer after one-shot answers, and
`tekton up -- aish` (what `./dev.sh up` runs) showing a clean prompt with no log lines."""

from __future__ import annotations

import shlex
import sys

import pytest

from bus.settings import TektonSettings
from tests.helpers import child_env, env, in_process_specialists
from tests.test_repl import Terminal, needs_tmux, terminals

pytestmark = [pytest.mark.anyio, needs_tmux, pytest.mark.terminal]
__all__ = ["terminals"]  # the fixture, shared with test_repl

MARKDOWN = "# Queue groups\n\nThey share **work** between `replicas`.\n\n```\nnc.subscribe(q)\n```\n"


def hold(command: str) -> str:
    """Keep the pane open after a one-shot command, so its output can be read."""
    return f"bash -c {shlex.quote(command + '; echo EXITED $?; sleep 120')}"


async def test_one_shot_answers_render_markdown_with_a_footer(
    settings: TektonSettings, terminals: list[Terminal]
) -> None:
    with env(TEKTON_SCRIPTED_TEXT=MARKDOWN):
        async with in_process_specialists(settings, "apollo"):
            term = Terminal(hold(f"{sys.executable} -m aish_client apollo hi"), child_env(settings))
            terminals.append(term)
            screen = await term.wait_for("EXITED 0")
            piped = Terminal(hold(f"{sys.executable} -m aish_client apollo hi | cat"), child_env(settings))
            terminals.append(piped)
            plain = await piped.wait_for("EXITED 0")
    assert "Queue groups" in screen and "# Queue groups" not in screen
    assert "They share work between replicas." in screen  # ** and ` gone: rendered
    assert "nc.subscribe(q)" in screen and "```" not in screen
    assert "── apollo · first token" in screen and "scripted:scripted" in screen
    assert " in / " in screen and " out" in screen and "? in" not in screen
    # Piped: the text as it came, and no footer on stdout.
    assert "# Queue groups" in plain and "**work**" in plain and "```" in plain


async def test_tekton_up_with_aish_shows_a_clean_prompt(
    settings: TektonSettings, terminals: list[Terminal]
) -> None:
    command = f"{sys.executable} -m tekton up --provider scripted -- {sys.executable} -m aish_client"
    term = Terminal(command, child_env(settings, TEKTON_LOG_LEVEL="info"))
    terminals.append(term)
    await term.wait_for("aish>", within=60)
    await term.prompt()
    term.type('apollo -m scripted:per-stage "hello there"')
    term.send("Enter")
    screen = await term.wait_for("── apollo", within=30)
    assert "apollo heard: hello there" in screen and "scripted:per-stage" in screen
    for noise in ("[info", "[warning", "nats-server", "gateway ready", "specialist ready", "Tekton is up"):
        assert noise not in screen, f"{noise!r} on the screen:\n{screen}"
    term.send("C-d")
