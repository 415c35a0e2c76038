"""The HTTP bridge's interop edges: A2A agents at /a2a/NAME/, /metrics, and W3C trace context from an
HTTP caller carried on to the specialist (real gateway + bridge, real specialists, real HTTP)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import httpx
import httpx2
import pytest
from a2a.client import ClientConfig, create_client
from a2a.helpers.proto_helpers import get_artifact_text
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from bus.settings import TektonSettings
from tests.helpers import eventually, in_process_specialists
from tests.test_http import bridge

pytestmark = pytest.mark.anyio


async def _send(client: Any, text: str) -> tuple[str, list[Any]]:
    """``text`` sent with the A2A SDK's ``client`` (closed after): the answer's text, and the events."""
    try:
        request = SendMessageRequest(
            message=Message(role=Role.ROLE_USER, parts=[Part(text=text)], message_id="m")
        )
        events = [e async for e in client.send_message(request)]
    finally:
        await client.close()
    answer = "".join(
        get_artifact_text(e.artifact_update.artifact, "") for e in events if e.HasField("artifact_update")
    )
    return answer, events


async def test_a2a_agents_are_served_by_the_bridge(settings: TektonSettings) -> None:
    async with bridge(settings) as url, in_process_specialists(settings, "athena"):
        async with httpx.AsyncClient() as http:
            card = (await http.get(f"{url}/a2a/athena/.well-known/agent-card.json")).json()
            assert card["name"] == "athena" and card["supportedInterfaces"][0]["url"] == f"{url}/a2a/athena/"
            assert "securitySchemes" not in card  # (no API tokens here)
            missing = await http.get(f"{url}/a2a/atena/.well-known/agent-card.json")
            assert missing.status_code == 404
            assert missing.json()["error"]["message"].startswith("no specialist named 'atena' is running")
            assert missing.json()["error"]["retryable"] is False  # (the bridge's one error body)
        text, events = await _send(await create_client(f"{url}/a2a/athena/"), "via the bridge")
    assert text == "athena heard: via the bridge"
    assert [e.status_update.status.state for e in events if e.HasField("status_update")][-1] == (
        TaskState.TASK_STATE_COMPLETED
    )


async def test_a2a_on_the_bridge_with_tokens_takes_the_sdk_client_s_bearer_token(
    settings: TektonSettings,
) -> None:
    settings = settings.model_copy(update={"http_tokens": ["alice=alice-token"]})
    async with bridge(settings) as url, in_process_specialists(settings, "athena"):
        async with httpx.AsyncClient() as http:
            refused = await http.get(f"{url}/a2a/athena/.well-known/agent-card.json")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"] == {
            "code": "unauthorized",
            "message": "a valid API token is needed",
            "retryable": False,
        }
        # The card says what the bridge asks for.
        async with httpx.AsyncClient(headers={"Authorization": "Bearer alice-token"}) as http:
            card = (await http.get(f"{url}/a2a/athena/.well-known/agent-card.json")).json()
        assert card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
        assert card["securityRequirements"] == [{"schemes": {"bearer": {}}}]
        # As docs/interop.md shows: the SDK's client, its httpx client carrying the token.
        async with httpx.AsyncClient(headers={"Authorization": "Bearer alice-token"}, timeout=30) as as_alice:
            config = ClientConfig(httpx_client=as_alice)
            text, _ = await _send(await create_client(f"{url}/a2a/athena/", client_config=config), "as alice")
    assert text == "athena heard: as alice"


async def test_metrics_of_the_bus_on_the_bridge(settings: TektonSettings) -> None:
    async with (
        bridge(settings) as url,
        in_process_specialists(settings, "apollo"),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await http.post("/api/chat", json={"specialist": "apollo", "message": "count me"})
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        assert re.search(r'tekton_requests_total\{instance="\w+",specialist="apollo"\} 1\.0', scraped.text)
        assert re.search(
            r'tekton_total_seconds_count\{instance="\w+",specialist="apollo"\} 1\.0', scraped.text
        )


async def test_an_http_caller_s_trace_reaches_the_model(
    settings: TektonSettings, spans: InMemorySpanExporter
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with (
        bridge(settings) as url,
        in_process_specialists(settings, "apollo"),
        httpx.AsyncClient(base_url=url) as http,
    ):
        headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        answer = await http.post("/api/chat", json={"specialist": "apollo", "message": "x"}, headers=headers)
        assert answer.status_code == 200
        wanted = {"POST /api/chat", "chat apollo", "serve apollo"}
        await eventually(lambda: wanted <= {s.name for s in spans.get_finished_spans()})
        missing = await http.post("/api/chat", json={"specialist": "apolo", "message": "x"})
        assert missing.status_code == 404
    ours = {s.name: s for s in spans.get_finished_spans() if s.context.trace_id == int(trace_id, 16)}
    http_span, client, server = ours["POST /api/chat"], ours["chat apollo"], ours["serve apollo"]
    assert http_span.attributes is not None and http_span.attributes["http.response.status_code"] == 200
    # The 404's: the bridge's span says so and is no error (the caller's mistake, as HTTP semantics
    # have it for a server); the bus client's span is one (its request failed).
    [lost] = [s for s in spans.get_finished_spans() if s.name == "chat apolo"]
    [refused] = [
        s
        for s in spans.get_finished_spans()
        if s.context.trace_id == lost.context.trace_id and s.name == "POST /api/chat"
    ]
    assert refused.attributes is not None and refused.attributes["http.response.status_code"] == 404
    assert refused.status.status_code != StatusCode.ERROR and lost.status.status_code == StatusCode.ERROR
    assert {format(s.context.trace_id, "032x") for s in (http_span, client, server)} == {trace_id}
    assert http_span.parent is not None and format(http_span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert client.parent is not None and client.parent.span_id == http_span.context.span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id


async def test_an_http_caller_s_sampled_out_trace_stays_out(
    settings: TektonSettings, spans: InMemorySpanExporter
) -> None:
    async with (
        bridge(settings) as url,
        in_process_specialists(settings, "apollo"),
        httpx.AsyncClient(base_url=url) as http,
    ):
        headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}
        answer = await http.post("/api/chat", json={"specialist": "apollo", "message": "x"}, headers=headers)
        assert answer.status_code == 200 and answer.json()["text"] == "apollo heard: x"
    # Not a trace of the bridge's own (the bus client's span a root) for a request its caller left out.
    assert spans.get_finished_spans() == ()


async def test_a_server_failure_marks_the_bridge_s_span(
    settings: TektonSettings, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5xx is the bridge's failure: its span is an error, with the status (a 4xx is not: see above)."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the model fell over")
        yield  # (an async generator, as a provider's stream is)

    async with (
        bridge(settings) as url,
        in_process_specialists(settings, "apollo") as services,
        httpx.AsyncClient(base_url=url) as http,
    ):
        monkeypatch.setattr(services["apollo"].provider, "stream", broken)
        answer = await http.post("/api/chat", json={"specialist": "apollo", "message": "x"})
        assert answer.status_code >= 500
    [http_span] = [s for s in spans.get_finished_spans() if s.name == "POST /api/chat"]
    assert http_span.attributes is not None
    assert http_span.attributes["http.response.status_code"] == answer.status_code
    assert http_span.status.status_code == StatusCode.ERROR


async def test_two_traceparent_headers_are_none(
    settings: TektonSettings, spans: InMemorySpanExporter
) -> None:
    """W3C trace context: a request with two ``traceparent`` headers has an invalid one; it is served
    in a trace of its own, continuing neither (the last one was taken, sampled out: not traced)."""
    first, last = "4bf92f3577b34da6a3ce929d0e0e4736", "5bf92f3577b34da6a3ce929d0e0e4736"
    async with (
        bridge(settings) as url,
        in_process_specialists(settings, "apollo"),
        httpx.AsyncClient(base_url=url) as http,
    ):
        headers = [
            ("traceparent", f"00-{first}-00f067aa0ba902b7-01"),
            ("traceparent", f"00-{last}-00f067aa0ba902b7-00"),
        ]
        answer = await http.post("/api/chat", json={"specialist": "apollo", "message": "x"}, headers=headers)
        assert answer.status_code == 200
        await eventually(lambda: "serve apollo" in {s.name for s in spans.get_finished_spans()})
    [http_span] = [s for s in spans.get_finished_spans() if s.name == "POST /api/chat"]
    assert http_span.parent is None and format(http_span.context.trace_id, "032x") not in (first, last)


async def test_mcp_on_the_bridge_acts_as_the_token_s_user(settings: TektonSettings) -> None:
    """MCP streamable HTTP at /mcp on the bridge, driven by the SDK's client over HTTP: an API token
    is its bus user there too (alice sees her sessions as resources, not bob's); no token, no MCP."""
    settings = settings.model_copy(update={"http_tokens": ["alice=alice-token", "bob=bob-token"]})
    async with bridge(settings) as url, in_process_specialists(settings, "apollo"):
        async with httpx.AsyncClient(base_url=url) as http:
            for user in ("alice", "bob"):
                made = await http.post(
                    "/api/sessions",
                    json={"name": f"{user}-notes", "specialist": "apollo"},
                    headers={"Authorization": f"Bearer {user}-token"},
                )
                assert made.status_code == 200 and made.json()["owner"] == user
            refused = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"

        progress: list[str | None] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(message)

        as_alice = httpx2.AsyncClient(headers={"Authorization": "Bearer alice-token"}, timeout=30)
        async with (
            as_alice,
            streamable_http_client(f"{url}/mcp", http_client=as_alice) as (read, write),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            assert [t.name for t in (await client.list_tools()).tools] == ["apollo"]
            said = await client.call_tool(
                "apollo", {"prompt": "mcp here", "session": "alice-notes"}, progress_callback=on_progress
            )
            assert said.content[0].text == "apollo heard: mcp here"  # type: ignore[union-attr]
            # The answer so far, as each chunk arrives (a burst of tokens comes in one chunk).
            assert progress[0] == "apollo " and progress[-1] == "apollo heard: mcp here"
            assert all(b.startswith(a) and b != a for a, b in itertools.pairwise(progress))  # type: ignore[union-attr]
            assert [r.name for r in (await client.list_resources()).resources] == ["alice-notes"]
            assert {p.name for p in (await client.list_prompts()).prompts} == {
                "apollo.review",
                "apollo.explain-error",
            }
