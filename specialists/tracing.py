"""The model's part of a trace, on the specialist's own span (``serve <specialist>``): OpenTelemetry's
GenAI attributes (``gen_ai.system``, ``gen_ai.request.model``, ``gen_ai.usage.*``) and a ``first
chunk`` event at the time the first token came.

One span per request, not a second one for the model: a span costs the SDK about 20 us to make and
the OTLP exporter about 30 us to encode, so a child span per request doubled what tracing every
request cost the specialist (bench/results/hot_path.json). The annotation is made once, after the
answer, from figures the service keeps anyway: nothing per token."""

from __future__ import annotations

import time
from typing import Any


def record_model_part(
    span: Any,
    provider: str,
    model: str,
    *,
    output_tokens: int,
    prompt_tokens: int | None,
    first_token_at: float | None,
) -> None:
    """Annotate ``span`` (the request's; None, or one that records nothing: nothing to do).
    ``first_token_at``: ``time.perf_counter()`` when the first token came, None if none did."""
    if span is None or not span.is_recording():
        return
    attributes: dict[str, Any] = {
        "gen_ai.system": provider,
        "gen_ai.request.model": model,
        "gen_ai.usage.output_tokens": output_tokens,
    }
    if prompt_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = prompt_tokens
    span.set_attributes(attributes)
    if first_token_at is not None:
        ago_ns = int((time.perf_counter() - first_token_at) * 1e9)
        span.add_event("first chunk", timestamp=time.time_ns() - ago_ns)
