"""Run a parsed pipeline: each stage's whole answer is the next stage's input; the last one streams."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from aish_client.fanout import Layout, plan_pipeline, run_plan
from aish_client.parser import Pipeline, Target
from aish_client.render import Renderer
from bus.client import Bus
from bus.errors import (
    BadRequest,
    BusError,
    Cancelled,
    GatewayUnavailable,
    PayloadTooLarge,
    SessionNotFound,
)
from bus.wire import ChatMessage, ChatOptions


def compose(message: str | None, piped: str | None) -> str:
    """A stage's prompt: its own message, then the text piped into it."""
    parts = [p for p in (message, piped) if p]
    return "\n\n".join(parts)


async def choose(bus: Bus, target: Target, text: str, renderer: Renderer) -> list[str]:
    """The specialists to try for ``target``, best first; for ``@capability`` / ``@auto`` says why."""
    names, why = await bus.gateway.pick(str(target), text)
    if why:
        renderer.note(why)
    return names


async def run_pipeline(
    bus: Bus,
    pipeline: Pipeline,
    renderer: Renderer,
    *,
    stdin_text: str | None = None,
    options: ChatOptions | None = None,
    session: str | None = None,
    layout: Layout = "stacked",
) -> str:
    """Run ``pipeline``; returns the last stage's whole answer. With ``session`` every stage is a turn
    of that session, so each stage (and the next command) sees what came before."""
    text = pipeline.source.text if pipeline.source else stdin_text
    if any(stage.fan_out for stage in pipeline.stages):
        # Several specialists at once: the gateway runs the whole pipeline as one dependency graph.
        chosen = {
            t: (await choose(bus, t, stage.message or text or "", renderer))[0]
            for stage in pipeline.stages
            for t in stage.targets
            if t.capability
        }
        plan, shown = plan_pipeline(pipeline, text, options, session, chosen)
        with ExitStack() as files:
            await run_plan(bus, plan, shown, renderer, layout=layout, out=_open_output(pipeline, files))
        return ""
    if not pipeline.stages:
        # `echo x > file`: nothing to ask, just write.
        _write_output(pipeline, renderer, text or "")
        return text or ""
    with ExitStack() as files:
        out = _open_output(pipeline, files)
        for i, stage in enumerate(pipeline.stages):
            last = i == len(pipeline.stages) - 1
            target = stage.targets[0]
            prompt = compose(stage.message, text)
            if not prompt.strip():
                raise BusError(
                    f"'{target}' got no input: give it a message ({target} \"...\"), "
                    "pipe text in, or use echo"
                )
            candidates = await choose(bus, target, prompt, renderer)
            messages = [ChatMessage(role="user", content=prompt)]
            for n, name in enumerate(candidates):
                stage_out = _StageOutput(renderer, name, last, out)
                try:
                    async with bus.stream(name, messages, options, session=session) as s:
                        s.on_resume = lambda seq: renderer.note(
                            f"(the connection dropped frames; the answer goes on from frame {seq})"
                        )
                        async for chunk in s:
                            stage_out.chunk(chunk)
                    result = await s.result()
                    if last and s.first_chunk_at is not None:
                        renderer.footer(
                            name, (s.first_chunk_at - s.sent_at) * 1000, result.done.timings.tokens_per_s
                        )
                    break
                except BusError as err:
                    if stage_out.tokens or n + 1 == len(candidates) or not _worth_another(err):
                        raise
                    renderer.note(f"{name} failed before answering ({err}); trying {candidates[n + 1]}")
            stage_out.done()
            text = result.text
        if out is None:
            renderer.end_answer()
    return text or ""


def _worth_another(err: BusError) -> bool:
    """An error another specialist might not have (not the request's own fault, not a cancel)."""
    return not isinstance(
        err, BadRequest | PayloadTooLarge | Cancelled | SessionNotFound | GatewayUnavailable
    )


class _StageOutput:
    """Where one stage's tokens go: the screen or a file for the last stage, progress for the others."""

    def __init__(self, renderer: Renderer, name: str, last: bool, out: TextIO | None):
        self.renderer, self.name, self.last, self.out = renderer, name, last, out
        self.tokens = 0
        if not last:
            renderer.progress(name, 0)
        elif out is None:
            renderer.waiting(name)

    def chunk(self, text: str) -> None:
        self.tokens += 1
        if not self.last:
            self.renderer.progress(self.name, self.tokens)
        elif self.out is None:
            self.renderer.token(text)
        else:
            self.out.write(text)

    def done(self) -> None:
        self.renderer.stop_waiting()
        if not self.last:
            self.renderer.progress(self.name, self.tokens, done=True)
            self.renderer.clear_progress()


def _open_output(pipeline: Pipeline, files: ExitStack) -> TextIO | None:
    if pipeline.redirect is None:
        return None
    path = Path(pipeline.redirect.path).expanduser()
    try:
        return files.enter_context(path.open("a" if pipeline.redirect.append else "w", encoding="utf-8"))
    except OSError as err:
        raise BusError(f"cannot write {path}: {err.strerror}") from err


def _write_output(pipeline: Pipeline, renderer: Renderer, text: str) -> None:
    with ExitStack() as files:
        out = _open_output(pipeline, files)
        if out is None:
            renderer.token(text)
            renderer.end_answer()
        else:
            out.write(text + "\n")
