"""Run a gateway replica: its own NATS connection, the sessions bucket, drain on SIGTERM."""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus

from bus.client import connect
from bus.settings import TektonSettings
from bus.signals import set_on_signal
from gateway.service import GatewayService
from gateway.store import SessionStore, StoreLimits, open_bucket


async def serve_gateway(
    settings: TektonSettings,
    *,
    task_status: TaskStatus[GatewayService] = anyio.TASK_STATUS_IGNORED,
    stop: anyio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (SIGTERM/SIGINT when no event is given), then finish recording."""
    nc = await connect(settings.nats_url, name="tekton-gateway")
    try:
        limits = StoreLimits(
            ttl_s=settings.session_ttl_s,
            max_turns=settings.session_max_turns,
            max_bytes=min(settings.session_max_bytes, nc.max_payload),
        )
        kv = await open_bucket(nc.jetstream(), settings.prefix, limits)
        async with anyio.create_task_group() as tg:
            service = GatewayService(nc, SessionStore(kv, limits), settings, tg)
            await service.start()
            task_status.started(service)
            if stop is None:
                stop = anyio.Event()
                tg.start_soon(set_on_signal, stop)
            await stop.wait()
            with anyio.CancelScope(shield=True):
                await service.stop(settings.drain_grace_s)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await nc.drain()
