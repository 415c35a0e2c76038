"""The openai and anthropic providers against local HTTP servers speaking their real streaming formats."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bus.client import Bus
from bus.errors import SpecialistError
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions, Usage
from specialists.providers import (
    ApiKeyMissing,
    ProviderContext,
    ProviderUnavailable,
    SharedResources,
    create_provider,
)
from specialists.providers.base import ModelMissing, ProviderError
from tests.helpers import in_process_specialists

pytestmark = pytest.mark.anyio

WORDS = ["Queue ", "groups ", "share ", "work."]
SEEN = web.AppKey("seen", list)
NO_SUCH_MODEL = "no-such-model"


def _sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {body}\n\n".encode()


async def openai_chat(request: web.Request) -> web.StreamResponse:
    request.app[SEEN].append({"auth": request.headers.get("Authorization"), "body": await request.json()})
    if request.headers.get("Authorization") != "Bearer good-key":
        return web.json_response(
            {"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401
        )
    if (await request.json())["model"] == NO_SUCH_MODEL:
        return web.json_response({"error": {"message": "no such model", "type": "not_found"}}, status=404)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    await response.write(
        _sse(
            None,
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            },
        )
    )
    for word in WORDS:
        await response.write(
            _sse(None, {**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
        )
    await response.write(
        _sse(None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    )
    await response.write(_sse(None, "[DONE]"))
    return response


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    # Older clients send x-api-key, anthropic 2.x sends a bearer token: accept either, like the API.
    key = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
    request.app[SEEN].append({"auth": key, "body": await request.json()})
    if key != "good-key":
        return web.json_response(
            {"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}, status=401
        )
    if (await request.json())["model"] == NO_SUCH_MODEL:
        return web.json_response(
            {"type": "error", "error": {"type": "not_found_error", "message": "no such model"}}, status=404
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(
        _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-test",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 5, "output_tokens": 1},
                },
            },
        )
    )
    await response.write(
        _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
    )
    await response.write(_sse("ping", {"type": "ping"}))
    for word in WORDS:
        await response.write(
            _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
            )
        )
    await response.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    await response.write(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 4},
            },
        )
    )
    await response.write(_sse("message_stop", {"type": "message_stop"}))
    return response


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    app = web.Application()
    app[SEEN] = []
    app.router.add_post("/v1/chat/completions", openai_chat)
    app.router.add_post("/v1/messages", anthropic_messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", app[SEEN]
    finally:
        await runner.cleanup()


def _provider(name: str, **options: Any):  # type: ignore[no-untyped-def]
    return create_provider(name, options, ProviderContext("apollo", SharedResources()))


@pytest.mark.parametrize(
    ("name", "base_suffix", "auth"),
    [("openai", "/v1", "Bearer good-key"), ("anthropic", "", "good-key")],
)
async def test_provider_streams_text(http_server, name: str, base_suffix: str, auth: str) -> None:  # type: ignore[no-untyped-def]
    url, seen = http_server
    provider = _provider(name, base_url=url + base_suffix, api_key="good-key", model="test-model")
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="queues?")]
    try:
        chunks = [c async for c in provider.stream(messages, ChatOptions(max_tokens=20, temperature=0.5))]
    finally:
        await provider.aclose()
    assert [c for c in chunks if isinstance(c, str)] == WORDS
    if name == "anthropic":  # the API's own token counts close the stream
        assert chunks[-1] == Usage(prompt_tokens=5, completion_tokens=4)
    body = seen[0]["body"]
    assert seen[0]["auth"] == auth
    assert body["model"] == "test-model" and body["stream"] is True and body["max_tokens"] == 20
    if name == "anthropic":
        assert body["system"] == "be brief" and body["messages"] == [{"role": "user", "content": "queues?"}]
    else:
        assert body["messages"][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(("name", "base_suffix"), [("openai", "/v1"), ("anthropic", "")])
async def test_wrong_key_and_unreachable_server_are_clear(http_server, name: str, base_suffix: str) -> None:  # type: ignore[no-untyped-def]
    url, _ = http_server
    provider = _provider(name, base_url=url + base_suffix, api_key="wrong")
    unreachable = _provider(name, base_url="http://127.0.0.1:9" + base_suffix, api_key="k")
    try:
        with pytest.raises(ApiKeyMissing, match="refused the API key"):
            [c async for c in provider.stream([ChatMessage(role="user", content="x")], ChatOptions())]
        with pytest.raises(ProviderUnavailable, match="cannot reach"):
            [c async for c in unreachable.stream([ChatMessage(role="user", content="x")], ChatOptions())]
    finally:
        await provider.aclose()
        await unreachable.aclose()


@pytest.mark.parametrize(("name", "base_suffix"), [("openai", "/v1"), ("anthropic", "")])
async def test_both_sdks_errors_map_alike(http_server, name: str, base_suffix: str) -> None:  # type: ignore[no-untyped-def]
    """One mapping (specialists/providers/base.api_error) for both SDKs: a model the server lacks is
    ModelMissing, any other refusal a ProviderError naming the server and its status."""
    url, _ = http_server
    lacking = _provider(name, base_url=url + base_suffix, api_key="good-key", model=NO_SUCH_MODEL)
    nowhere = _provider(name, base_url=url + "/nowhere", api_key="good-key", model="m")
    try:
        with pytest.raises(ModelMissing, match=f"has no model '{NO_SUCH_MODEL}'") as missing:
            [c async for c in lacking.stream([ChatMessage(role="user", content="x")], ChatOptions())]
        assert url in str(missing.value)
        with pytest.raises(ProviderError, match=f"{url}/nowhere answered 404"):
            await type(nowhere).list_models(nowhere.options)
    finally:
        await lacking.aclose()
        await nowhere.aclose()


@pytest.mark.parametrize("name", ["openai", "anthropic"])
def test_missing_key(name: str) -> None:
    with pytest.raises(ApiKeyMissing, match="API_KEY"):
        _provider(name)


@pytest.mark.fast
def test_the_local_provider_refuses_a_tool_choice_its_format_has_not() -> None:
    with pytest.raises(ProviderError, match=r"(?s)invalid options: .*has no 'required': name the tool"):
        create_provider("local", {"tool_choice": "required"}, ProviderContext("apollo", SharedResources()))


def test_unknown_provider_lists_the_installed_ones() -> None:
    with pytest.raises(ProviderError, match="installed: a2a, anthropic, local, ollama, openai, scripted"):
        _provider("gpt-magic")


async def test_specialist_on_openai_provider_end_to_end(
    http_server,
    settings: TektonSettings,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    url, seen = http_server
    monkeypatch.setenv("TEKTON_OPENAI_BASE_URL", url + "/v1")
    monkeypatch.setenv("TEKTON_OPENAI_API_KEY", "good-key")
    openai_settings = settings.model_copy(update={"provider": "openai"})
    async with in_process_specialists(openai_settings, "athena"), Bus.connect(openai_settings) as bus:
        result = await bus.ask("athena", "what are queue groups?")
        assert result.text == "".join(WORDS)
        assert result.start.provider == "openai"
        # The persona system prompt goes first.
        assert seen[0]["body"]["messages"][0]["content"].startswith("You are Athena")
    # A provider failure mid-request is an error frame with its code, not a hang.
    monkeypatch.setenv("TEKTON_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    async with in_process_specialists(openai_settings, "athena"), Bus.connect(openai_settings) as bus:
        with pytest.raises(SpecialistError, match="cannot reach") as info:
            await bus.ask("athena", "x")
        assert info.value.code == "provider_unavailable" and info.value.retryable
