"""An A2A agent elsewhere as a Tekton specialist, via the ``a2a-sdk`` client.

    [specialists.scout]
    provider = "a2a"
    provider_options = { url = "https://agents.example.com/scout/" }   # where its agent card is

The conversation goes as one A2A message (the last user message; earlier turns as context lines
before it); the agent's streamed artifact chunks (or its reply message) are the answer's chunks. A
failed or rejected task is a ``provider_error`` with the agent's own words.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

from a2a.client import ClientConfig, create_client
from a2a.helpers.proto_helpers import get_artifact_text, get_message_text
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.wire import ChatMessage, ChatOptions
from specialists.providers.base import ProviderContext, ProviderError, ProviderUnavailable

_FAILED = {TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_REJECTED, TaskState.TASK_STATE_CANCELED}


class A2AOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEKTON_A2A_", extra="forbid")

    url: str = Field(min_length=1)
    timeout_s: float = Field(default=120.0, gt=0)


def _prompt(messages: Sequence[ChatMessage]) -> str:
    """One message for the agent: earlier turns as context, then the question (system prompts stay
    here: the remote agent has its own)."""
    turns = [m for m in messages if m.role != "system"]
    if len(turns) <= 1:
        return turns[-1].content if turns else ""
    context = "\n".join(f"{m.role}: {m.content}" for m in turns[:-1])
    return f"{context}\n\n{turns[-1].content}"


class A2AProvider:
    name: ClassVar[str] = "a2a"
    Options: ClassVar[type[BaseSettings]] = A2AOptions

    def __init__(self, options: A2AOptions, context: ProviderContext):
        self.options = options
        self.specialist = context.specialist
        self.model = options.url
        self._client: Any = None

    async def _connect(self) -> Any:
        if self._client is None:
            try:
                self._client = await create_client(
                    self.options.url, client_config=ClientConfig(streaming=True)
                )
            except Exception as err:
                problem = f"{type(err).__name__}: {err}"
                raise ProviderUnavailable(
                    f"'{self.specialist}': no A2A agent card at {self.options.url} ({problem})"
                ) from err
        return self._client

    async def stream(self, messages: Sequence[ChatMessage], options: ChatOptions) -> AsyncIterator[str]:
        client = await self._connect()
        request = SendMessageRequest(
            message=Message(
                role=Role.ROLE_USER, parts=[Part(text=_prompt(messages))], message_id=uuid.uuid4().hex
            )
        )
        try:
            async for event in client.send_message(request):
                if event.HasField("artifact_update"):
                    if text := get_artifact_text(event.artifact_update.artifact, ""):
                        yield text
                elif event.HasField("message"):
                    if text := get_message_text(event.message, ""):
                        yield text
                elif event.HasField("status_update") and event.status_update.status.state in _FAILED:
                    said = get_message_text(event.status_update.status.message, " ")
                    raise ProviderError(
                        f"the A2A agent at {self.options.url} failed: {said or 'no reason given'}"
                    )
        except ProviderError:
            raise
        except Exception as err:
            raise ProviderUnavailable(
                f"the A2A agent at {self.options.url}: {type(err).__name__}: {err}"
            ) from err

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
