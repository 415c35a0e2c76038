"""One replica's figures as Prometheus metrics (prometheus-client), in a registry of its own.

They are recorded once per request (never per token), and the same figures leave the process in the
``data`` of the replica's ``$SRV.STATS`` answer (:meth:`SpecialistMetrics.snapshot`), so anyone on the
bus can gather them: ``tekton top``, and the ``/metrics`` endpoint of ``tekton up`` (bridge/metrics.py).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

# Seconds. The first chunk of a loopback scripted answer takes about a millisecond, a local model's
# a tenth of a second, a remote API's a second or more.
FIRST_CHUNK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOTAL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class SpecialistMetrics:
    """Requests, tokens and latency histograms of one replica (errors, cancellations and in-flight
    requests are the service's own counters, sent next to these)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tekton_requests", "Chat requests taken", registry=r)
        self.tokens_in = Counter("tekton_tokens_in", "Prompt tokens the provider reported", registry=r)
        self.tokens_out = Counter("tekton_tokens_out", "Tokens (chunks) streamed out", registry=r)
        self.first_chunk = Histogram(
            "tekton_first_chunk_seconds",
            "Request taken to first chunk sent",
            buckets=FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        self.total = Histogram(
            "tekton_total_seconds", "Request taken to done frame sent", buckets=TOTAL_BUCKETS, registry=r
        )

    def done(self, tokens_in: int | None, total_s: float) -> None:
        """One answer finished (tokens out and the first chunk's wait are counted by the caller for
        every answer, however it ended, not only this)."""
        if tokens_in:
            self.tokens_in.inc(tokens_in)
        self.total.observe(total_s)

    def snapshot(self) -> dict[str, Any]:
        """The figures as plain JSON for ``$SRV.STATS``: counters, and histograms as cumulative bucket
        counts (``[[upper_bound, count], ...]``, the last bound ``"+Inf"``) with their sum."""
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            if family.type == "counter":
                out[family.name] = next(s.value for s in family.samples if s.name.endswith("_total"))
            elif family.type == "histogram":
                buckets = [[s.labels["le"], s.value] for s in family.samples if s.name.endswith("_bucket")]
                total = next(s.value for s in family.samples if s.name.endswith("_sum"))
                out[family.name] = {"buckets": buckets, "sum": total}
        return out
