"""aish resumes an answer after a real dropped connection: aish talks to nats-server through a TCP proxy
in this test, which cuts every connection mid-answer (as a Wi-Fi drop or a NAT timeout would). nats-py
reconnects, the frames sent meanwhile are read back from the run, aish prints its note, and the answer
arrives whole, once. Real nats-server, aish as a subprocess, scripted specialist in this process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.abc import SocketStream, TaskGroup

from bus.settings import TektonSettings
from tests.helpers import env, in_process_gateway, in_process_specialists, run_aish

pytestmark = pytest.mark.anyio

WORDS = [f"w{i}" for i in range(80)]
QUESTION = " ".join(WORDS)


@dataclass
class Proxy:
    """Forwards TCP to nats-server; ``cut_after`` run frames to the client, it closes every connection
    (each side sees a dropped socket) and goes on accepting new ones."""

    upstream: tuple[str, int]
    cut_after: int
    url: str = ""
    cuts: int = 0
    run_frames: int = 0
    open: set[SocketStream] = field(default_factory=set)

    async def serve(self, tg: TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.url = f"nats://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        tg.start_soon(listener.serve, self._relay)

    async def _relay(self, client: SocketStream) -> None:
        server = await anyio.connect_tcp(*self.upstream)
        self.open |= {client, server}
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pump, client, server, False)
            tg.start_soon(self._pump, server, client, True)

    async def _pump(self, source: SocketStream, sink: SocketStream, to_client: bool) -> None:
        with suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async for data in source:
                await sink.send(data)
                if to_client and not self.cuts:
                    self.run_frames += data.count(b"MSG tekton.run.")
                    if self.run_frames >= self.cut_after:
                        await self.cut()
        with suppress(Exception):
            await sink.aclose()

    async def cut(self) -> None:
        self.cuts += 1
        streams, self.open = self.open, set()
        for stream in streams:
            with suppress(Exception):
                await stream.aclose()


@asynccontextmanager
async def proxy(settings: TektonSettings, cut_after: int) -> AsyncIterator[Proxy]:
    parts = urlsplit(settings.nats_url)
    relay = Proxy((parts.hostname or "127.0.0.1", parts.port or 4222), cut_after)
    async with anyio.create_task_group() as tg:
        await relay.serve(tg)
        yield relay
        tg.cancel_scope.cancel()


async def test_aish_resumes_an_answer_after_its_connection_dropped(settings: TektonSettings) -> None:
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="40"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            proxy(settings, cut_after=10) as relay,
        ):
            through = settings.model_copy(update={"nats_url": relay.url})
            done = await run_aish(through, "apollo", QUESTION)
    assert relay.cuts == 1  # the connection did drop mid-answer
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"apollo heard: {QUESTION}\n"  # whole, and once
    assert "the connection dropped frames; the answer goes on from frame" in done.stderr


async def test_aish_bulk_resumes_after_its_connection_dropped(
    settings: TektonSettings, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"operations": [{"id": "one", "ai": "apollo", "message": QUESTION}]}))
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="40"):
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            proxy(settings, cut_after=10) as relay,
        ):
            through = settings.model_copy(update={"nats_url": relay.url})
            done = await run_aish(through, "bulk", str(plan))
    assert relay.cuts == 1
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"apollo heard: {QUESTION}\n"
    assert "the connection dropped events; the bulk run goes on from event" in done.stderr
