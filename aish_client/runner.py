"""Run a parsed pipeline: each stage's whole answer is the next stage's input; the last one streams."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from aish_client import routes
from aish_client.fanout import Layout, plan_pipeline, run_plan
from aish_client.parser import AUTO, Pipeline, Target
from aish_client.render import Renderer
from bus.client import Bus
from bus.errors import BusError
from bus.failover import Opened, open_first
from bus.wire import ChatMessage, ChatOptions


def compose(message: str | None, piped: str | None) -> str:
    """A stage's prompt: its own message, then the text piped into it."""
    parts = [p for p in (message, piped) if p]
    return "\n\n".join(parts)


async def choose(bus: Bus, target: Target, text: str, renderer: Renderer) -> list[str]:
    """The specialists to try for ``target``, best first; for ``@capability`` / ``@auto`` says why.
    A routed request is remembered, and a named rerun of it corrects the routing (aish_client.routes)."""
    if not target.capability:
        note = await routes.correct_if_rerun(bus, target.name, text)
        if note:
            renderer.note(note)
    names, why = await bus.gateway.pick(str(target), text)
    if why:
        renderer.note(why)
    if target.capability and target.name == AUTO:
        routes.remember(bus, text, names[0])
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
            opened, stage_out = await _open_stage(
                bus, candidates, messages, options, session, _StageOutputs(renderer, last, out)
            )
            async with opened.stream as s:
                s.on_resume = lambda seq: renderer.note(
                    f"(the connection dropped frames; the answer goes on from frame {seq})"
                )
                async for chunk in opened.texts:
                    stage_out.chunk(chunk)
            result = await s.result()
            if last and s.first_chunk_at is not None:
                renderer.footer(
                    opened.name, (s.first_chunk_at - s.sent_at) * 1000, result.done.timings.tokens_per_s
                )
            stage_out.done()
            text = result.text
        if out is None:
            renderer.end_answer()
    return text or ""


class _StageOutputs:
    """Makes the output of each candidate tried for one stage; the last one made is the one answering."""

    def __init__(self, renderer: Renderer, last: bool, out: TextIO | None):
        self.renderer, self.last, self.out = renderer, last, out
        self.made: list[_StageOutput] = []

    def attempt(self, name: str) -> None:
        self.made.append(_StageOutput(self.renderer, name, self.last, self.out))

    def skipped(self, name: str, err: BusError, then: str) -> None:
        self.renderer.stop_waiting()
        self.renderer.note(f"{name} failed before answering ({err}); trying {then}")


async def _open_stage(
    bus: Bus,
    candidates: list[str],
    messages: list[ChatMessage],
    options: ChatOptions | None,
    session: str | None,
    outputs: _StageOutputs,
) -> tuple[Opened, _StageOutput]:
    opened = await open_first(
        candidates,
        lambda name: bus.stream(name, messages, options, session=session),
        on_try=outputs.attempt,
        on_skip=outputs.skipped,
    )
    return opened, outputs.made[-1]


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
    path = Path(pipeline.redirect.path)
    try:
        path = path.expanduser()
        return files.enter_context(path.open("a" if pipeline.redirect.append else "w", encoding="utf-8"))
    except RuntimeError as err:  # `~nosuchuser/x`: no such user to find a home for
        raise BusError(f"cannot write {path}: {err}") from err
    except OSError as err:
        raise BusError(f"cannot write {path}: {err.strerror or err}") from err


def _write_output(pipeline: Pipeline, renderer: Renderer, text: str) -> None:
    with ExitStack() as files:
        out = _open_output(pipeline, files)
        if out is None:
            renderer.token(text)
            renderer.end_answer()
        else:
            out.write(text + "\n")
