"""Any OpenAI-compatible chat server (OpenAI, Ollama, vLLM, llama.cpp server), via the ``openai`` client.

``ollama`` is the same provider with Ollama's defaults: the server at its usual local address
(``$OLLAMA_HOST`` or 127.0.0.1:11434) and no key. Only api.openai.com needs a key; a local server that
ignores keys gets none from the user.

Tools: when the specialist has MCP servers (roster ``mcp_servers``), their tools are offered to the
model through the OpenAI tools API; each tool call the model makes is run (a ``tool_call`` and a
``tool_result`` frame in the stream) and its result sent back, until the model answers in text (at
most ``max_tool_rounds`` rounds of calls; the round after the last offers no tools, so it answers).
The text of every round streams as it comes. A server that cannot stream a tool choice
(llama-cpp-python's ``chatml-function-calling``) takes ``stream_tools = false``: rounds that offer
tools are then asked without streaming, so their text arrives in one piece.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any, ClassVar, cast
from urllib.parse import urlparse

import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.wire import ChatMessage, ChatOptions, Usage
from specialists.providers.base import (
    ApiKeyMissing,
    ModelMissing,
    ProviderContext,
    api_error,
)
from specialists.providers.tool_loop import tool_rounds
from specialists.tools import current as current_tools

OPENAI_API = "https://api.openai.com/v1"
# What the client sends to servers that ignore keys (it insists on one).
NO_KEY = "not-needed"


def needs_key(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "").endswith("openai.com")


class OpenAIOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEKTON_OPENAI_", extra="forbid")

    base_url: str = OPENAI_API
    api_key: SecretStr | None = None
    model: str | None = "gpt-4o-mini"
    timeout_s: float = Field(default=60.0, gt=0)
    # Stream the rounds that offer the model tools (see the module's docstring).
    stream_tools: bool = True
    # The first round's tool_choice: "auto", "required", "none", or a tool's name (server__tool) the
    # model must call first (a specialist that always looks something up); later rounds are "auto".
    tool_choice: str = "auto"
    # Rounds of tool calls one answer may take (a small model may call the same tool again and again).
    max_tool_rounds: int = Field(default=8, ge=0)


def _ollama_url() -> str:
    """Ollama's own convention: ``OLLAMA_HOST`` (``host:port`` or a URL), else 127.0.0.1:11434."""
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
    if "://" not in host:
        host = "http://" + host
    if host.startswith("http://0.0.0.0"):  # where the server listens, not where to connect
        host = host.replace("0.0.0.0", "127.0.0.1", 1)
    return host.rstrip("/") + "/v1"


class OllamaOptions(OpenAIOptions):
    model_config = SettingsConfigDict(env_prefix="TEKTON_OLLAMA_", extra="forbid")

    base_url: str = Field(default_factory=_ollama_url)
    model: str | None = None


class OpenAIProvider:
    name: ClassVar[str] = "openai"
    Options: ClassVar[type[BaseSettings]] = OpenAIOptions

    def __init__(self, options: OpenAIOptions, context: ProviderContext):
        if options.api_key is None and needs_key(options.base_url):
            raise ApiKeyMissing(
                f"'{context.specialist}' uses the OpenAI API at {options.base_url} but no key is set: set "
                "TEKTON_OPENAI_API_KEY, or api_key under [providers.openai] in config.toml"
            )
        if not options.model:
            raise ModelMissing(
                f"'{context.specialist}' uses {self.name} at {options.base_url} with no model: name one "
                f"with -m {self.name}:MODEL (`tekton models` lists them)"
            )
        self.options = options
        self.model = options.model
        self._client = self.client(options)

    @staticmethod
    def client(options: OpenAIOptions) -> openai.AsyncOpenAI:
        key = options.api_key.get_secret_value() if options.api_key else NO_KEY
        return openai.AsyncOpenAI(
            base_url=options.base_url, api_key=key, timeout=options.timeout_s, max_retries=0
        )

    @classmethod
    async def list_models(cls, options: OpenAIOptions) -> list[str]:
        """The server's ``GET /models``."""
        if options.api_key is None and needs_key(options.base_url):
            raise ApiKeyMissing("no API key: set TEKTON_OPENAI_API_KEY or [providers.openai] api_key")
        client = cls.client(options)
        try:
            return sorted([m.id async for m in client.models.list()])
        except openai.APIError as err:
            raise api_error(openai, err, options.base_url) from err
        finally:
            await client.close()

    async def stream(
        self, messages: Sequence[ChatMessage], options: ChatOptions
    ) -> AsyncIterator[str | Usage]:
        extra: dict[str, Any] = {}
        if options.top_p is not None:
            extra["top_p"] = options.top_p
        if options.seed is not None:
            extra["seed"] = options.seed
        extra["max_tokens"] = options.max_tokens if options.max_tokens is not None else openai.omit
        extra["temperature"] = options.temperature if options.temperature is not None else openai.omit
        convo: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        try:
            async for piece in tool_rounds(
                partial(self._round, extra=extra),
                convo,
                current_tools(),
                tool_choice=self.options.tool_choice,
                max_rounds=self.options.max_tool_rounds,
            ):
                yield piece
        except openai.APIError as err:
            where = f"the OpenAI-compatible server at {self.options.base_url}"
            raise api_error(openai, err, where, self.model) from err

    async def _round(
        self,
        convo: list[dict[str, Any]],
        offer: list[dict[str, Any]],
        choice: Any,
        calls: dict[int, dict[str, str]],
        text: list[str],
        *,
        extra: dict[str, Any],
    ) -> AsyncIterator[str | Usage]:
        """One round (tool_loop.Round): its text as it comes, its tool calls, the server's count."""
        messages = cast("list[ChatCompletionMessageParam]", convo)
        tools: Any = offer or openai.omit
        extra = extra | {"tool_choice": openai.omit if choice is None else choice}
        if offer and not self.options.stream_tools:
            done = await self._client.chat.completions.create(
                model=self.model, messages=messages, tools=tools, stream=False, **extra
            )
            message = done.choices[0].message
            if message.content:
                text.append(message.content)
                yield message.content
            for i, call in enumerate(message.tool_calls or []):
                if call.type == "function":
                    calls[i] = {
                        "id": call.id,
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    }
            if done.usage is not None:
                yield Usage(
                    prompt_tokens=done.usage.prompt_tokens, completion_tokens=done.usage.completion_tokens
                )
            return
        response = await self._client.chat.completions.create(
            model=self.model,
            messages=messages,
            tools=tools,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        async with response:
            async for event in response:
                if event.choices:
                    delta = event.choices[0].delta
                    if delta.content:
                        text.append(delta.content)
                        yield delta.content
                    for call in delta.tool_calls or []:  # a call's parts come spread over events
                        slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                        slot["id"] = call.id or slot["id"]
                        if call.function is not None:
                            slot["name"] += call.function.name or ""
                            slot["arguments"] += call.function.arguments or ""
                if event.usage is not None:  # the last event, when the server counts
                    yield Usage(
                        prompt_tokens=event.usage.prompt_tokens,
                        completion_tokens=event.usage.completion_tokens,
                    )

    async def aclose(self) -> None:
        await self._client.close()


class OllamaProvider(OpenAIProvider):
    """An Ollama server through its OpenAI-compatible API: found at its usual address, no key."""

    name: ClassVar[str] = "ollama"
    Options: ClassVar[type[BaseSettings]] = OllamaOptions
