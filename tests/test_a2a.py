"""Each specialist as an A2A agent (a2a-sdk server over the bus client), driven by the SDK's own client
over real HTTP (uvicorn) against real specialists on a real nats-server."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.helpers.proto_helpers import get_artifact_text
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from google.protobuf.json_format import MessageToDict

from bridge.a2a import create_a2a_app, session_name
from bus.client import Bus
from bus.discovery import SpecialistView
from bus.errors import BusError
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from specialists.providers.a2a_remote import context_id
from tests.helpers import (
    assert_kept_alive,
    child_env,
    eventually,
    in_process_gateway,
    in_process_specialists,
    spawn,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def a2a_bridge(settings: TektonSettings) -> AsyncIterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    async with Bus.connect(settings) as bus:
        # "ghost" has a card but no running specialist: its requests fail with the bus's error.
        ghost = SpecialistView(name="ghost", instances=[], primary=["haunting"], capabilities={"haunting": 1})
        app = create_a2a_app(bus, [*await bus.survey(window=0.3), ghost], base)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            await eventually(lambda: server.started, within=20)
            try:
                yield base
            finally:
                server.should_exit = True


# A roster entry: athena behind the A2A server as the specialist "scout" (the a2a provider).
SCOUT = """
[specialists.scout]
description = "A remote A2A agent"
primary = ["research"]
capabilities = {{ research = 0.9 }}
system_prompt = "unused: the remote agent has its own"
provider = "a2a"
provider_options = {{ url = "{base}/a2a/athena/" }}
"""


def ask(text: str) -> SendMessageRequest:
    return SendMessageRequest(message=Message(role=Role.ROLE_USER, parts=[Part(text=text)], message_id="m-1"))


async def test_agent_card_lists_the_specialist_s_skills(settings: TektonSettings) -> None:
    async with (
        in_process_specialists(settings, "apollo"),
        a2a_bridge(settings) as base,
        httpx.AsyncClient() as http,
    ):
        card = (await http.get(f"{base}/a2a/apollo/.well-known/agent-card.json")).json()
    assert card["name"] == "apollo"
    assert card["capabilities"]["streaming"] is True
    assert [s["id"] for s in card["skills"]][:2] == ["code-analysis", "prediction"]  # primary first
    assert card["supportedInterfaces"][0]["url"] == f"{base}/a2a/apollo/"


async def test_message_stream_arrives_as_artifact_chunks(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"), a2a_bridge(settings) as base:
        client = await create_client(f"{base}/a2a/apollo/")
        try:
            events = [e async for e in client.send_message(ask("explain queue groups"))]
        finally:
            await client.close()
    chunks = [
        get_artifact_text(e.artifact_update.artifact, "") for e in events if e.HasField("artifact_update")
    ]
    assert "".join(chunks) == "apollo heard: explain queue groups"
    # Streamed chunk by chunk, not in one piece (the first token alone, the rest of its burst after).
    assert chunks[0] == "apollo " and len([c for c in chunks if c]) >= 2, chunks
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert states[-1] == TaskState.TASK_STATE_COMPLETED


async def test_tekton_a2a_keeps_an_idle_connection_past_uvicorn_s_default(settings: TektonSettings) -> None:
    """`tekton a2a` keeps idle connections as long as the bridge does (HTTP_KEEP_ALIVE_S): a pooled
    client reusing one after 5 s of silence got "server disconnected" with uvicorn's default."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with in_process_specialists(settings, "apollo"):
        child = spawn(
            [sys.executable, "-m", "tekton", "a2a", "--port", str(port), "--log-level", "warning"],
            child_env(settings),
        )
        try:
            await anyio.to_thread.run_sync(lambda: child.wait_for(lambda s: "A2A agent apollo" in s))
            card = f"GET /a2a/apollo/.well-known/agent-card.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
            await assert_kept_alive(port, card.encode())
            # The bridge's edge checks: a page of another site, or a rebound DNS name, is refused.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                path = "/a2a/apollo/.well-known/agent-card.json"
                assert (await http.get(path)).status_code == 200
                rebound = await http.get(path, headers={"Host": f"evil.example:{port}"})
                assert rebound.status_code == 403 and "host" in rebound.json()["error"]["message"]
        finally:
            child.stop()


async def test_message_send_and_a_specialist_that_is_not_running(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"), a2a_bridge(settings) as base:
        client = await create_client(f"{base}/a2a/apollo/", client_config=ClientConfig(streaming=False))
        try:
            [reply] = [e async for e in client.send_message(ask("once"))]
        finally:
            await client.close()
        assert reply.task.status.state == TaskState.TASK_STATE_COMPLETED
        assert "".join(get_artifact_text(a, "") for a in reply.task.artifacts) == "apollo heard: once"

        ghost = await create_client(f"{base}/a2a/ghost/", client_config=ClientConfig(streaming=False))
        try:
            [failed] = [e async for e in ghost.send_message(ask("anyone?"))]
        finally:
            await ghost.close()
        assert failed.task.status.state == TaskState.TASK_STATE_FAILED
        said = failed.task.status.message.parts[0].text
        assert said.startswith("specialist_unavailable: no specialist named 'ghost' is running")

        # A message the SDK cannot make a task of: invalid params (-32602), not an internal error.
        for message in (
            Message(role=Role.ROLE_USER, parts=[Part(text="")], message_id="m-2"),
            Message(role=Role.ROLE_AGENT, parts=[Part(text="hi")], message_id="m-3"),
        ):
            async with httpx.AsyncClient() as http:
                reply = await http.post(
                    f"{base}/a2a/apollo/",
                    json={
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "SendMessage",
                        "params": {"message": MessageToDict(message)},
                    },
                    headers={"A2A-Version": "1.0"},
                )
            assert reply.json()["error"]["code"] == -32602, reply.text


async def test_an_a2a_agent_elsewhere_is_a_specialist_in_the_roster(
    settings: TektonSettings, tmp_path: Path
) -> None:
    """`provider = "a2a"`: the remote agent here is athena behind the A2A server, reached over HTTP."""
    async with in_process_specialists(settings, "athena"), a2a_bridge(settings) as base:
        roster = tmp_path / "roster.toml"
        roster.write_text(
            SCOUT.format(base=base)
            + f"""
[specialists.lost]
description = "An A2A agent that is not there"
primary = ["research"]
capabilities = {{ research = 0.5 }}
system_prompt = "-"
provider = "a2a"
provider_options = {{ url = "{base}/a2a/ghost/" }}
"""
        )
        remote = settings.model_copy(update={"provider": None, "roster": roster})
        async with in_process_specialists(remote, "scout", "lost"), Bus.connect(settings) as bus:
            answer = await bus.ask("scout", "what is out there?")
            assert answer.text == "athena heard: what is out there?"
            # The remote Tekton's own count, from its last artifact chunk's metadata (a chunk may
            # carry several tokens, so counting pieces would say fewer).
            assert answer.start.provider == "a2a" and answer.done.usage.completion_tokens == 6
            with pytest.raises(BusError, match="failed: specialist_unavailable: no specialist named 'ghost'"):
                await bus.ask("lost", "anyone?")


async def test_a_message_with_a_context_continues_its_session(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The context_id the server gave the first message names a Tekton session: a second message
    with it reaches the specialist after the first turn; a message without it starts afresh."""
    monkeypatch.setenv("TEKTON_SCRIPTED_ECHO_CONTEXT", "1")
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        a2a_bridge(settings) as base,
        Bus.connect(settings) as bus,
    ):
        client = await create_client(f"{base}/a2a/apollo/", client_config=ClientConfig(streaming=False))
        try:
            [first] = [e async for e in client.send_message(ask("q1"))]
            context = first.task.context_id
            assert context
            follow = ask("q2")
            follow.message.context_id = context
            follow.message.message_id = "m-2"
            [second] = [e async for e in client.send_message(follow)]
            [fresh] = [e async for e in client.send_message(ask("q3"))]
        finally:
            await client.close()

        def text(reply: Any) -> str:
            return "".join(get_artifact_text(a, "") for a in reply.task.artifacts)

        assert text(first) == "apollo heard: user: q1"
        assert second.task.context_id == context
        assert text(second) == "apollo heard: user: q1 | assistant: apollo heard: user: q1 | user: q2"
        assert fresh.task.context_id != context and text(fresh) == "apollo heard: user: q3"
        session = await bus.gateway.get(session_name(context))
        assert session.specialist == "apollo"
        assert [m.content for m in session.turns if m.role == "user"] == ["q1", "q2"]


async def test_a_remote_agent_gets_one_context_per_tekton_session(
    settings: TektonSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The a2a provider sends every turn of one Tekton session with the same context_id: the agent
    (athena behind the A2A server, which keeps a context as a session of its own) has the earlier turns
    and gets only the new question; another session is another context; a request outside a session
    has none."""
    monkeypatch.setenv("TEKTON_SCRIPTED_ECHO_CONTEXT", "1")
    roster = tmp_path / "roster.toml"
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "athena"),
        a2a_bridge(settings) as base,
        Bus.connect(settings) as bus,
    ):
        roster.write_text(SCOUT.format(base=base))
        remote = settings.model_copy(update={"provider": None, "roster": roster})
        async with in_process_specialists(remote, "scout"):
            one = await bus.gateway.create(specialist="scout", name="one")
            two = await bus.gateway.create(specialist="scout", name="two")

            async def turn(session: str, text: str) -> str:
                async with bus.stream(
                    "scout", [ChatMessage(role="user", content=text)], session=session
                ) as s:
                    return (await s.result()).text

            assert await turn("one", "q1") == "athena heard: user: q1"
            assert await turn("one", "q2") == (
                "athena heard: user: q1 | assistant: athena heard: user: q1 | user: q2"
            )
            assert await turn("two", "q3") == "athena heard: user: q3"
            assert (await bus.ask("scout", "alone")).text == "athena heard: user: alone"
        asker = (await bus.gateway.usage()).user
        first, second = (session_name(context_id(f"{asker}/{s.id}")) for s in (one, two))
        assert [m.content for m in (await bus.gateway.get(first)).turns if m.role == "user"] == ["q1", "q2"]
        assert [m.content for m in (await bus.gateway.get(second)).turns if m.role == "user"] == ["q3"]
        listed = sorted(s.name for s in await bus.gateway.list() if s.name and s.name.startswith("a2a."))
        # (the third: the context the A2A server gave the request outside a session, a fresh one)
        assert len(listed) == 3 and {first, second} < set(listed)


def test_a_context_id_that_cannot_be_a_session_name_is_hashed() -> None:
    assert session_name("9f0c7a1e-3b2d-4c5e-8f9a-0b1c2d3e4f5a") == "a2a.9f0c7a1e-3b2d-4c5e-8f9a-0b1c2d3e4f5a"
    hashed = session_name("ctx with spaces/and slashes")
    assert (
        hashed.startswith("a2a.")
        and len(hashed) == 44
        and hashed == session_name("ctx with spaces/and slashes")
    )
