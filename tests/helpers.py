"""Test helpers: real processes, real server. Waits are on ready lines and conditions, never fixed sleeps."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import pytest

from bus.settings import TektonSettings
from gateway.runtime import serve_gateway
from gateway.service import GatewayService
from specialists.runtime import serve_specialists
from specialists.service import SpecialistService

AISH = [sys.executable, "-m", "aish_client"]


def aish(
    settings: TektonSettings, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `aish ARGS` to completion (no stdin unless given)."""
    return subprocess.run(
        [*AISH, *args],
        env=child_env(settings, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


class env:
    """Set environment variables for a block (in-process providers read TEKTON_SCRIPTED_* at start)."""

    def __init__(self, **values: str):
        self.values = values
        self.patch = pytest.MonkeyPatch()

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.patch.setenv(key, value)

    def __exit__(self, *exc: object) -> None:
        self.patch.undo()


async def run_aish(settings: TektonSettings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`aish ARGS` in a worker thread, so this event loop keeps serving in-process services."""
    return await anyio.to_thread.run_sync(partial(aish, settings, *args, **env))


def child_env(settings: TektonSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEKTON_")}
    env.update(
        TEKTON_NATS_URL=settings.nats_url,
        TEKTON_DATA_DIR=str(settings.data_dir),
        TEKTON_CONFIG="/nonexistent/tekton.toml",
        TEKTON_HEARTBEAT_S=str(settings.heartbeat_s),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Child:
    """A subprocess whose stdout lines are collected by a thread, so tests can wait for a line."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        for line in self.seen:
            if predicate(line):
                return line
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching line within {timeout} s; saw: {self.seen[-10:]}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:  # type: ignore[comparison-overlap]
                raise AssertionError(
                    f"process exited ({self.process.poll()}) before the line; saw: {self.seen[-10:]}"
                )
            self.seen.append(line)
            if predicate(line):
                return line

    def stop(self, sig: int = 15, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def spawn(argv: list[str], env: Mapping[str, str], **kwargs: Any) -> Child:
    process = subprocess.Popen(
        argv, env=dict(env), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, **kwargs
    )
    child = Child(process)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            child.lines.put(line.rstrip("\n"))
        child.lines.put(None)  # type: ignore[arg-type]

    threading.Thread(target=pump, daemon=True).start()
    return child


@contextmanager
def specialist_process(
    settings: TektonSettings, *names: str, **env: str
) -> Iterator[tuple[Child, dict[str, str]]]:
    """`tekton specialist NAMES --provider scripted`; yields the child and {name: instance id}."""
    child = spawn(
        [
            sys.executable,
            "-m",
            "tekton",
            "specialist",
            *names,
            "--provider",
            "scripted",
            "--log-level",
            "warning",
        ],
        child_env(settings, **env),
    )
    try:
        instances = {}
        for _ in names:
            line = child.wait_for(lambda s: s.startswith("ready "))
            child.seen.remove(line)
            _, name, instance, *_ = line.split()
            instances[name] = instance
        yield child, instances
    finally:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


@asynccontextmanager
async def in_process_specialists(settings: TektonSettings, *names: str):  # type: ignore[no-untyped-def]
    """Serve ``names`` in this event loop (scripted provider unless settings say otherwise)."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        services: list[SpecialistService] = await tg.start(
            lambda task_status: serve_specialists(
                settings, list(names) or None, stop=stop, task_status=task_status
            )
        )
        try:
            yield {s.spec.name: s for s in services}
        finally:
            stop.set()


@asynccontextmanager
async def in_process_gateway(settings: TektonSettings):  # type: ignore[no-untyped-def]
    """A gateway replica in this event loop."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        service: GatewayService = await tg.start(
            lambda task_status: serve_gateway(settings, stop=stop, task_status=task_status)
        )
        try:
            yield service
        finally:
            stop.set()


def gateway_process(settings: TektonSettings, **env: str) -> Child:
    """`tekton gateway` as a child process, once it says ready."""
    child = spawn(
        [sys.executable, "-m", "tekton", "gateway", "--log-level", "warning"], child_env(settings, **env)
    )
    child.wait_for(lambda s: s.startswith("ready gateway"))
    return child


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 5.0) -> None:
    """Wait until ``check()`` holds (a bounded wait on a condition, not a fixed sleep)."""
    with anyio.fail_after(within):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.01)


async def assert_kept_alive(port: int, request: bytes, idle_s: float = 6.0, status: bytes = b"") -> None:
    """One connection to a local HTTP server on ``port``: ``request`` answered (with ``status``, if
    given), then again after ``idle_s`` of silence (longer than uvicorn's 5 s default keep-alive), as a
    pooled client does."""
    from anyio.streams.buffered import BufferedByteReceiveStream

    conn: Any = None

    async def listening() -> bool:
        nonlocal conn
        try:
            conn = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            return False  # a server that printed its ready line just before it listens
        return True

    await eventually(listening, within=20)
    async with conn:
        reader = BufferedByteReceiveStream(conn)
        for n in range(2):
            if n:
                await anyio.sleep(idle_s)  # between the two only
            await conn.send(request)
            head = await reader.receive_until(b"\r\n\r\n", 65536)
            assert head.startswith(b"HTTP/1.1 " + status), head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.receive_exactly(length)
