"""Child processes that report readiness with a line on stdout, and stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import anyio
import structlog
from anyio.abc import Process, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from bus.errors import BusError

log = structlog.get_logger("tekton.supervisor")

READY_PREFIX = b"ready "


async def run_child(
    argv: Sequence[str],
    label: str,
    *,
    env: dict[str, str] | None = None,
    task_status: TaskStatus[Process] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Start ``argv``, report started once it prints a ``ready ...`` line, stop it with SIGTERM on cancel.

    Children get their own session: a Ctrl-C at the terminal reaches only the supervisor, which then
    shuts children down in order instead of everything dying at once.
    """
    process = await anyio.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None,
        env={**os.environ, **(env or {}), "TEKTON_SUPERVISED": "1"},
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
                task_status.started(process)
            elif line:
                sys.stdout.write(f"[{label}] {line.decode(errors='replace')}\n")
        code = await process.wait()
        if not started:
            raise BusError(f"{label} exited with code {code} before it was ready (its errors are above)")
        log.warning("child exited", child=label, code=code)
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
