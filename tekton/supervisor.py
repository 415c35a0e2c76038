"""Child processes that report readiness with a line on stdout, stop on SIGTERM, and come back if they die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import anyio
import structlog
from anyio.abc import Process, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from bus.errors import BusError
from bus.signals import describe_exit

log = structlog.get_logger("tekton.supervisor")

READY_PREFIX = b"ready "
# Waits before restarting a child after its 1st, 2nd, 3rd... death in a row (capped at the last).
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A child that ran this long before dying starts its backoff afresh.
HEALTHY_AFTER_S = 60.0


async def run_child(
    argv: Sequence[str],
    label: str,
    *,
    env: dict[str, str] | None = None,
    restart: bool = True,
    task_status: TaskStatus[Process] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Start ``argv``, report started once it prints a ``ready ...`` line, stop it with SIGTERM on cancel.

    A child that dies after it was ready is started again after a backoff that grows while it keeps
    dying (each restart is logged; a child dying over and over is reported as crash-looping). A child
    that dies before its first ready line fails the start: that is a configuration error to show, not
    to retry.
    """
    deaths = 0
    first = True
    while True:
        started_at = time.monotonic()
        code, ready = await _run_once(argv, label, env, task_status if first else None)
        if first and not ready:
            raise BusError(
                f"{label} exited with {describe_exit(code)} before it was ready (its errors are above)"
            )
        first = False
        if not restart:
            log.warning("child exited", child=label, how=describe_exit(code))
            return
        deaths = 1 if time.monotonic() - started_at > HEALTHY_AFTER_S else deaths + 1
        delay = BACKOFF_S[min(deaths, len(BACKOFF_S)) - 1]
        if deaths >= 3:
            how = describe_exit(code)
            log.error("child is crash-looping", child=label, how=how, deaths=deaths, retry_in_s=delay)
        else:
            log.warning("child died; restarting", child=label, how=describe_exit(code), retry_in_s=delay)
        await anyio.sleep(delay)


async def _run_once(
    argv: Sequence[str], label: str, env: dict[str, str] | None, task_status: TaskStatus[Process] | None
) -> tuple[int, bool]:
    """Run the child once; its exit code and whether it got ready."""
    process = await anyio.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None,
        env={**os.environ, **(env or {}), "TEKTON_SUPERVISED": "1"},
        # Children get their own session: a Ctrl-C at the terminal reaches only the supervisor, which
        # then shuts children down in order instead of everything dying at once.
        start_new_session=True,
    )
    assert process.stdout is not None
    lines = BufferedByteReceiveStream(process.stdout)
    started = False
    try:
        while True:
            try:
                line = await lines.receive_until(b"\n", 65536)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                break
            if not started and line.startswith(READY_PREFIX):
                started = True
                if task_status is not None:
                    task_status.started(process)
                else:
                    log.info("child restarted", child=label, pid=process.pid)
            elif line:
                sys.stdout.write(f"[{label}] {line.decode(errors='replace')}\n")
        return await process.wait(), started
    finally:
        with anyio.CancelScope(shield=True):
            await stop_process(process)


async def stop_process(process: Process, grace: float = 35.0) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with anyio.move_on_after(grace):
        await process.wait()
        return
    process.kill()
    await process.wait()
