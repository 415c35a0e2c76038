"""The model's part of a trace: a provider wrapped so its generation is a span (``generate <model>``),
with an event at the first chunk and the number of chunks. Used only for a sampled trace (the
service checks :func:`bus.tracing.recording` first, so a sampled-out request streams unwrapped)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, cast

from bus import tracing
from bus.wire import ChatMessage, ChatOptions, Usage
from specialists.providers.base import Provider


class TracedProvider:
    def __init__(self, inner: Provider):
        self.inner = inner
        self.name = inner.name
        self.model = inner.model

    @classmethod
    def wrap(cls, inner: Provider) -> Provider:
        return cast(Provider, cls(inner))

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, attr: str) -> Any:  # start() and the like: the provider's own
        return getattr(self.inner, attr)

    async def stream(
        self, messages: Sequence[ChatMessage], options: ChatOptions
    ) -> AsyncIterator[str | Usage]:
        span = tracing.start(
            f"generate {self.model}",
            attributes={"gen_ai.system": self.name, "gen_ai.request.model": self.model},
        )
        chunks = 0
        failed: Exception | None = None
        try:
            async with aclosing(self.inner.stream(messages, options)) as texts:  # type: ignore[type-var]
                async for text in texts:
                    if isinstance(text, Usage):  # the provider's own count: passed on, not a chunk
                        yield text
                        continue
                    if not chunks:
                        tracing.event(span, "first chunk")
                    chunks += 1
                    yield text
        except Exception as err:
            failed = err
            raise
        finally:
            if span is not None:
                span.set_attribute("gen_ai.usage.output_tokens", chunks)
            tracing.end(span, failed)
