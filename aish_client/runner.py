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
from aish_client.oneshot import DEMO_MODEL, DEMO_NOTE, compose
from aish_client.parser import AUTO, Pipeline, Target
from aish_client.render import Renderer
from bus.client import Bus, ChatStream, StreamResult
from bus.errors import BusError
from bus.failover import open_first
from bus.wire import ChatMessage, ChatOptions, StartFrame

__all__ = ["DEMO_MODEL", "DEMO_NOTE", "compose", "run_pipeline"]


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
            stage_out.done()
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


class _StageOutput:
    """Where one stage's tokens go: the screen or a file for the last stage, progress for the others;
    with --json, events for every stage."""

    def __init__(self, renderer: Renderer, name: str, last: bool, out: TextIO | None, stage: int = 1):
        self.renderer, self.name, self.last, self.out, self.stage = renderer, name, last, out, stage
        self.tokens = 0
        self._started = False
        self.json = renderer.json_events
        if self.json:
            return
        if not last:
            renderer.progress(name, 0)
        elif out is None:
            renderer.waiting(name)

    def started(self, start: StartFrame | None) -> None:
        if self._started or start is None:
            return
        self._started = True
        if self.json:
            self.renderer.event(
                "start",
                stage=self.stage,
                specialist=start.specialist,
                instance=start.instance,
                provider=start.provider,
                model=start.model,
            )
        elif start.provider == "local" and start.model.startswith(DEMO_MODEL):
            self.renderer.once("demo-model", DEMO_NOTE)

    def chunk(self, text: str) -> None:
        self.tokens += 1
        if self.json:
            self.renderer.event("chunk", stage=self.stage, text=text)
        elif not self.last:
            self.renderer.progress(self.name, self.tokens)
        elif self.out is None:
            self.renderer.answer(text)
        else:
            self.out.write(text)

    def done(self) -> None:
        if self.json:
            return
        self.renderer.stop_waiting()
        if not self.last:
            self.renderer.progress(self.name, self.tokens, done=True)
            self.renderer.clear_progress()

    def finished(self, result: StreamResult, first_ms: float | None, max_tokens: int | None) -> None:
        done, start = result.done, result.start
        if self.json:
            self.renderer.event(
                "done",
                stage=self.stage,
                specialist=start.specialist,
                provider=start.provider,
                model=start.model,
                finish_reason=done.finish_reason,
                usage=done.usage.model_dump(),
                timings=done.timings.model_dump(),
            )
            return
        if self.last and self.out is None:
            self.renderer.footer(
                self.name,
                first_ms,
                done.timings.tokens_per_s,
                model=f"{start.provider}:{start.model}",
                tokens_in=done.usage.prompt_tokens,
                tokens_out=done.usage.completion_tokens,
            )
        if done.finish_reason == "length":
            if self.last:
                self.renderer.truncated(max_tokens)
            else:
                self.renderer.note(f"{self.name} stopped at max tokens; the next stage got a cut answer")


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
