"""Where one stage's answer goes: the screen or a file for the last stage, progress for the others; with
--json, events for every stage. The one place both aish paths (aish_client/runner.py and the light
one-shot, aish_client/oneshot.py) turn frames into output, so they print the same."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # the light one-shot passes objects of the same shape, without pydantic
    from aish_client.render import Renderer
    from bus.client import StreamResult
    from bus.wire import StartFrame

# The bundled demo model (local provider): answers say so once.
DEMO_MODEL = "SmolLM2-135M"
DEMO_NOTE = "SmolLM2-135M demo model: set a real model with -m or in config.toml (tekton models lists them)"


class StageOutput:
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
        self.tokens += 1  # a chunk may carry a burst of tokens: done() has the count
        if self.json:
            self.renderer.event("chunk", stage=self.stage, text=text)
        elif not self.last:
            self.renderer.progress(self.name, self.tokens)
        elif self.out is None:
            self.renderer.answer(text)
        else:
            self.out.write(text)

    def done(self, tokens: int | None = None) -> None:
        """``tokens``: the done frame's count."""
        if tokens is not None:
            self.tokens = tokens
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
