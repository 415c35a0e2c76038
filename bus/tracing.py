"""W3C trace context (``traceparent``) in NATS headers, and spans through OpenTelemetry.

Off unless configured, and then free: every helper first checks one module global, and OpenTelemetry
is not even imported. :func:`configure` turns it on when the standard OpenTelemetry environment asks
for an exporter (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or
``OTEL_TRACES_EXPORTER=otlp|console``); tests and embedders call :func:`install` with their own
``TracerProvider`` (an in-memory exporter, say).

One trace, end to end: the client's span (``chat <specialist>``, kind CLIENT) travels in the request's
headers; the gateway (``gateway <op>``) and the specialist (``serve <specialist>``, SERVER) continue it;
the specialist's span also carries the model's part (OpenTelemetry's GenAI attributes and a ``first
chunk`` event: see specialists/tracing.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

Kind = Literal["client", "server", "internal"]
TRACEPARENT = "traceparent"

_tracer: Any = None  # an opentelemetry Tracer once installed; None: tracing is off
_otel: Any = None  # the OpenTelemetry names the helpers use, looked up once by install()


class _Otel:
    """OpenTelemetry's entry points, imported once when tracing turns on (not per span)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.kinds = {"client": SpanKind.CLIENT, "server": SpanKind.SERVER, "internal": SpanKind.INTERNAL}
        self.propagator = TraceContextTextMapPropagator()
        self.set_span_in_context = trace.set_span_in_context
        self.current_span = trace.get_current_span
        self.attach, self.detach = context.attach, context.detach
        self.error = lambda message: Status(StatusCode.ERROR, message)


def enabled() -> bool:
    return _tracer is not None


def install(provider: Any) -> None:
    """Trace through ``provider`` (an opentelemetry ``TracerProvider``); None turns tracing off."""
    global _tracer, _otel
    if provider is not None and _otel is None:
        _otel = _Otel()
    _tracer = provider.get_tracer("tekton") if provider is not None else None


def configure(service_name: str) -> bool:
    """Turn tracing on if the OpenTelemetry environment names an exporter; True if it did.

    The span processor is the SDK's batch one (``OTEL_BSP_*`` tune it): export, and the OTLP encoding
    that costs more CPU than making the span, happen on its thread in batches, never on the request's
    path. The sampler is the SDK's from ``OTEL_TRACES_SAMPLER`` (parent-based, so a request whose
    caller sampled it out costs nothing more here: see :func:`wanted`)."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter == "none" or not (endpoint or exporter in ("otlp", "console")):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)  # shuts down (and flushes) at exit by default
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    install(provider)
    return True


def wanted(headers: Mapping[str, str] | None) -> bool:
    """Whether to trace a request that came with ``headers``: tracing is on, and the caller's trace is
    sampled (the ``traceparent`` flags' low bit) or it sent none (then the sampler decides). A caller that
    sampled the request out costs its server nothing more."""
    if _tracer is None:
        return False
    parent = headers.get(TRACEPARENT) if headers else None
    if parent is None:
        return True
    try:
        return bool(int(parent[-2:], 16) & 1)
    except ValueError:
        return True  # malformed: let the propagator start a new trace


def current_recording() -> Any:
    """The current span if it records (tracing on, this trace sampled), else None."""
    if _tracer is None:
        return None
    span = _otel.current_span()
    return span if span.is_recording() else None


def fail(span: Any, message: str) -> None:
    """Mark ``span`` (from :func:`current_recording`, say) as ended in an error."""
    if span is not None:
        span.set_status(_otel.error(message))


def _parent(headers: Mapping[str, str] | None) -> Any:
    if not headers or TRACEPARENT not in headers:
        return None  # the current context
    return _otel.propagator.extract(headers)


def start(
    name: str,
    kind: Kind = "internal",
    headers: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Any:
    """A started span (child of ``headers``' trace context if any, else of the current span), or None
    when tracing is off. End it with :func:`end`."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=_parent(headers), kind=_otel.kinds[kind], attributes=attributes)


def end(span: Any, error: BaseException | None = None) -> None:
    if span is None:
        return
    if error is not None:
        span.set_status(_otel.error(str(error)))
    span.end()


def event(span: Any, name: str, **attributes: Any) -> None:
    if span is not None:
        span.add_event(name, attributes=attributes or None)


def headers(span: Any = None) -> dict[str, str] | None:
    """NATS headers carrying ``span``'s context (or the current one), or None when tracing is off."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    context = _otel.set_span_in_context(span) if span is not None else None
    _otel.propagator.inject(carrier, context=context)
    return carrier or None


class current:
    """A span that is the current one inside the block (None when tracing is off): started, made
    current and ended directly, without the SDK's generator-based ``start_as_current_span`` layers."""

    __slots__ = ("attributes", "headers", "kind", "name", "span", "token")

    def __init__(
        self,
        name: str,
        kind: Kind = "internal",
        headers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ):
        self.name, self.kind, self.headers, self.attributes = name, kind, headers, attributes
        self.span: Any = None
        self.token: Any = None

    def __enter__(self) -> Any:
        if _tracer is None:
            return None
        self.span = start(self.name, self.kind, self.headers, self.attributes)
        self.token = _otel.attach(_otel.set_span_in_context(self.span))
        return self.span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.span is None:
            return
        _otel.detach(self.token)
        end(self.span, exc if isinstance(exc, Exception) else None)
