"""A whole bus's figures, gathered over NATS: every specialist replica's ``$SRV.STATS`` data (its counters
and its prometheus-client histograms, see specialists/metrics.py) as Prometheus metric families labelled
by specialist and instance, and the ``/metrics`` listener ``tekton up --metrics PORT`` serves them on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.listen import listen_error
from bus.client import Bus

LABELS = ["specialist", "instance"]
COUNTERS = {  # stats data key -> (metric name, help)
    "tekton_requests": ("tekton_requests", "Chat requests taken"),
    "errors": ("tekton_errors", "Requests that ended in an error"),
    "cancelled": ("tekton_cancelled", "Requests stopped by their client"),
    "tekton_tokens_in": ("tekton_tokens_in", "Prompt tokens the provider reported"),
    "tekton_tokens_out": ("tekton_tokens_out", "Tokens streamed out"),
}
GAUGES = {
    "in_flight": ("tekton_in_flight", "Requests taken and not finished (generating or queued)"),
    "queued": ("tekton_queued", "Requests waiting for a free slot"),
    "busy": ("tekton_slots_busy", "Slots generating now"),
    "slots": ("tekton_slots", "Requests one replica generates at once"),
}
HISTOGRAMS = {
    "tekton_first_chunk_seconds": "Request taken to first chunk sent",
    "tekton_total_seconds": "Request taken to done frame sent",
}


def endpoint_data(stats: dict[str, Any]) -> dict[str, Any]:
    """The specialist's own figures inside one ``$SRV.STATS`` answer."""
    endpoints = stats.get("endpoints") or [{}]
    return endpoints[0].get("data") or {}


def quantile(q: float, buckets: list[list[Any]]) -> float | None:
    """Like PromQL's ``histogram_quantile``: ``q`` of cumulative ``[[upper_bound, count], ...]``,
    interpolated inside the bucket it falls in (None when nothing was observed)."""
    if not buckets or not buckets[-1][1]:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        upper = float(bound)
        if count >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: the most that can be said
            span = count - below
            return lower + (upper - lower) * ((rank - below) / span if span else 1.0)
        lower, below = upper, count
    return lower


class BusFigures:
    """The last gathered ``$SRV.STATS`` answers of every specialist replica, refreshed by :meth:`run`."""

    def __init__(self) -> None:
        self.stats: list[dict[str, Any]] = []
        self.at = 0.0
        self.updated = anyio.Event()

    async def refresh(self, bus: Bus, window: float = 0.2) -> list[dict[str, Any]]:
        stats = await bus.stats(window=window)
        self.stats, self.at = sorted(stats, key=lambda s: (s.get("name", ""), s.get("id", ""))), time.time()
        self.updated.set()
        self.updated = anyio.Event()
        return self.stats

    async def run(self, bus: Bus, interval: float = 1.0) -> None:
        while True:
            await self.refresh(bus)
            await anyio.sleep(interval)


class BusCollector(Collector):
    """Prometheus metric families from :class:`BusFigures` (read from the scrape thread: the figures
    are swapped in whole, never changed in place)."""

    def __init__(self, figures: BusFigures):
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        stats = self.figures.stats
        counters = {k: CounterMetricFamily(name, doc, labels=LABELS) for k, (name, doc) in COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(name, doc, labels=LABELS) for k, (name, doc) in GAUGES.items()}
        hists = {k: HistogramMetricFamily(k, doc, labels=LABELS) for k, doc in HISTOGRAMS.items()}
        for answer in stats:
            labels = [answer.get("name", ""), answer.get("id", "")]
            data = endpoint_data(answer)
            for key, family in counters.items():
                if key in data:
                    family.add_metric(labels, float(data[key]))
            for key, gauge in gauges.items():
                if key in data:
                    gauge.add_metric(labels, float(data[key]))
            for key, hist in hists.items():
                if isinstance(data.get(key), dict):
                    buckets = [(str(b), float(c)) for b, c in data[key]["buckets"]]
                    hist.add_metric(labels, buckets, float(data[key]["sum"]))
        yield from counters.values()
        yield from gauges.values()
        yield from hists.values()


class MetricsListener:
    """``/metrics`` over HTTP (prometheus-client's own server, in its thread) for a whole bus."""

    def __init__(self, figures: BusFigures, port: int, host: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        self.registry.register(BusCollector(figures))
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise listen_error(host, port, err) from None
        self.url = f"http://{host}:{self._server.server_port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
