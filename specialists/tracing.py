"""The model's part of a trace: a span (``generate <model>``) around the provider's generation, with
an event at the first chunk and the number of chunks. Started only for a sampled trace (the service
checks :func:`bus.tracing.recording` first) and fed by the service's own loop over the chunks (it
already notes the first one and counts them), not by wrapping the provider: a wrapping generator
cost every chunk one more async-generator step (measured in ``bench.observability``)."""

from __future__ import annotations

from typing import Any

from bus import tracing
from specialists.providers.base import Provider


def generate_span(provider: Provider) -> Any:
    """The started span of ``provider``'s generation if this trace records, else None."""
    if not tracing.recording():
        return None
    return tracing.start(
        f"generate {provider.model}",
        attributes={"gen_ai.system": provider.name, "gen_ai.request.model": provider.model},
    )


def first_chunk(span: Any) -> None:
    tracing.event(span, "first chunk")


def generate_done(span: Any, chunks: int, error: BaseException | None) -> None:
    span.set_attribute("gen_ai.usage.output_tokens", chunks)
    tracing.end(span, error if isinstance(error, Exception) else None)
