"""Run a parsed pipeline: each stage's whole answer is the next stage's input; the last one streams."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TextIO

from aish_client import routes
from aish_client.fanout import Layout, plan_pipeline, run_plan
from aish_client.logbook import Logbook
from aish_client.oneshot import compose
from aish_client.output import DEMO_MODEL, DEMO_NOTE, StageOutput
from aish_client.parser import AUTO, Pipeline, Target
from aish_client.prompt_parts import UsageError
from aish_client.render import Renderer
from bus.client import Bus, ChatStream
from bus.errors import BusError
from bus.failover import open_first
from bus.wire import ChatMessage, ChatOptions

__all__ = ["DEMO_MODEL", "DEMO_NOTE", "compose", "run_pipeline"]

_StageOutput = StageOutput


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
    model: str | None = None,
    system: str | None = None,
    logbook: Logbook | None = None,
    deadline_s: float | None = None,
) -> str:
    """Run ``pipeline``; returns the last stage's whole answer. With ``session`` every stage is a turn
    of that session, so each stage (and the next command) sees what came before. ``model`` is the
    model of every stage that names none (``apollo -m ...``); ``system`` a system prompt for each;
    ``logbook`` records every prompt and answer; ``deadline_s`` is each request's deadline (seconds)."""
    text = pipeline.source.text if pipeline.source else stdin_text
    if any(stage.fan_out for stage in pipeline.stages):
        # Several specialists at once: the gateway runs the whole pipeline as one dependency graph.
        chosen = {
            t: (await choose(bus, t, stage.message or text or "", renderer))[0]
            for stage in pipeline.stages
            for t in stage.targets
            if t.capability
        }
        plan, shown = plan_pipeline(pipeline, text, options, session, chosen, model)
        with ExitStack() as files:
            out = _open_output(pipeline, files)
            await run_plan(bus, plan, shown, renderer, layout=layout, out=out, logbook=logbook)
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
                # The first stage's input is the command's; a later one's is what the stage before said.
                raise (UsageError if i == 0 else BusError)(
                    f"'{target}' got no input: give it a message ({target} \"...\"), "
                    "pipe text in, or use echo"
                )
            candidates = await choose(bus, target, prompt, renderer)
            messages = [ChatMessage(role="user", content=prompt)]
            if system:
                messages.insert(0, ChatMessage(role="system", content=system))
            stage_model = stage.model or model
            outputs = _StageOutputs(renderer, last, out, i + 1)
            attempts = _Attempts(bus, messages, options, session, stage_model, deadline_s, outputs)
            if logbook is not None:
                attempts.on_failure = partial(
                    logbook.record_failure, model=stage_model, prompt=prompt, system=system, session=session
                )
            try:
                opened = await open_first(
                    candidates, attempts.open_one, on_try=outputs.attempt, on_skip=attempts.skipped
                )
                stage_out = outputs.made[-1]
                opened.stream.on_tool = renderer.tool  # MCP tool calls, as they happen (stderr)
                for frame in opened.stream.tool_frames:  # any read while finding who answers
                    renderer.tool(frame)
                async with opened.stream as s:
                    s.on_resume = lambda seq: renderer.note(
                        f"(the connection dropped frames; the answer goes on from frame {seq})"
                    )
                    async for chunk in opened.texts:
                        stage_out.started(s.start_frame)
                        stage_out.chunk(chunk)
                result = await s.result()
                stage_out.started(result.start)
            except BaseException as err:  # Ctrl-C too: what was said so far is still worth keeping
                if outputs.made:
                    attempts.failed(outputs.made[-1].name, err)
                raise
            name = opened.name
            stage_out.done(result.done.usage.completion_tokens)
            first_ms = (s.first_chunk_at - s.sent_at) * 1000 if s.first_chunk_at is not None else None
            if logbook is not None:
                logbook.record(name, prompt, system, result, session, s.request.id, first_ms)
            stage_out.finished(result, first_ms, (options or ChatOptions()).max_tokens)
            text = result.text
        if out is None:
            renderer.end_answer()
    return text or ""


class _Attempts:
    """The candidates tried for one stage: opens each one's stream, logs each one that failed."""

    def __init__(
        self,
        bus: Bus,
        messages: list[ChatMessage],
        options: ChatOptions | None,
        session: str | None,
        model: str | None,
        deadline_s: float | None,
        outputs: _StageOutputs,
    ):
        self.bus, self.messages, self.options, self.session = bus, messages, options, session
        self.model, self.deadline_s, self.outputs = model, deadline_s, outputs
        self.streams: dict[str, ChatStream] = {}
        self.on_failure: Callable[..., None] | None = None

    def open_one(self, name: str) -> ChatStream:
        self.streams[name] = self.bus.stream(
            name, self.messages, self.options, session=self.session, model=self.model, timeout=self.deadline_s
        )
        return self.streams[name]

    def failed(self, name: str, err: BaseException) -> None:
        if self.on_failure is not None and name in self.streams:
            self.on_failure(name, stream=self.streams[name], err=err)

    def skipped(self, name: str, err: BusError, then: str) -> None:
        self.failed(name, err)
        self.outputs.skipped(name, err, then)


class _StageOutputs:
    """Makes the output of each candidate tried for one stage; the last one made is the one answering."""

    def __init__(self, renderer: Renderer, last: bool, out: TextIO | None, stage: int):
        self.renderer, self.last, self.out, self.stage = renderer, last, out, stage
        self.made: list[_StageOutput] = []

    def attempt(self, name: str) -> None:
        self.made.append(_StageOutput(self.renderer, name, self.last, self.out, self.stage))

    def skipped(self, name: str, err: BusError, then: str) -> None:
        self.renderer.stop_waiting()
        self.renderer.note(f"{name} failed before answering ({err}); trying {then}")


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
