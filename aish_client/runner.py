"""Run a parsed pipeline: each stage's whole answer is the next stage's input; the last one streams."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from aish_client.fanout import Layout, plan_pipeline, run_plan
from aish_client.logbook import Logbook
from aish_client.parser import Pipeline, Target
from aish_client.render import Renderer
from bus.client import Bus, StreamResult
from bus.errors import (
    BadRequest,
    BusError,
    Cancelled,
    GatewayUnavailable,
    PayloadTooLarge,
    SessionNotFound,
)
from bus.wire import ChatMessage, ChatOptions, StartFrame

# The bundled demo model (local provider): answers say so once (see _demo_note).
DEMO_MODEL = "SmolLM2-135M"
DEMO_NOTE = "SmolLM2-135M demo model: set a real model with -m or in config.toml (tekton models lists them)"


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
            for n, name in enumerate(candidates):
                stage_out = _StageOutput(renderer, name, last, out, i + 1)
                s = bus.stream(
                    name, messages, options, session=session, model=stage_model, timeout=deadline_s
                )
                try:
                    async with s:
                        async for chunk in s:
                            stage_out.started(s.start_frame)
                            stage_out.chunk(chunk)
                    result = await s.result()
                    stage_out.started(result.start)
                    break
                except BusError as err:
                    if logbook is not None:
                        logbook.record_failure(name, stage_model, prompt, system, s, session, err)
                    if stage_out.tokens or n + 1 == len(candidates) or not _worth_another(err):
                        raise
                    renderer.note(f"{name} failed before answering ({err}); trying {candidates[n + 1]}")
                except BaseException as err:  # Ctrl-C: what was said so far is still worth keeping
                    if logbook is not None:
                        logbook.record_failure(name, stage_model, prompt, system, s, session, err)
                    raise
            stage_out.done()
            first_ms = (s.first_chunk_at - s.sent_at) * 1000 if s.first_chunk_at is not None else None
            if logbook is not None:
                logbook.record(name, prompt, system, result, session, s.request.id, first_ms)
            stage_out.finished(result, first_ms, (options or ChatOptions()).max_tokens)
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
