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

import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

import structlog

log = structlog.get_logger("tekton.tracing")
Kind = Literal["client", "server", "internal"]
TRACEPARENT = "traceparent"
# W3C: version ff, an all-zero trace or parent id are invalid; version 00 is exactly this long, a later
# version may add fields after it.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-.*)?")

_TRACEPARENT_MAX = 512  # OpenTelemetry's propagator ignores a longer one (a later version's fields)
# OpenTelemetry's loggers that warn about a caller's trace context (a bad tracestate, a traceparent too
# long): the caller's text, unescaped, one line per request, as many as anyone sends. The context is
# ignored all the same; the warnings are not kept.
_CALLER_INPUT_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext")

_tracer: Any = None  # an opentelemetry Tracer once installed; None: tracing is off
_otel: Any = None  # the OpenTelemetry names the helpers use, looked up once by install()
_said_untraced = False
_ahead: Any = None  # the tracer's _Ahead: None if its provider is not the SDK's (then the SDK decides)
# Inside a request sampled out (served with no span): its trace context to pass on, a caller's
# ``traceparent`` or a trace id drawn here (see Trace).
_passing: ContextVar[str | int | None] = ContextVar("tekton_trace_passing", default=None)


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


class _Ahead(threading.local):
    """A root request's sampling, decided ahead (:func:`admit`) and then made the span's: the tracer's
    id generator hands the span the trace id drawn for the decision, and its sampler gives back the
    decision made on it, so the sampler is asked once per request (a ratio sampler keeps its ratio;
    a random or rate-limited one is not drawn on twice). Per thread: what was decided for one
    thread's span is never another thread's."""

    def __init__(self, ids: Any, sampler: Any):
        from opentelemetry.sdk.trace.sampling import SamplingResult

        self.ids, self.sampler, self.results = ids, sampler, SamplingResult  # the SDK's
        self.trace_id: int | None = None  # set just before the root span is made, taken as it is
        self.result: Any = None  # the sampler's result for trace_id
        self.bound = _ratio_bound(sampler)

    def decide(self, name: str, kind: Any) -> tuple[int, Any]:
        """A root request's trace id and the sampler's result for it; None for a trace a ratio sampler
        drops, decided here by its own rule (the id's low 64 bits at or above its bound): asking it
        took ~3.4 us a request, 20 times the comparison, for a result that says only "dropped"."""
        trace_id = self.ids.generate_trace_id()
        if (
            self.bound is not None
            and trace_id & _LOW_64 >= self.bound
            and not _otel.current_span().get_span_context().is_valid  # (a parent-based sampler's root)
        ):
            return trace_id, None
        return trace_id, self.sampler.should_sample(None, trace_id, name, kind)

    def generate_trace_id(self) -> int:
        if self.trace_id is None:
            return int(self.ids.generate_trace_id())
        return self.trace_id

    def generate_span_id(self) -> int:
        return int(self.ids.generate_span_id())

    def is_trace_id_random(self) -> bool:
        return bool(self.ids.is_trace_id_random())

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> Any:
        result = self.result
        if result is None or trace_id != self.trace_id:
            return self.sampler.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        if attributes:  # the SDK gives the span the result's attributes: its own, and the sampler's
            return self.results(result.decision, {**attributes, **result.attributes}, result.trace_state)
        return result

    def get_description(self) -> str:
        return str(self.sampler.get_description())


_LOW_64 = (1 << 64) - 1


def _ratio_bound(sampler: Any) -> int | None:
    """The bound a root trace's id is sampled below when ``sampler`` is the SDK's ``TraceIdRatioBased``
    or its ``ParentBased`` over one (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``); None for any
    other sampler, or a subclass that may decide otherwise: that one is asked for every request."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    root = sampler
    if isinstance(sampler, ParentBased) and type(sampler).should_sample is ParentBased.should_sample:
        root = getattr(sampler, "_root", None)
    return root.bound if type(root) is TraceIdRatioBased else None


def enabled() -> bool:
    return _tracer is not None


def install(provider: Any) -> None:
    """Trace through ``provider`` (an opentelemetry ``TracerProvider``); None turns tracing off."""
    global _tracer, _otel, _ahead
    if provider is not None and _otel is None:
        _otel = _Otel()
        for name in _CALLER_INPUT_LOGGERS:
            if logging.getLogger(name).level == logging.NOTSET:  # (not where an embedder set one)
                logging.getLogger(name).setLevel(logging.ERROR)
    _tracer = provider.get_tracer("tekton") if provider is not None else None
    _ahead = None
    if hasattr(_tracer, "id_generator") and hasattr(_tracer, "sampler"):  # the SDK's Tracer
        if not isinstance(_tracer.id_generator, _Ahead):  # (a provider hands out one tracer per name)
            _tracer.id_generator = _tracer.sampler = _Ahead(_tracer.id_generator, _tracer.sampler)
        _ahead = _tracer.id_generator


def configure(service_name: str) -> bool:
    """Turn tracing on if the OpenTelemetry environment names an exporter; True if it did.

    The span processor is the SDK's batch one (``OTEL_BSP_*`` tune it): export, and the OTLP encoding
    that costs more CPU than making the span, happen on its thread in batches, never on the request's
    path. The sampler is the SDK's from ``OTEL_TRACES_SAMPLER`` (parent-based by default), asked as a
    request arrives: one sampled out, by it or by the caller, costs next to nothing (:func:`admit`)."""
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
        span_exporter = ConsoleSpanExporter(out=sys.stderr)  # (stdout is the answer: aish's, piped on)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)  # shuts down (and flushes) at exit by default
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    install(provider)
    return True


class Trace:
    """How a request is traced, decided as it arrives (:func:`admit`), for :class:`current`: in a span
    continuing the caller's sampled trace (``parent``: its headers), in a root span whose trace id
    was drawn and sampled already (``root``), or with no span at all (``passed``: the trace context it
    passes on, so that what it asks of others is sampled out too)."""

    __slots__ = ("decided", "parent", "passed", "root")

    def __init__(
        self,
        parent: Mapping[str, str] | None = None,
        root: int | None = None,
        passed: str | int | None = None,
        decided: Any = None,
    ):
        self.parent, self.root, self.passed = parent, root, passed
        self.decided = decided  # the sampler's result for ``root``


def admit(headers: Mapping[str, str] | None, name: str, kind: Kind = "server") -> Trace | None:
    """How to trace a request that came with ``headers``, to be served in a span named ``name``; None:
    serve it plainly (tracing is off, the one check it costs; or the sampler failed on it).

    A caller's ``traceparent`` decides (its flags' low bit: sampled); with none (or an invalid one,
    which the propagator would ignore too), the SDK's sampler decides now, on the trace id the span
    will get, from the span's name and kind (not its attributes, made later). A request sampled out,
    either way, makes no span: the SDK's would cost it ~25 us of ~270 (bench/results/hot_path.json)
    to record nothing."""
    if _tracer is None:
        return None
    parent = headers.get(TRACEPARENT) if headers else None
    if (
        parent is not None
        and len(parent) <= _TRACEPARENT_MAX  # (longer: the propagator ignores it, so must we)
        and _TRACEPARENT.fullmatch(parent)
        and (parent[:2] != "00" or len(parent) == 55)
    ):
        if int(parent[53:55], 16) & 1:
            return Trace(parent=headers)
        return Trace(passed=parent if parent[:2] == "00" else "00" + parent[2:55])  # (our version)
    if _ahead is None:
        return Trace()  # the SDK decides as it makes the span
    try:
        trace_id, result = _ahead.decide(name, _otel.kinds[kind])
    except Exception as err:  # a sampler of the deployment's own that fails: not this request's fault
        _untraced(err)
        return None
    if result is not None and result.decision.is_recording():  # (record-only makes a span too)
        return Trace(root=trace_id, decided=result)
    return Trace(passed=trace_id)


def pass_on(trace: Trace) -> Any:
    """Serve a sampled-out request (``trace.passed``) with no span: what it asks of others carries its
    trace context, sampled out too, until :func:`passed` (with what this returned). :class:`current`
    does the same; this is that without a span's bookkeeping, for the hot path."""
    return _passing.set(trace.passed)


def passed(token: Any) -> None:
    _passing.reset(token)


def current_recording() -> Any:
    """The current span if it records (tracing on, this trace sampled), else None."""
    if _tracer is None:
        return None
    span = _otel.current_span()
    return span if span.is_recording() else None


def recording(span: Any) -> bool:
    """Whether ``span`` (from :func:`start`) is one that records: tracing on and this trace sampled."""
    return span is not None and type(span) is not Trace and bool(span.is_recording())


def fail(span: Any, message: str) -> None:
    """Mark ``span`` (from :func:`current_recording`, say) as ended in an error."""
    if span is not None:
        span.set_status(_otel.error(message))


def _untraced(err: Exception) -> None:
    """Said once in the log (what fails, a sampler say, fails on every request)."""
    global _said_untraced
    if not _said_untraced:
        _said_untraced = True
        log.warning("tracing failed: the requests it fails on are served untraced", error=repr(err))


def _passed_on(passed: str | int) -> str:
    """The ``traceparent`` a sampled-out request passes on: its caller's, or for a root, one naming the
    trace id drawn for it (flags: not sampled; random trace id, as the SDK's ids are)."""
    if isinstance(passed, str):
        return passed
    flags = 2 if _ahead.is_trace_id_random() else 0
    return f"00-{passed:032x}-{_ahead.generate_span_id():016x}-{flags:02x}"


def _parent(headers: Mapping[str, str] | None) -> Any:
    if headers and TRACEPARENT in headers:
        return _otel.propagator.extract(headers)
    passed = _passing.get()
    if passed is None or _otel.current_span().get_span_context().is_valid:
        return None  # the current context
    return _otel.propagator.extract({TRACEPARENT: _passed_on(passed)})


def start(
    name: str,
    kind: Kind = "internal",
    headers: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
    ahead: Trace | None = None,
) -> Any:
    """A started span (child of ``headers``' trace context if any, else of the current span), or None
    when tracing is off (or its sampler failed). End it with :func:`end`. ``ahead``: a root span's
    trace id and sampling, decided by :func:`admit`.

    A span that would be sampled out is not made: the SDK's costs ~5-10 us to record nothing. In its
    place a :class:`Trace` whose ``passed`` trace context :func:`headers` passes on (:func:`end` and
    :func:`event` take it too): inside a request sampled out, or a root the sampler drops."""
    if _tracer is None:
        return None
    root = (ahead is None or ahead.root is None) and not (headers and TRACEPARENT in headers)
    if root and not _otel.current_span().get_span_context().is_valid:
        passing = _passing.get()  # (inside a request sampled out: its context)
        if passing is not None:
            return Trace(passed=passing)
        ahead = admit(None, name, kind)  # a root: decided as a request's is
        if ahead is None or ahead.passed is not None:
            return ahead
    context = _parent(headers)
    decided = ahead is not None and ahead.root is not None and _ahead is not None
    if decided:
        _ahead.trace_id, _ahead.result = ahead.root, ahead.decided  # type: ignore[union-attr]
    try:
        return _tracer.start_span(name, context=context, kind=_otel.kinds[kind], attributes=attributes)
    except Exception as err:  # (the SDK's own code catches its processors' errors; not the sampler's)
        _untraced(err)
        return None
    finally:
        if decided:
            _ahead.trace_id = _ahead.result = None  # (not taken if the span had a parent after all)


def end(span: Any, error: BaseException | None = None) -> None:
    if span is None or type(span) is Trace:
        return
    if error is not None:
        span.set_status(_otel.error(str(error)))
    span.end()


def event(span: Any, name: str, **attributes: Any) -> None:
    if span is not None and type(span) is not Trace:
        span.add_event(name, attributes=attributes or None)


def headers(span: Any = None) -> dict[str, str] | None:
    """NATS headers carrying ``span``'s context (or the current one: a span's, or a sampled-out
    request's to pass on), or None when tracing is off."""
    if _tracer is None:
        return None
    if type(span) is Trace:  # (start's, for a span sampled out)
        return None if span.passed is None else {TRACEPARENT: _passed_on(span.passed)}
    if span is None:
        span = _otel.current_span()
        if not span.get_span_context().is_valid:
            passed = _passing.get()
            return None if passed is None else {TRACEPARENT: _passed_on(passed)}
    carrier: dict[str, str] = {}
    _otel.propagator.inject(carrier, context=_otel.set_span_in_context(span))
    return carrier or None


class current:
    """A span that is the current one inside the block (None when tracing is off, or when ``trace``
    says the request was sampled out: then its trace context is passed on with no span): started,
    made current and ended directly, without the SDK's generator-based ``start_as_current_span``
    layers. ``trace``: :func:`admit`'s decision, or a caller's headers (the SDK decides)."""

    __slots__ = ("attributes", "kind", "name", "span", "token", "trace")

    def __init__(
        self,
        name: str,
        kind: Kind = "internal",
        trace: Trace | Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ):
        self.name, self.kind, self.trace, self.attributes = name, kind, trace, attributes
        self.span: Any = None
        self.token: Any = None

    def __enter__(self) -> Any:
        if _tracer is None:
            return None
        trace = self.trace
        if not isinstance(trace, Trace):
            trace = Trace(parent=trace)
        span = (
            trace
            if trace.passed is not None
            else start(self.name, self.kind, trace.parent, self.attributes, trace)
        )
        if type(span) is Trace:  # sampled out (by admit, or by start): no span, its context passed on
            self.token = _passing.set(span.passed)
            return None
        self.span = span
        if span is not None:
            self.token = _otel.attach(_otel.set_span_in_context(self.span))
        return self.span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.span is None:
            if self.token is not None:
                _passing.reset(self.token)
            return
        _otel.detach(self.token)
        end(self.span, exc if isinstance(exc, Exception) else None)
