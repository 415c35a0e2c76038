"""NATS over WebSocket: the server's own listener, origin checks, aish and specialists over ws://."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from tests.helpers import aish, child_env, spawn, specialist_process

pytestmark = pytest.mark.anyio


@pytest.fixture
def ws_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(
        tmp_path / "ws-store", port=0, websocket_port=0, allowed_origins=["http://console.example:8080"]
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_aish_and_a_specialist_work_over_websocket(ws_server: EmbeddedNats, settings: TektonSettings) -> None:
    over_ws = settings.model_copy(update={"nats_url": ws_server.ws_url})
    with (
        specialist_process(over_ws, "apollo"),
        specialist_process(settings.model_copy(update={"nats_url": ws_server.url}), "athena"),
    ):
        done = aish(over_ws, "-c", 'echo "hi" | apollo | athena')
        assert done.returncode == 0, done.stderr
        assert done.stdout == "athena heard: apollo heard: hi\n"
        listed = aish(over_ws, "list")
        assert "apollo" in listed.stdout and "athena" in listed.stdout


async def test_browser_origins_are_checked(ws_server: EmbeddedNats) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with http.ws_connect(ws_server.ws_url, headers={"Origin": "http://evil.example"}):
                pass
        assert refused.value.status == 403
        async with http.ws_connect(ws_server.ws_url, headers={"Origin": "http://console.example:8080"}) as ws:
            first = await ws.receive_bytes()
            assert first.startswith(b"INFO ")  # the NATS protocol, over a WebSocket


def test_tekton_up_websocket_prints_where_to_connect(tmp_path: Path, settings: TektonSettings) -> None:
    up = spawn(
        [
            sys.executable,
            "-m",
            "tekton",
            "up",
            "--provider",
            "scripted",
            "--websocket",
            "0",
            "--log-level",
            "warning",
        ],
        child_env(
            settings.model_copy(update={"nats_url": "nats://127.0.0.1:1"}), TEKTON_DATA_DIR=str(tmp_path)
        ),
    )
    try:
        line = up.wait_for(lambda s: s.startswith("NATS WebSocket on ws://"), timeout=60)
        ws_url = line.split()[3]
        up.wait_for(lambda s: s.startswith("Tekton is up"), timeout=60)
        # tekton up made the local user's credentials in its data dir on first run; aish finds them there.
        local = settings.model_copy(update={"nats_url": ws_url, "data_dir": tmp_path})
        done = aish(local, "athena", "over the web port")
        assert done.stdout == "athena heard: over the web port\n", done.stderr
    finally:
        up.stop()
