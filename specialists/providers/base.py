"""The one extension point for models: a provider streams text for a list of chat messages.

A provider class has a ``name``, its own pydantic ``Options`` (settings with their own env prefix,
filled from the roster's ``provider_options``), and ``async def stream(messages, options)`` yielding
text. Construction checks what it needs (model file, API key) and raises a :class:`ProviderError`
a user can act on. Providers are found by name through the ``tekton.providers`` entry points.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, ClassVar, Protocol

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from bus.errors import BusError, ErrorCode
from bus.wire import ChatMessage, ChatOptions, Usage


class ProviderError(BusError):
    code = ErrorCode.PROVIDER_ERROR


class ModelMissing(ProviderError):
    code = ErrorCode.MODEL_MISSING


class ApiKeyMissing(ProviderError):
    code = ErrorCode.API_KEY_MISSING


class ProviderUnavailable(ProviderError):
    code = ErrorCode.PROVIDER_UNAVAILABLE
    retryable = True


def api_error(sdk: ModuleType, err: Exception, where: str, model: str | None = None) -> ProviderError:
    """The error to raise for an exception of the openai or anthropic SDK (both have the same error
    classes): ``where`` names the server, ``model`` the model asked for (a 404 then means it has none)."""
    message = getattr(err, "message", str(err))
    if isinstance(err, sdk.APIConnectionError):
        return ProviderUnavailable(f"cannot reach {where}")
    if isinstance(err, sdk.AuthenticationError):
        return ApiKeyMissing(f"{where} refused the API key: {message}")
    if model is not None and isinstance(err, sdk.NotFoundError):
        return ModelMissing(f"{where} has no model {model!r} ({message}); `tekton models` lists what it has")
    if isinstance(err, sdk.APIStatusError):
        return ProviderError(f"{where} answered {err.status_code}: {message}")
    return ProviderError(f"{where}: {message}")


@dataclass
class SharedResources:
    """What the specialists of one process share, e.g. a loaded model (loaded once, used by all)."""

    models: dict[Any, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class ProviderContext:
    specialist: str
    shared: SharedResources


class Provider(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type[BaseSettings]]
    model: str

    # Text as it comes; a provider that knows its token counts may end with one ``Usage`` (the
    # prompt's tokens, the answer's), else the answer is counted in chunks.
    def stream(self, messages: Sequence[ChatMessage], options: ChatOptions) -> AsyncIterator[str | Usage]: ...

    async def aclose(self) -> None: ...


_CONVERSATION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tekton_conversation", default=None
)


def bind_conversation(owner: str, session: str | None) -> None:
    """Name the conversation the request being served in this task belongs to: its asker's session
    (the gateway says which), or none (a request on its own)."""
    _CONVERSATION.set(f"{owner}/{session}" if session else None)


def current_conversation() -> str | None:
    """``owner/session`` of the request being served (None: not part of a session), for providers
    whose model keeps a conversation of its own (the a2a provider's context_id). The owner is the
    asker nats-server pins to the reply inbox, so no one reaches another user's conversation by
    naming their session."""
    return _CONVERSATION.get()


def provider_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="tekton.providers"))


def provider_class(name: str) -> Any:
    for ep in entry_points(group="tekton.providers", name=name):
        return ep.load()
    raise ProviderError(f"unknown provider {name!r}; installed: {', '.join(provider_names())}")


def create_provider(name: str, raw_options: dict[str, Any], context: ProviderContext) -> Provider:
    cls = provider_class(name)
    try:
        options = cls.Options(**raw_options)
    except ValidationError as err:
        raise ProviderError(f"provider {name!r}: invalid options: {err}") from err
    provider: Provider = cls(options, context)
    return provider
