"""Any OpenAI-compatible chat server (OpenAI, Ollama, vLLM, llama.cpp server), via the ``openai`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import ClassVar, cast

import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.wire import ChatMessage, ChatOptions
from specialists.providers.base import ApiKeyMissing, ProviderContext, ProviderError, ProviderUnavailable


class OpenAIOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEKTON_OPENAI_", extra="forbid")

    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    model: str = "gpt-4o-mini"
    timeout_s: float = Field(default=60.0, gt=0)


class OpenAIProvider:
    name: ClassVar[str] = "openai"
    Options: ClassVar[type[BaseSettings]] = OpenAIOptions

    def __init__(self, options: OpenAIOptions, context: ProviderContext):
        if options.api_key is None:
            raise ApiKeyMissing(
                f"'{context.specialist}' uses an OpenAI-compatible server at {options.base_url} but no key "
                "is set: set TEKTON_OPENAI_API_KEY (servers that ignore keys, like Ollama, accept any value)"
            )
        self.options = options
        self.model = options.model
        self._client = openai.AsyncOpenAI(
            base_url=options.base_url,
            api_key=options.api_key.get_secret_value(),
            timeout=options.timeout_s,
            max_retries=0,
        )

    async def stream(self, messages: Sequence[ChatMessage], options: ChatOptions) -> AsyncIterator[str]:
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                messages=cast(
                    "list[ChatCompletionMessageParam]",
                    [{"role": m.role, "content": m.content} for m in messages],
                ),
                stream=True,
                max_tokens=options.max_tokens if options.max_tokens is not None else openai.omit,
                temperature=options.temperature if options.temperature is not None else openai.omit,
            )
            async with response:
                async for event in response:
                    if event.choices and (text := event.choices[0].delta.content):
                        yield text
        except openai.APIConnectionError as err:
            raise ProviderUnavailable(
                f"cannot reach the OpenAI-compatible server at {self.options.base_url}"
            ) from err
        except openai.AuthenticationError as err:
            raise ApiKeyMissing(
                f"the server at {self.options.base_url} refused the API key: {err.message}"
            ) from err
        except openai.APIStatusError as err:
            raise ProviderError(
                f"OpenAI-compatible server answered {err.status_code}: {err.message}"
            ) from err

    async def aclose(self) -> None:
        await self._client.close()
