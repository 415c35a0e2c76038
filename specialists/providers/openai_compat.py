"""Any OpenAI-compatible chat server (OpenAI, Ollama, vLLM, llama.cpp server), via the ``openai`` client.

``ollama`` is the same provider with Ollama's defaults: the server at its usual local address
(``$OLLAMA_HOST`` or 127.0.0.1:11434) and no key. Only api.openai.com needs a key; a local server that
ignores keys gets none from the user.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, cast
from urllib.parse import urlparse

import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.wire import ChatMessage, ChatOptions, Usage
from specialists.providers.base import ApiKeyMissing, ModelMissing, ProviderContext, api_error

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
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                messages=cast(
                    "list[ChatCompletionMessageParam]",
                    [{"role": m.role, "content": m.content} for m in messages],
                ),
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=options.max_tokens if options.max_tokens is not None else openai.omit,
                temperature=options.temperature if options.temperature is not None else openai.omit,
                **extra,
            )
            async with response:
                async for event in response:
                    if event.choices and (text := event.choices[0].delta.content):
                        yield text
                    if event.usage is not None:  # the last event, when the server counts
                        yield Usage(
                            prompt_tokens=event.usage.prompt_tokens,
                            completion_tokens=event.usage.completion_tokens,
                        )
        except openai.APIError as err:
            where = f"the OpenAI-compatible server at {self.options.base_url}"
            raise api_error(openai, err, where, self.model) from err

    async def aclose(self) -> None:
        await self._client.close()


class OllamaProvider(OpenAIProvider):
    """An Ollama server through its OpenAI-compatible API: found at its usual address, no key."""

    name: ClassVar[str] = "ollama"
    Options: ClassVar[type[BaseSettings]] = OllamaOptions
