"""Durable runs in aish: `--detach`, `aish attach RUN`, `aish runs`, `aish cancel RUN`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from aish_client.parser import Pipeline
from aish_client.prompt_parts import UsageError
from aish_client.render import Renderer
from bus.client import Bus
from bus.errors import RunNotFound
from bus.wire import REQUEST_ID_RE, ChatMessage, ChatOptions


async def detach(bus: Bus, pipeline: Pipeline, options: ChatOptions, renderer: Renderer) -> int:
    """Start one question as a detached run, print its id once a specialist has taken it, and leave."""
    stage = pipeline.stages[0] if len(pipeline.stages) == 1 else None
    target = stage.targets[0] if stage is not None and len(stage.targets) == 1 else None
    if stage is None or target is None or target.capability or pipeline.redirect or not stage.message:
        raise UsageError('--detach takes one specialist and a question: aish --detach apollo "long job"')
    if not bus.settings.runs:
        raise UsageError("--detach needs durable runs (TEKTON_RUNS is off)")
    messages = [ChatMessage(role="user", content=stage.message)]
    async with bus.stream(target.name, messages, options, detach=True) as s:
        await s.wait_started()
        run_id = s.detach()
    renderer.token(run_id + "\n")
    renderer.note(f"detached; follow it with `aish attach {run_id}`, stop it with `aish cancel {run_id}`")
    return 0


def _run_id(words: Sequence[str], usage: str) -> str:
    if len(words) != 1 or not REQUEST_ID_RE.match(words[0]):
        raise UsageError(usage)
    return words[0]


async def attach(bus: Bus, words: Sequence[str], after: int, renderer: Renderer) -> int:
    """Replay one of our runs from its start (or after frame ``after``) and follow it to its end."""
    run_id = _run_id(words, "usage: aish attach RUN [--after SEQ]")
    if await bus.run_kind(run_id) == "bulk":
        from aish_client.fanout import attach_bulk

        await attach_bulk(bus, run_id, after, renderer)
        return 0
    async with bus.attach(run_id, after=after) as s:
        async for chunk in s:
            renderer.token(chunk)
    if s.nothing_after:
        renderer.note(f"run {run_id} ended at frame {s.ended_at}: nothing after frame {after}")
        return 0
    renderer.end_answer()
    return 0


async def cancel(bus: Bus, words: Sequence[str], renderer: Renderer) -> int:
    run_id = _run_id(words, "usage: aish cancel RUN")
    if await bus.run_kind(run_id) is None:  # else "asked it to stop" would be said of nothing at all
        raise RunNotFound.named(run_id, bus.settings.runs_keep_s)
    await bus.cancel_run(run_id)
    renderer.note(f"asked run {run_id} to stop")
    return 0


async def list_runs(bus: Bus, renderer: Renderer) -> int:
    """Our recent runs, oldest first: id, specialist, state, frames, age."""
    runs = await bus.runs()
    if not runs:
        renderer.note("no runs kept (finished runs are kept a few minutes)")
        return 0
    now = time.time()
    for r in runs:
        renderer.token(
            f"{r.run_id}  {r.specialist:<12} {r.state:<8} {r.frames:>6} frames"
            f"  {now - r.updated:>5.0f} s ago\n"
        )
    return 0
