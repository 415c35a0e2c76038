"""Run a set of specialists in one process: one NATS connection, drain on SIGTERM."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import structlog
from anyio.abc import TaskStatus

from bus.client import connect_as
from bus.settings import TektonSettings
from bus.signals import set_on_signal
from specialists.models import ModelPool, build, resolve
from specialists.providers.base import ProviderContext, ProviderError, SharedResources
from specialists.roster import RosterError, SpecialistSpec, load_roster
from specialists.service import SpecialistService

log = structlog.get_logger("tekton.runtime")


def select(roster: dict[str, SpecialistSpec], names: Sequence[str] | None) -> list[SpecialistSpec]:
    if not names:
        return list(roster.values())
    unknown = [n for n in names if n not in roster]
    if unknown:
        raise RosterError(f"not in the roster: {', '.join(unknown)}; known: {', '.join(sorted(roster))}")
    return [roster[n] for n in names]


def local_model_processes(settings: TektonSettings, names: Sequence[str] | None = None) -> int:
    """How many local-model processes serving ``names`` (the whole roster by default) start: one per
    specialist whose model is the local provider's (what `tekton up --processes` and `tekton specialist
    --replicas` share this machine's cores among)."""
    default_model = None if settings.provider else settings.model
    count = 0
    for spec in select(load_roster(settings.roster, settings.provider), names):
        try:
            choice = resolve(
                default_model, settings, own_provider=spec.provider, own_options=spec.provider_options
            )
        except ProviderError:  # the specialist's own start says what is wrong
            continue
        count += choice.kind == "local"
    return count


async def serve_specialists(
    settings: TektonSettings,
    names: Sequence[str] | None = None,
    *,
    on_ready: Callable[[list[SpecialistService]], None] | None = None,
    task_status: TaskStatus[list[SpecialistService]] = anyio.TASK_STATUS_IGNORED,
    stop: anyio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (SIGTERM/SIGINT when no event is given), then drain.

    Draining: no new requests are taken, in-flight streams finish (up to ``drain_grace_s``).

    Providers are created before touching the bus, so a missing model or key fails at once and clearly.
    """
    specs = select(load_roster(settings.roster, settings.provider), names)
    shared = SharedResources()
    # The config file's default model, unless a provider is forced on every specialist (tests).
    default_model = None if settings.provider else settings.model
    choices = [
        resolve(default_model, settings, own_provider=s.provider, own_options=s.provider_options)
        for s in specs
    ]
    contexts = [ProviderContext(s.name, shared) for s in specs]
    providers = [build(c, ctx) for c, ctx in zip(choices, contexts, strict=True)]
    # Providers that run something of their own (the local model's process) start it now, all at once.
    async with anyio.create_task_group() as starting:
        for provider in providers:
            if (start := getattr(provider, "start", None)) is not None:
                starting.start_soon(start)
    nc = await connect_as(
        settings, name=f"tekton-specialists:{','.join(s.name for s in specs)}", identity="specialist"
    )
    try:
        async with anyio.create_task_group() as tg:
            services = [
                SpecialistService(nc, spec, p, settings, tg, ModelPool(settings, choice, p, ctx))
                for spec, p, choice, ctx in zip(specs, providers, choices, contexts, strict=True)
            ]
            for service in services:
                await service.start()
            if on_ready:
                on_ready(services)
            task_status.started(services)
            if stop is None:
                stop = anyio.Event()
                tg.start_soon(set_on_signal, stop)
            await stop.wait()
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as draining:
                    for service in services:
                        draining.start_soon(service.drain, settings.drain_grace_s)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await nc.drain()
