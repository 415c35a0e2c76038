"""Stopping on a signal, shared by every long-running piece (specialists, gateway, tekton)."""

from __future__ import annotations

import signal
from collections.abc import Sequence

import anyio
import structlog

log = structlog.get_logger("tekton")


async def set_on_signal(
    stop: anyio.Event, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
) -> None:
    """Set ``stop`` on the first of ``signals``."""
    with anyio.open_signal_receiver(*signals) as received:
        async for sig in received:
            log.info("stopping", signal=signal.Signals(sig).name)
            break
    stop.set()
