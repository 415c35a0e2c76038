"""Run a parsed pipeline: each stage's whole answer is the next stage's input; the last one streams."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from aish_client.fanout import Layout, plan_pipeline, run_plan
from aish_client.parser import Ask, Pipeline
from aish_client.render import Renderer
from bus.client import Bus
from bus.errors import BusError
from bus.wire import ChatMessage, ChatOptions


class NotBuilt(BusError):
    """A pipeline form the parser knows but this version cannot run yet."""


def compose(message: str | None, piped: str | None) -> str:
    """A stage's prompt: its own message, then the text piped into it."""
    parts = [p for p in (message, piped) if p]
    return "\n\n".join(parts)


def _check_runnable(stage: Ask) -> str:
    target = stage.targets[0]
    if target.capability:
        raise NotBuilt(f"column {target.column}: routing by capability (@{target.name}) is not built yet")
    return target.name


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
        plan, shown = plan_pipeline(pipeline, text, options, session)
        with ExitStack() as files:
            await run_plan(bus, plan, shown, renderer, layout=layout, out=_open_output(pipeline, files))
        return ""
    names = [_check_runnable(stage) for stage in pipeline.stages]
    if not pipeline.stages:
        # `echo x > file`: nothing to ask, just write.
        _write_output(pipeline, renderer, text or "")
        return text or ""
    with ExitStack() as files:
        out = _open_output(pipeline, files)
        for i, (stage, name) in enumerate(zip(pipeline.stages, names, strict=True)):
            last = i == len(pipeline.stages) - 1
            prompt = compose(stage.message, text)
            if not prompt.strip():
                raise BusError(
                    f"'{name}' got no input: give it a message ({name} \"...\"), pipe text in, or use echo"
                )
            tokens = 0
            if not last:
                renderer.progress(name, 0)
            messages = [ChatMessage(role="user", content=prompt)]
            async with bus.stream(name, messages, options, session=session) as s:
                async for chunk in s:
                    tokens += 1
                    if not last:
                        renderer.progress(name, tokens)
                    elif out is None:
                        renderer.token(chunk)
                    else:
                        out.write(chunk)
            result = await s.result()
            if not last:
                renderer.progress(name, tokens, done=True)
                renderer.clear_progress()
            text = result.text
        if out is None:
            renderer.end_answer()
    return text or ""


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
