"""Run a gateway replica: its own NATS connection, the sessions bucket, drain on SIGTERM."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from bridge.listen import http_server, http_socket
from bus.client import connect_as
from bus.cluster import session_replicas
from bus.errors import NatsUnavailable
from bus.settings import TektonSettings
from bus.signals import set_on_signal
from bus.usage import Budget
from gateway.journal import open_journal
from gateway.leases import work_bucket_name
from gateway.service import GatewayService
from gateway.store import SessionStore, StoreLimits, bucket_name, open_bucket, value_limit
from gateway.usage import UsageBook, open_usage_bucket

if TYPE_CHECKING:
    from fastapi import FastAPI

log = structlog.get_logger("tekton.gateway")

# On stop, the HTTP bridge's open responses (answers still streaming) get this long to end.
HTTP_SHUTDOWN_S = 5


async def serve_gateway(
    settings: TektonSettings,
    *,
    task_status: TaskStatus[GatewayService] = anyio.TASK_STATUS_IGNORED,
    stop: anyio.Event | None = None,
    http: tuple[str, int] | None = None,
    on_http: Callable[[str], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (SIGTERM/SIGINT when no event is given), then finish recording.

    With ``http`` (host, port) the HTTP bridge runs too; ``on_http`` hears its URL once it listens.
    nats-py rides out server restarts by itself but closes the connection for good on some server
    errors: then the replica starts over on a new connection instead of living on disconnected.
    """
    bridge: _Bridge | None = None
    if http is not None:
        # First, so a bridge that cannot be is one line at once, before any connection or "ready"
        # line. Listening now: until the bridge serves, connections wait in the backlog.
        # The bridge (FastAPI, MCP, A2A: ~1.3 s of imports) loads only for a gateway that serves HTTP.
        from bridge.app import create_app

        bridge_ready = anyio.Event()
        tls = settings.http_tls_cert is not None and settings.http_tls_key is not None
        app = create_app(settings, host=http[0], ready=bridge_ready, tls=tls)
        bridge = _Bridge(app, http_socket(*http), bridge_ready, tls)
    with bridge.sock if bridge else nullcontext():
        await _serve_gateway(settings, task_status, stop, bridge, on_http)


@dataclass
class _Bridge:
    app: FastAPI
    sock: socket.socket
    ready: anyio.Event
    tls: bool


async def _serve_gateway(
    settings: TektonSettings,
    task_status: TaskStatus[GatewayService],
    stop: anyio.Event | None,
    bridge: _Bridge | None,
    on_http: Callable[[str], None] | None,
) -> None:
    async with anyio.create_task_group() as tg:
        if stop is None:
            stop = anyio.Event()
            tg.start_soon(set_on_signal, stop)
        server: Any = None  # the bridge's uvicorn.Server
        served = anyio.Event()  # the HTTP bridge's server has shut down, its lifespan included
        first = True

        async def serve_http(sock: socket.socket) -> None:
            assert server is not None
            try:
                await server.serve([sock])
            finally:
                served.set()

        async def ready(service: GatewayService) -> None:
            nonlocal first, server
            if not first:
                log.info("gateway serving again", instance=service.instance_id)
                return
            first = False
            if bridge is not None:
                server = http_server(
                    bridge.app,
                    # Past this, uvicorn cuts the responses still streaming itself, and then ends
                    # the lifespan: it is never cancelled in the middle (see the stop below).
                    shutdown_s=HTTP_SHUTDOWN_S,
                    tls=(settings.http_tls_cert, settings.http_tls_key) if bridge.tls else None,
                )
                tg.start_soon(serve_http, bridge.sock)
                await bridge.ready.wait()
                host, port = bridge.sock.getsockname()[:2]
                if on_http:
                    on_http(f"{'https' if bridge.tls else 'http'}://{host}:{port}")
            task_status.started(service)

        while not stop.is_set():
            lost = anyio.Event()
            try:
                nc = await connect_as(settings, name="tekton-gateway", identity="gateway", closed=lost)
            except NatsUnavailable:
                if first:
                    raise
                with anyio.move_on_after(1.0):  # a retry's backoff that still ends at once on stop
                    await stop.wait()
                continue
            try:
                await _serve_connection(nc, settings, lost, stop, ready)
            finally:
                with anyio.CancelScope(shield=True):
                    if not nc.is_closed:
                        await nc.drain()
            if lost.is_set() and not stop.is_set():
                log.error("gateway lost its NATS connection for good; connecting again")
        if server is not None:
            # Let uvicorn close its connections and end the app's lifespan itself: cancelled in the
            # middle, it printed a traceback on every stop.
            server.should_exit = True
            with anyio.move_on_after(HTTP_SHUTDOWN_S + 5):  # (a backstop: it stops by itself)
                await served.wait()
        tg.cancel_scope.cancel()


async def _serve_connection(
    nc: NATS,
    settings: TektonSettings,
    lost: anyio.Event,
    stop: anyio.Event,
    ready: Callable[[GatewayService], Awaitable[None]],
) -> None:
    """One connection's life: serve until ``stop`` (then let recordings finish) or until it is lost."""
    limits = StoreLimits(
        ttl_s=settings.session_ttl_s,
        max_turns=settings.session_max_turns,
        max_bytes=value_limit(nc.max_payload, settings.session_max_bytes),
        replicas=session_replicas(nc, settings.session_replicas),
    )
    kv = await open_bucket(nc.jetstream(), settings.prefix, limits)
    journal = None
    if limits.replicas > 1:  # on one server, the journal would wait for the same server as the bucket
        work = f"KV_{work_bucket_name(settings.prefix)}"
        journal = await open_journal(
            nc, settings.prefix, bucket_name(settings.prefix), limits.replicas, [work]
        )
    async with anyio.create_task_group() as tg:
        store = SessionStore(kv, limits, task_group=tg, journal=journal)
        service = GatewayService(nc, store, settings, tg)
        usage_kv = await open_usage_bucket(nc, settings.prefix, limits.replicas)
        budget = Budget(
            tokens=settings.usage_budget_tokens,
            cost=settings.usage_budget_cost,
            period=settings.usage_budget_period,
        )
        service.usage = UsageBook(nc, usage_kv, settings.prefix, budget, settings.usage_budgets)
        await service.start()
        await ready(service)
        async with anyio.create_task_group() as waiting:
            for event in (stop, lost):
                waiting.start_soon(_cancel_on, event, waiting.cancel_scope)
        if stop.is_set() and not lost.is_set():
            with anyio.CancelScope(shield=True):
                await service.stop(settings.drain_grace_s)
        tg.cancel_scope.cancel()


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
