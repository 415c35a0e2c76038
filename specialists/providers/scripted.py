"""The scripted provider: deterministic text at a set first-token delay and token rate.

For tests and benchmarks only (it is never a roster default). It answers
``"<specialist> heard: <last user message>"``, word by word, paced on a fixed schedule so the timing
is the configured one and not the sum of per-token sleeps.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import anyio
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.errors import BusError
from bus.wire import ChatMessage, ChatOptions, Usage
from specialists.providers.base import ProviderContext
from specialists.tools import current as current_tools

_TOKEN_RE = re.compile(r"\S+\s*|\s+")


class ScriptedOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEKTON_SCRIPTED_", extra="forbid")

    first_token_ms: float = Field(default=0.0, ge=0)
    # 0: as fast as the bus takes them.
    tokens_per_s: float = Field(default=0.0, ge=0)
    # Repeat the script to exactly this many tokens (benchmarks); None: the script once.
    tokens: int | None = Field(default=None, ge=1)
    text: str | None = None
    # Answer with every user/assistant message it was given ("apollo heard: user: q1 | assistant: a1 |
    # user: q2"), so tests can see what context reached the specialist.
    echo_context: bool = False
    # Call this MCP tool first ({"server": ..., "tool": ..., "arguments": {...}}, JSON in
    # TEKTON_SCRIPTED_TOOL) and end the answer with what it said: the tool path without a model.
    tool: dict[str, Any] | None = None
    # What it reports as its model (tests of per-request models: `-m scripted:NAME`).
    model: str = "scripted"


class ScriptedProvider:
    name: ClassVar[str] = "scripted"
    Options: ClassVar[type[BaseSettings]] = ScriptedOptions

    def __init__(self, options: ScriptedOptions, context: ProviderContext):
        self.options = options
        self.specialist = context.specialist
        self.model = options.model

    def script(self, messages: Sequence[ChatMessage]) -> list[str]:
        if self.options.text is not None:
            text = self.options.text
        elif self.options.echo_context:
            # Every message but the persona (the first system message), so a request's own system
            # prompt (`aish --system`) shows too.
            rest = messages[1:] if messages and messages[0].role == "system" else messages
            seen = " | ".join(f"{m.role}: {m.content}" for m in rest)
            text = f"{self.specialist} heard: {seen}"
        else:
            last = next((m.content for m in reversed(messages) if m.role == "user"), "")
            text = f"{self.specialist} heard: {last}"
        return _TOKEN_RE.findall(text) or [""]

    async def stream(
        self, messages: Sequence[ChatMessage], options: ChatOptions
    ) -> AsyncIterator[str | Usage]:
        tokens = self.script(messages)
        if self.options.tool is not None:
            tools = current_tools()
            if tools is None:
                raise BusError(f"'{self.specialist}' has no MCP servers for its scripted tool call")
            spec = self.options.tool
            said = await tools.call(spec["server"], spec["tool"], spec.get("arguments") or {})
            tokens += [" ", *_TOKEN_RE.findall(f"{spec['tool']} said: {said}")]
        count = self.options.tokens or len(tokens)
        if options.max_tokens is not None:
            count = min(count, options.max_tokens)
        tokens_out = itertools.islice(itertools.cycle(tokens), count)
        if not self.options.first_token_ms and not self.options.tokens_per_s:
            for token in tokens_out:  # unpaced (benchmarks): no clock reads per token
                yield token
        else:
            start = time.perf_counter() + self.options.first_token_ms / 1000
            step = 1 / self.options.tokens_per_s if self.options.tokens_per_s else 0.0
            for i, token in enumerate(tokens_out):
                delay = start + i * step - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                yield token
        # Its tokens are words: the prompt counted the same way, so token counts can be followed
        # end to end in tests.
        yield Usage(prompt_tokens=sum(len(m.content.split()) for m in messages), completion_tokens=count)

    async def aclose(self) -> None:
        return None
