"""Stopping on a signal, shared by every long-running piece (specialists, gateway, tekton)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

import anyio
import structlog

log = structlog.get_logger("tekton")

PR_SET_PDEATHSIG = 1


async def set_on_signal(
    stop: anyio.Event, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
) -> None:
    """Set ``stop`` on the first of ``signals``."""
    with anyio.open_signal_receiver(*signals) as received:
        async for sig in received:
            log.info("stopping", signal=signal.Signals(sig).name)
            break
    stop.set()


def die_with_parent() -> None:
    """Linux: get SIGTERM when the process that started us dies, even by SIGKILL, so a supervised
    child is never orphaned. Call it first thing in a child; elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl: the supervisor's own cleanup still applies
        return
    if os.getppid() == 1:  # the parent died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def describe_exit(code: int | None) -> str:
    """A process's end in words: ``Illegal instruction (SIGILL)`` for a signal, else its exit code."""
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"killed by signal {-code}"
        return f"{signal.strsignal(sig) or sig.name} ({sig.name})"
    return f"exit code {code}"
