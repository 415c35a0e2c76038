"""The Anthropic Messages API, through the ``anthropic`` client.

``temperature`` is not sent: the current Messages API (anthropic 2.x) no longer takes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import anthropic
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.wire import ChatMessage, ChatOptions, Usage
from specialists.providers.base import ApiKeyMissing, ProviderContext, api_error


class AnthropicOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEKTON_ANTHROPIC_", extra="forbid")

    base_url: str | None = None
    api_key: SecretStr | None = None
    model: str = "claude-3-5-haiku-latest"
    timeout_s: float = Field(default=60.0, gt=0)
    # The Messages API requires max_tokens; used when a request brings none.
    default_max_tokens: int = Field(default=1024, ge=1)


class AnthropicProvider:
    name: ClassVar[str] = "anthropic"
    Options: ClassVar[type[BaseSettings]] = AnthropicOptions

    def __init__(self, options: AnthropicOptions, context: ProviderContext):
        if options.api_key is None:
            raise ApiKeyMissing(
                f"'{context.specialist}' uses Anthropic but no API key is set: set TEKTON_ANTHROPIC_API_KEY, "
                "or api_key under [providers.anthropic] in config.toml"
            )
        self.options = options
        self.model = options.model
        self._client = self.client(options)

    @staticmethod
    def client(options: AnthropicOptions) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=options.api_key.get_secret_value() if options.api_key else None,
            base_url=options.base_url,
            timeout=options.timeout_s,
            max_retries=0,
        )

    @classmethod
    async def list_models(cls, options: AnthropicOptions) -> list[str]:
        """The Models API's list."""
        if options.api_key is None:
            raise ApiKeyMissing("no API key: set TEKTON_ANTHROPIC_API_KEY or [providers.anthropic] api_key")
        client = cls.client(options)
        try:
            return sorted([m.id async for m in client.models.list()])
        except anthropic.APIError as err:
            raise api_error(anthropic, err, options.base_url or "the Anthropic API") from err
        finally:
            await client.close()

    async def stream(
        self, messages: Sequence[ChatMessage], options: ChatOptions
    ) -> AsyncIterator[str | Usage]:
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        kwargs: dict[str, Any] = {}
        if system:
            kwargs["system"] = system
        try:
            async with self._client.messages.stream(
                model=self.model,
                max_tokens=options.max_tokens or self.options.default_max_tokens,
                messages=[{"role": m.role, "content": m.content} for m in messages if m.role != "system"],  # type: ignore[misc]
                **kwargs,
            ) as stream:
                async for text in stream.text_stream:
                    if text:
                        yield text
                final = await stream.get_final_message()
                yield Usage(
                    prompt_tokens=final.usage.input_tokens, completion_tokens=final.usage.output_tokens
                )
        except anthropic.APIError as err:
            raise api_error(anthropic, err, self.options.base_url or "the Anthropic API", self.model) from err

    async def aclose(self) -> None:
        await self._client.close()
