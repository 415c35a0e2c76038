"""One trace from the client through the gateway to the specialist and its model (OpenTelemetry's
in-memory exporter), carried as W3C ``traceparent`` in NATS headers; and nothing when tracing is off."""

from __future__ import annotations

import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from nats.aio.msg import Msg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from bus import tracing
from bus.client import Bus
from bus.errors import BusError, DeadlineExceeded, SpecialistUnavailable
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from tests.helpers import eventually, in_process_gateway, in_process_specialists, run_aish, specialist_process

pytestmark = pytest.mark.anyio


def _by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in finished}


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


async def test_one_trace_from_client_to_model(settings: TektonSettings, spans: InMemorySpanExporter) -> None:
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        answer = await bus.ask("apollo", "trace me")
        assert answer.text == "apollo heard: trace me"
        await eventually(lambda: len(spans.get_finished_spans()) == 2)
    got = _by_name(spans.get_finished_spans())
    client, server = got["chat apollo"], got["serve apollo"]
    assert client.kind == SpanKind.CLIENT and server.kind == SpanKind.SERVER
    assert client.context.trace_id == server.context.trace_id
    assert _parent_of(server) == client.context.span_id
    assert server.attributes["tekton.request_id"] == client.attributes["tekton.request_id"]
    # The model's part, on the specialist's span: the GenAI attributes and when the first chunk came.
    assert server.attributes["gen_ai.system"] == "scripted"
    assert server.attributes["gen_ai.request.model"] == "scripted"
    assert server.attributes["gen_ai.usage.output_tokens"] == 4
    [first] = server.events
    assert first.name == "first chunk"
    assert server.start_time is not None and server.end_time is not None
    assert server.start_time <= first.timestamp <= server.end_time
    assert server.status.is_ok


async def test_a_failed_answer_marks_the_specialist_s_span_as_an_error(
    settings: TektonSettings, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "20")
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "200")
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        with pytest.raises(DeadlineExceeded):
            async with bus.stream("apollo", [ChatMessage(role="user", content="x")], timeout=0.3) as s:
                async for _ in s:
                    pass
        await eventually(lambda: "serve apollo" in _by_name(spans.get_finished_spans()))
    server = _by_name(spans.get_finished_spans())["serve apollo"]
    assert server.status.status_code == StatusCode.ERROR
    assert server.status.description is not None and "deadline" in server.status.description
    # How far the model got before its deadline, on the same span.
    assert 0 < server.attributes["gen_ai.usage.output_tokens"] < 200
    assert [e.name for e in server.events] == ["first chunk"]


async def test_a_failed_request_s_client_span_is_an_error_however_its_caller_handles_it(
    settings: TektonSettings, spans: InMemorySpanExporter
) -> None:
    """A caller that catches the error inside its ``async with`` (aish does) still leaves the request
    marked failed on its span; one that fails before it is sent (too big) still ends its span."""
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        async with bus.stream("nobody", [ChatMessage(role="user", content="hi")]) as s:
            with pytest.raises(SpecialistUnavailable):
                async for _ in s:
                    pass
        with pytest.raises(BusError):
            async with bus.stream("apollo", [ChatMessage(role="user", content="x" * 2_000_000)]):
                pass
    got = _by_name(spans.get_finished_spans())
    assert got["chat nobody"].status.status_code == StatusCode.ERROR
    assert got["chat apollo"].status.status_code == StatusCode.ERROR  # ended, not lost


async def test_a_session_chat_trace_passes_through_the_gateway(
    settings: TektonSettings, spans: InMemorySpanExporter
) -> None:
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        await bus.gateway.create(specialist="apollo", name="traced")
        spans.clear()
        async with bus.stream("apollo", [ChatMessage(role="user", content="hi")], session="traced") as s:
            assert (await s.result()).text == "apollo heard: hi"
        await eventually(lambda: {"chat apollo", "serve apollo"} <= set(_by_name(spans.get_finished_spans())))
    got = _by_name(spans.get_finished_spans())
    client, gateway, server = got["chat apollo"], got["gateway chat"], got["serve apollo"]
    assert len({client.context.trace_id, gateway.context.trace_id, server.context.trace_id}) == 1
    assert _parent_of(gateway) == client.context.span_id
    assert _parent_of(server) == gateway.context.span_id


async def test_off_means_no_headers_and_no_spans(settings: TektonSettings) -> None:
    assert not tracing.enabled()
    assert tracing.headers() is None and tracing.start("x") is None
    async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
        seen: list[object] = []

        async def record(msg: Msg) -> None:
            seen.append(msg.headers)

        sub = await bus.nc.subscribe("tekton.ai.apollo.chat", cb=record)
        await bus.ask("apollo", "untraced")
        await eventually(lambda: len(seen) == 1)
        await sub.unsubscribe()
        assert seen == [None]
        assert type(services["apollo"].provider).__name__ == "ScriptedProvider"


class _Collector:
    """A collector's OTLP/HTTP traces endpoint (``POST /v1/traces``, protobuf), in a thread: what
    the real exporters of real processes send, decoded."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []  # (service.name, span)
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        collector.spans += [(resource["service.name"], s) for s in scope_spans.spans]
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, name: str) -> tuple[str, Any]:
        [found] = [(service, span) for service, span in self.spans if span.name == name]
        return found


async def test_one_trace_over_otlp_from_aish_to_a_specialist_process(settings: TektonSettings) -> None:
    collector = _Collector()
    try:
        otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url}
        # (the specialist is killed at the end: its batches go every 50 ms, not at its exit)
        with specialist_process(settings, "apollo", **otlp, OTEL_BSP_SCHEDULE_DELAY="50"):
            done = await run_aish(settings, "apollo", "hi", **otlp)
            assert done.returncode == 0, done.stderr
            assert done.stdout == "apollo heard: hi\n"
            await eventually(lambda: {"chat apollo", "serve apollo"} <= {s.name for _, s in collector.spans})
    finally:
        collector.server.shutdown()
    (aish, client), (specialist, server) = collector.named("chat apollo"), collector.named("serve apollo")
    assert (aish, specialist) == ("aish", "tekton-specialist")
    assert client.trace_id == server.trace_id and server.parent_span_id == client.span_id
    assert {a.key for a in server.attributes} >= {"gen_ai.system", "gen_ai.usage.output_tokens"}
    assert [e.name for e in server.events] == ["first chunk"]


async def test_the_console_exporter_prints_spans_on_stderr_not_in_the_answer(
    settings: TektonSettings,
) -> None:
    async with in_process_specialists(settings, "apollo"):
        done = await run_aish(settings, "apollo", "hi", OTEL_TRACES_EXPORTER="console")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "apollo heard: hi\n"  # a pipeline reads the answer alone
    assert '"name": "chat apollo"' in done.stderr


@pytest.mark.fast
def test_a_request_sampled_out_by_its_caller_is_not_traced(spans: InMemorySpanExporter) -> None:
    trace = "00-d78a45d89f54499c8f250ddd3e0e8289-0762bbb98fa248fe-"
    for flags in ("01", "03"):  # sampled (03: with the W3C level 2 random bit)
        decided = tracing.admit({"traceparent": trace + flags}, "serve apollo")
        assert decided is not None and decided.parent == {"traceparent": trace + flags}
    for flags in ("00", "02"):  # sampled out: no span, the caller's context passed on as it came
        decided = tracing.admit({"traceparent": trace + flags}, "serve apollo")
        assert decided is not None and decided.passed == trace + flags
        with tracing.current("serve apollo", "server", decided) as span:
            assert span is None and tracing.headers() == {"traceparent": trace + flags}
        assert tracing.headers() is None
    assert spans.get_finished_spans() == ()
    tracing.install(None)
    assert tracing.admit({"traceparent": trace + "01"}, "serve apollo") is None


@pytest.mark.fast
@pytest.mark.parametrize(
    "traceparent",
    [
        "ff-d78a45d89f54499c8f250ddd3e0e8289-0762bbb98fa248fe-00",  # version ff
        "00-00000000000000000000000000000000-0762bbb98fa248fe-00",  # no trace id
        "00-d78a45d89f54499c8f250ddd3e0e8289-0000000000000000-00",  # no parent id
        "00-d78a45d89f54499c8f250ddd3e0e8289-0762bbb98fa248fe-00-x",  # version 00 has no more
        "00-d78a45d89f54499c8f250ddd3e0e8289-0762bbb98fa248fe-00zz",
        "00-D78A45D89F54499C8F250DDD3E0E8289-0762BBB98FA248FE-00",  # upper case
        "01-d78a45d89f54499c8f250ddd3e0e8289-0762bbb98fa248fe-01-" + "a" * 500,  # past the 512 limit
    ],
)
def test_an_invalid_traceparent_is_no_caller_s_decision(
    spans: InMemorySpanExporter, traceparent: str
) -> None:
    decided = tracing.admit({"traceparent": traceparent}, "serve apollo")
    # A new trace, sampled here (the default sampler), not the invalid one passed on as sampled out.
    assert decided is not None and decided.passed is None and decided.root is not None
    with tracing.current("serve apollo", "server", decided) as span:
        assert span.context.trace_id == decided.root
        assert tracing.headers() == {"traceparent": f"00-{decided.root:032x}-{span.context.span_id:016x}-03"}


@pytest.mark.fast
def test_a_caller_s_bad_trace_context_is_not_logged_request_by_request(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenTelemetry warns about a bad ``tracestate`` with the caller's text as it is (escape codes
    too), a line per request: a caller could fill the log. The context is ignored, silently."""
    sampled = "00-d78a45d89f54499c8f250ddd3e0e8289-0762bbb98fa248fe-01"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            trace = tracing.admit({"traceparent": sampled, "tracestate": "\x1b[2Jx=FAKE,,!!"}, "serve")
            with tracing.current("serve apollo", "server", trace) as span:
                assert span.context.trace_id == int(sampled[3:35], 16)  # the caller's trace all the same
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


@pytest.mark.fast
def test_a_later_traceparent_version_sampled_out_is_passed_on_as_version_00(
    spans: InMemorySpanExporter,
) -> None:
    trace = "d78a45d89f54499c8f250ddd3e0e8289-0762bbb98fa248fe-00"
    decided = tracing.admit({"traceparent": f"01-{trace}-what-version-1-adds"}, "serve apollo")
    assert decided is not None and decided.passed == f"00-{trace}"


class _CountingCoin(Sampler):
    """Samples a root at random (as a random or rate-limited sampler would) and counts its calls."""

    def __init__(self, record_only: bool = False) -> None:
        self.calls = 0
        self.yes = Decision.RECORD_ONLY if record_only else Decision.RECORD_AND_SAMPLE

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        self.calls += 1
        return SamplingResult(self.yes if random.random() < 0.5 else Decision.DROP)

    def get_description(self) -> str:
        return "a counted coin"


@pytest.mark.fast
@pytest.mark.parametrize("record_only", [False, True])
def test_the_sampler_is_asked_once_per_root_request(record_only: bool) -> None:
    coin = _CountingCoin(record_only)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=coin)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    recorded = 0
    try:
        for _ in range(100):
            with tracing.current("serve apollo", "server", tracing.admit(None, "serve apollo")) as span:
                recorded += span is not None and span.is_recording()
    finally:
        tracing.install(None)
    assert coin.calls == 100
    assert 0 < recorded < 100
    # A record-only decision makes a span that records, sampled out: the exporter gets none of it.
    assert len(exporter.get_finished_spans()) == (0 if record_only else recorded)


class _Broken(Sampler):
    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        raise RuntimeError("the deployment's sampler has a bug")

    def get_description(self) -> str:
        return "broken"


async def test_a_failing_sampler_leaves_requests_untraced_not_failed(settings: TektonSettings) -> None:
    tracing.install(TracerProvider(sampler=_Broken()))
    try:
        assert tracing.admit(None, "serve apollo") is None  # served plainly, as with tracing off
        assert tracing.start("chat apollo", "client") is None
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            assert (await bus.ask("apollo", "still here")).text == "apollo heard: still here"
    finally:
        tracing.install(None)


class _HalfOfRoots(Sampler):
    """Samples half of the root spans, by trace id, unlike TraceIdRatioBased's own bound (so a span
    sampled on a trace id other than the one decided on is caught either way)."""

    def should_sample(self, parent_context: Any, trace_id: int, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE if trace_id & 1 else Decision.DROP)

    def get_description(self) -> str:
        return "half of roots"


@pytest.mark.fast
def test_a_root_is_sampled_ahead_on_the_trace_id_its_span_then_gets() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(_HalfOfRoots()))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        decided = [tracing.admit(None, "serve apollo") for _ in range(200)]
        roots = [d.root for d in decided if d is not None and d.root is not None]
        passed = [d.passed for d in decided if d is not None and d.passed is not None]
        assert len(roots) + len(passed) == 200 and roots and passed
        for decision in decided:
            with tracing.current("serve apollo", "server", decision) as span:
                passing = tracing.headers()
            assert passing is not None
            if decision is not None and decision.passed is not None:
                # No span; what it asks of others names the trace, not sampled, so they make none.
                assert span is None
                assert passing["traceparent"].startswith(f"00-{decision.passed:032x}-")
                assert int(passing["traceparent"][-2:], 16) & 1 == 0
    finally:
        tracing.install(None)
    # Every sampled root's span has the very trace id it was sampled on: the sampler's ratio, not
    # its square (a second draw inside the SDK would keep half of the half).
    assert sorted(s.context.trace_id for s in exporter.get_finished_spans()) == sorted(roots)


@pytest.mark.fast
def test_a_ratio_sampler_s_roots_are_decided_as_it_decides_them() -> None:
    """``parentbased_traceidratio`` (the usual sampler in production): a root it drops is decided
    without asking it, by its own rule, so the decisions must be exactly its own; under a current
    span, the parent decides, as ParentBased says."""
    ratio = TraceIdRatioBased(0.3)
    asked = []
    decide = ratio.should_sample
    ratio.should_sample = lambda *args, **kwargs: asked.append(1) or decide(*args, **kwargs)  # type: ignore[method-assign]
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ratio))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        decided = [tracing.admit(None, "serve apollo") for _ in range(2000)]
        for decision in decided:
            with tracing.current("serve apollo", "server", decision, {"tekton.request_id": "r"}):
                pass
        sampled_caller = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        with tracing.current("chat apollo", "client", sampled_caller):
            under = [tracing.admit(None, "serve apollo") for _ in range(50)]
    finally:
        tracing.install(None)
    roots = [d.root for d in decided if d is not None and d.root is not None]
    passed = [d.passed for d in decided if d is not None and d.passed is not None]
    assert len(roots) + len(passed) == 2000 and 400 < len(roots) < 800
    assert len(asked) == len(roots)  # asked only about the roots it keeps, once each
    keep = Decision.RECORD_AND_SAMPLE
    assert all(ratio.should_sample(None, r, "serve apollo").decision is keep for r in roots)
    assert all(ratio.should_sample(None, p, "serve apollo").decision is not keep for p in passed)
    assert sorted(s.context.trace_id for s in exporter.get_finished_spans() if s.parent is None) == sorted(
        roots
    )
    assert all(d is not None and d.root is not None for d in under)  # sampled, as its parent is
    # A span decided ahead keeps its attributes (the SDK takes them from the sampler's result).
    served = [s for s in exporter.get_finished_spans() if s.name == "serve apollo"]
    assert len(served) == len(roots) and all(s.attributes == {"tekton.request_id": "r"} for s in served)


@pytest.mark.fast
def test_a_request_sampled_out_and_served_plainly_passes_its_trace_context_on() -> None:
    """The specialist serves a sampled-out request without a span (tracing.pass_on, its hot path):
    what the request asks of others still names its trace, sampled out, and nothing after it does."""
    tracing.install(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0))))
    try:
        trace = tracing.admit(None, "serve apollo")
        assert trace is not None and isinstance(trace.passed, int)
        passing = tracing.pass_on(trace)
        try:
            carried = tracing.headers()
        finally:
            tracing.passed(passing)
        after = tracing.headers()
    finally:
        tracing.install(None)
    assert carried is not None and carried["traceparent"].startswith(f"00-{trace.passed:032x}-")
    assert int(carried["traceparent"][-2:], 16) & 1 == 0
    assert after is None


@pytest.mark.fast
def test_a_client_s_sampled_out_trace_is_passed_on_from_hop_to_hop() -> None:
    """A client span the sampler drops, and one inside a request sampled out, are not made (the SDK's
    would record nothing): their trace context goes on all the same, not sampled, one trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        root = tracing.start("chat apollo", "client", attributes={"tekton.request_id": "r"})
        sent = tracing.headers(root)
        tracing.event(root, "first chunk")
        tracing.end(root, RuntimeError("its answer failed"))
        assert sent is not None
        with tracing.current("gateway chat", "server", tracing.admit(sent, "gateway chat")) as gateway:
            hop = tracing.start("chat apollo", "client")
            forwarded = tracing.headers(hop)
            tracing.end(hop)
    finally:
        tracing.install(None)
    assert gateway is None and forwarded is not None
    assert forwarded["traceparent"][:36] == sent["traceparent"][:36]  # the same trace
    assert all(int(h["traceparent"][-2:], 16) & 1 == 0 for h in (sent, forwarded))  # not sampled
    assert exporter.get_finished_spans() == ()


class _OnlySpecialists(Sampler):
    """Samples a root span only if a specialist makes it: a sampled-out request whose trace context
    was lost on the way would show as a specialist's trace of its own."""

    def should_sample(
        self, parent_context: Any, trace_id: int, name: str, *args: Any, **kwargs: Any
    ) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE if name.startswith("serve ") else Decision.DROP)

    def get_description(self) -> str:
        return "only specialists"


async def test_a_request_sampled_out_at_its_root_stays_out_all_the_way_down(settings: TektonSettings) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(_OnlySpecialists()))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        async with (
            in_process_specialists(settings, "apollo"),
            in_process_gateway(settings),
            Bus.connect(settings) as bus,
        ):
            await bus.gateway.create(specialist="apollo", name="untraced")
            async with bus.stream(
                "apollo", [ChatMessage(role="user", content="hi")], session="untraced"
            ) as s:
                assert (await s.result()).text == "apollo heard: hi"
            # The specialist saw the client's decision (through the gateway, which made no span).
            async with bus.stream("apollo", [ChatMessage(role="user", content="direct")]) as s:
                assert (await s.result()).text == "apollo heard: direct"
    finally:
        tracing.install(None)
    assert exporter.get_finished_spans() == ()
