"""An A2A agent elsewhere as a Tekton specialist, via the ``a2a-sdk`` client.

    [specialists.scout]
    provider = "a2a"
    provider_options = { url = "https://agents.example.com/scout/" }   # where its agent card is

A request in a Tekton session goes with a ``context_id`` of that session's (the same for every turn,
derived from the asker and the session, so the agent can keep the conversation): the first message
of a context this process sends carries the earlier turns as context lines before the question, the
next ones only the new question (the agent has the rest). A request outside a session is one message
with its earlier turns as context lines, and no context. The agent's streamed artifact chunks (or its
reply message) are the answer's chunks. A failed or rejected task is a ``provider_error`` with the
agent's own words.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

from a2a.client import ClientConfig, create_client
from a2a.helpers.proto_helpers import get_artifact_text, get_message_text
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from google.protobuf.json_format import MessageToDict
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.wire import A2A_USAGE_KEY, ChatMessage, ChatOptions, Usage
from specialists.providers.base import (
    ProviderContext,
    ProviderError,
    ProviderUnavailable,
    current_conversation,
)

_FAILED = {TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_REJECTED, TaskState.TASK_STATE_CANCELED}
# Contexts a provider remembers having sent a first message in (the oldest are forgotten first: a
# forgotten one's next message carries the earlier turns again).
KNOWN_CONTEXTS = 10_000
_NAMESPACE = uuid.UUID("5b0c1c1e-6f4b-4f43-9a3e-74656b746f6e")


def context_id(conversation: str) -> str:
    """The A2A context of a Tekton conversation (``owner/session``): a UUID that names it and tells
    the agent neither."""
    return str(uuid.uuid5(_NAMESPACE, conversation))


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
        self._contexts: OrderedDict[str, None] = OrderedDict()

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

    async def stream(
        self, messages: Sequence[ChatMessage], options: ChatOptions
    ) -> AsyncIterator[str | Usage]:
        client = await self._connect()
        message = Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex)
        conversation = current_conversation()
        if conversation is None:
            message.parts.append(Part(text=_prompt(messages)))
        else:
            message.context_id = context_id(conversation)
            known = message.context_id in self._contexts
            message.parts.append(Part(text=_prompt(messages[-1:] if known else messages)))
        request = SendMessageRequest(message=message)
        try:
            async for event in client.send_message(request):
                if event.HasField("artifact_update"):
                    artifact = event.artifact_update.artifact
                    if text := get_artifact_text(artifact, ""):
                        yield text
                    if A2A_USAGE_KEY in artifact.metadata and (usage := _usage(artifact.metadata)):
                        yield usage  # a Tekton agent's count (bridge/a2a.py)
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
        if message.context_id:  # the agent has this context's earlier turns now
            self._contexts[message.context_id] = None
            self._contexts.move_to_end(message.context_id)
            while len(self._contexts) > KNOWN_CONTEXTS:
                self._contexts.popitem(last=False)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _usage(metadata: Any) -> Usage | None:
    """The usage a Tekton agent put in its last artifact chunk, None when it does not parse (then each
    streamed piece counts as a token, as for any other agent). Struct numbers arrive as floats."""
    given = MessageToDict(metadata).get(A2A_USAGE_KEY)
    try:
        counts = {k: int(given[k]) for k in ("prompt_tokens", "completion_tokens") if k in given}
        cost = {"cost": float(given["cost"])} if "cost" in given else {}
        return Usage.model_validate({**counts, **cost})
    except (TypeError, ValueError, KeyError):
        return None
