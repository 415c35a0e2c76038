"""What metrics and tracing cost on the hot path, measured in one run against a baseline without them.

    python -m bench.observability [--quick]

Specialists and client in this process (so both sides' costs count) on a real nats-server, scripted
provider at 0 ms. Three modes, interleaved round by round so drift hits them alike:

- ``bare``: tracing off and the specialist's prometheus metrics swapped for no-ops (the floor);
- ``metrics``: what ships by default: metrics on, tracing off (goal: within noise of ``bare``);
- ``tracing``: metrics on and tracing on (OpenTelemetry SDK, batch processor, an exporter that encodes
  each batch as OTLP protobuf and drops the bytes: the export's CPU counts, its socket I/O does not),
  every request traced;
- ``sampled``: the same with 5 % of traces sampled (parent-based ratio sampler), what a busy bus runs
  (goal: <= 5 % over ``bare``).

Per mode: sequential request-to-done latency (p50/p99) of a 20-chunk answer, and requests per second
with 32 at once, and this process's CPU time per request (client and specialist together; on a shared
machine the fairest of the three, since wall time also counts other processes' load). Then where
a traced request's CPU goes, per span, with the real SDK (:func:`span_costs`): making a span, its
attributes and events, the batch processor and OTLP encoding (on the exporter's thread:
``time.process_time`` counts every thread of the process), and the ``traceparent`` hops; and what the
model's part (GenAI attributes and a first-chunk event on the serve span, specialists/tracing.py)
adds. Writes bench/results/observability.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from bench.common import summary, write_results
from bus import tracing
from bus.client import Bus
from bus.logs import configure_logging
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from specialists.runtime import serve_specialists
from specialists.service import SpecialistService
from specialists.tracing import record_model_part

PROMPT = [ChatMessage(role="user", content="hello")]
SAMPLED = 0.05  # the ``sampled`` mode's ratio (OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG=0.05)
MODES = ("bare", "metrics", "tracing", "sampled")


class EncodeSpans(SpanExporter):
    """What the OTLP exporter does with a batch, short of sending it (the encoding costs more CPU per
    span than making it)."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS


def tracer_provider(mode: str) -> TracerProvider | None:
    if mode not in ("tracing", "sampled"):
        return None
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(SAMPLED)) if mode == "sampled" else None)
    provider.add_span_processor(BatchSpanProcessor(EncodeSpans()))
    return provider


class NoMetrics:
    """The SpecialistMetrics interface doing nothing (the ``bare`` baseline)."""

    class _Counter:
        def inc(self, amount: float = 1) -> None:
            pass

    def __init__(self) -> None:
        self.requests = self.tokens_out = self.tokens_in = self._Counter()

    def done(self, *args: Any) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {"tekton_tokens_out": 0.0}


async def one(bus: Bus) -> float:
    start = time.perf_counter()
    async with bus.stream("apollo", PROMPT) as s:
        async for _ in s:
            pass
    return time.perf_counter() - start


async def measure(settings: TektonSettings, mode: str, sequential: int, burst: int) -> dict[str, Any]:
    provider = tracer_provider(mode)
    tracing.install(provider)
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            services: list[SpecialistService] = await tg.start(
                lambda task_status: serve_specialists(
                    settings, ["apollo"], stop=stop, task_status=task_status
                )
            )
            if mode == "bare":
                services[0].metrics = NoMetrics()  # type: ignore[assignment]
            async with Bus.connect(settings) as bus:
                for _ in range(20):  # warm-up
                    await one(bus)
                cpu = time.process_time()
                lat = [await one(bus) for _ in range(sequential)]
                if provider is not None:
                    provider.force_flush()  # the export of these requests' spans counts too
                cpu_per_request = (time.process_time() - cpu) / sequential
                began = time.perf_counter()
                async with anyio.create_task_group() as burst_tg:
                    for _ in range(burst):
                        burst_tg.start_soon(one, bus)
                rps = burst / (time.perf_counter() - began)
            stop.set()
    finally:
        tracing.install(None)
        if provider is not None:
            provider.shutdown()
    return {"lat": lat, "rps": rps, "cpu": cpu_per_request}


def _cpu_us(fn: Any, n: int, flush: Any = None) -> float:
    """Median over 5 rounds of CPU microseconds per call of ``fn`` (every thread of this process),
    ``flush`` (the batch processor's export of the round's spans) included."""
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            fn()
        if flush is not None:
            flush()
        rounds.append((time.process_time() - start) / n * 1e6)
    return statistics.median(rounds)


def span_costs(n: int = 500) -> dict[str, float]:
    """CPU microseconds per span of each thing the SDK does for a traced request (batches of ``n``
    spans, under the batch processor's queue of 2048, so none is dropped uncounted)."""
    bare = TracerProvider()  # no processor: the span is made and ended, and goes nowhere
    exporting = TracerProvider()
    exporting.add_span_processor(BatchSpanProcessor(EncodeSpans()))
    made, sent = bare.get_tracer("bench"), exporting.get_tracer("bench")
    two = {
        "tekton.request_id": "5f0c8a1e3b2d4c5e8f9a0b1c2d3e4f5a",
        "tekton.instance": "WS9eKhHakwy3yxlii2XiII",
    }

    def plain(tracer: Any) -> Any:
        return lambda: tracer.start_span("serve apollo").end()

    def dressed(tracer: Any) -> Any:
        def one() -> None:
            span = tracer.start_span("serve apollo", attributes=two)
            span.add_event("first chunk")
            span.set_attribute("gen_ai.usage.output_tokens", 20)
            span.end()

        return one

    try:
        out = {
            "make_and_end": _cpu_us(plain(made), n),
            "make_and_end_with_2_attributes_an_event_and_a_set": _cpu_us(dressed(made), n),
            "processor_and_otlp_encoding": _cpu_us(plain(sent), n, exporting.force_flush)
            - _cpu_us(plain(made), n),
            "processor_and_otlp_encoding_with_attributes": _cpu_us(dressed(sent), n, exporting.force_flush)
            - _cpu_us(dressed(made), n),
        }
        tracing.install(exporting)
        span = made.start_span("chat apollo")
        out["traceparent_inject_and_extract"] = _cpu_us(
            lambda: tracing._otel.propagator.extract(tracing.headers(span)), n
        )
        return {k: round(v, 1) for k, v in out.items()}
    finally:
        tracing.install(None)
        exporting.shutdown()


def instrumentation_us(mode: str, n: int = 5000, model_part: bool = True) -> float:
    """CPU microseconds the instrumentation of one request costs by itself (the same calls a request
    makes, without the I/O around them): steadier than end-to-end figures on a shared machine."""
    from specialists.metrics import SpecialistMetrics

    metrics = SpecialistMetrics()
    provider = tracer_provider(mode)
    tracing.install(provider)
    try:
        start = time.process_time()
        for i in range(n):
            if mode != "bare":
                metrics.requests.inc()
            span = tracing.start("chat apollo", "client", attributes={"tekton.request_id": "r"})
            headers = tracing.headers(span)
            trace = tracing.admit(headers, "serve apollo")
            if trace is not None:
                attributes = {"tekton.request_id": "r", "tekton.instance": "i"}
                with tracing.current("serve apollo", "server", trace, attributes):
                    if model_part:
                        record_model_part(
                            tracing.current_recording(),
                            "scripted",
                            "scripted",
                            output_tokens=20,
                            prompt_tokens=None,
                            first_token_at=time.perf_counter(),
                        )
            tracing.end(span)
            if mode != "bare":
                metrics.done(None, 0.0009)
                metrics.tokens_out.inc(20)
                metrics.first_chunk.observe(0.0004)
            if provider is not None and i % 200 == 199:  # under the processor's queue: no span dropped
                provider.force_flush()
        if provider is not None:
            provider.force_flush()
        return (time.process_time() - start) / n * 1e6
    finally:
        tracing.install(None)
        if provider is not None:
            provider.shutdown()


async def main(quick: bool) -> dict[str, Any]:
    rounds, sequential, burst = (2, 200, 200) if quick else (5, 500, 640)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "store", port=0)
        server.start()
        try:
            settings = TektonSettings(
                nats_url=server.url, provider="scripted", data_dir=Path(tmp) / "data", max_concurrency=32
            )
            lat: dict[str, list[float]] = {m: [] for m in MODES}
            rps: dict[str, list[float]] = {m: [] for m in MODES}
            cpu: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(rounds):
                for mode in MODES if r % 2 == 0 else reversed(MODES):
                    got = await measure(settings, mode, sequential, burst)
                    lat[mode] += got["lat"]
                    rps[mode].append(got["rps"])
                    cpu[mode].append(got["cpu"])
        finally:
            server.stop()
    out: dict[str, Any] = {}
    base_p50 = summary(lat["bare"])["p50_ms"]
    base_rps = statistics.median(rps["bare"])
    base_cpu = statistics.median(cpu["bare"])
    alone = {mode: instrumentation_us(mode) for mode in MODES}
    model_part = alone["tracing"] - instrumentation_us("tracing", model_part=False)
    for mode in MODES:
        s = summary(lat[mode])
        r = statistics.median(rps[mode])
        c = statistics.median(cpu[mode]) * 1e6
        out[mode] = {
            **s,
            "requests_per_s": round(r, 1),
            "p50_vs_bare": round(s["p50_ms"] / base_p50, 3),
            "throughput_vs_bare": round(r / base_rps, 3),
            "cpu_us_per_request": round(c, 1),
            "cpu_vs_bare": round(c / (base_cpu * 1e6), 3),
            "instrumentation_us": round(alone[mode] - alone["bare"], 1),
            "instrumentation_vs_bare_request": round((alone[mode] - alone["bare"]) / (base_cpu * 1e6), 4),
        }
        print(
            f"{mode:8} request-to-done p50 {s['p50_ms']:.3f} ms p99 {s['p99_ms']:.3f} ms "
            f"({out[mode]['p50_vs_bare']:.3f}x bare) | {r:.0f} req/s at 32 at once "
            f"({out[mode]['throughput_vs_bare']:.3f}x bare) | {c:.0f} us CPU per request, this process "
            f"({out[mode]['cpu_vs_bare']:.3f}x bare) | instrumentation alone "
            f"{out[mode]['instrumentation_us']:.1f} us = {out[mode]['instrumentation_vs_bare_request']:.1%} "
            "of a bare request's CPU"
        )
    per_span = span_costs()
    out["per_span_us"] = per_span
    out["model_part_on_the_serve_span_us"] = round(model_part, 1)
    print("where a traced request's CPU goes, per span (us, median of 5 rounds, every thread):")
    for what, us in per_span.items():
        print(f"  {what:52} {us:6.1f}")
    print(f"the model's part (GenAI attributes, a first-chunk event, on the serve span): {model_part:.1f} us")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.environ["TEKTON_SCRIPTED_TOKENS"] = "20"
    configure_logging("warning")
    results = anyio.run(main, args.quick)
    write_results("observability", results)
    sys.exit(0)
