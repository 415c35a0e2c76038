"""The Tekton bus contract: subjects, wire models, codec, errors, and the small client helpers.

The names below load on first use: a process that needs only ``bus.subjects`` or ``bus.lite`` (a
one-shot `aish`) does not pay for nats-py and pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.client import Bus, ChatStream, ServiceInstance, StreamResult, connect
    from bus.errors import BusError, ErrorCode, SpecialistUnavailable
    from bus.settings import TektonSettings, load_settings
    from bus.wire import ChatMessage, ChatOptions, ChatRequest

_WHERE = {
    "Bus": "bus.client",
    "ChatStream": "bus.client",
    "ServiceInstance": "bus.client",
    "StreamResult": "bus.client",
    "connect": "bus.client",
    "BusError": "bus.errors",
    "ErrorCode": "bus.errors",
    "SpecialistUnavailable": "bus.errors",
    "TektonSettings": "bus.settings",
    "load_settings": "bus.settings",
    "ChatMessage": "bus.wire",
    "ChatOptions": "bus.wire",
    "ChatRequest": "bus.wire",
}

__all__ = [
    "Bus",
    "BusError",
    "ChatMessage",
    "ChatOptions",
    "ChatRequest",
    "ChatStream",
    "ErrorCode",
    "ServiceInstance",
    "SpecialistUnavailable",
    "StreamResult",
    "TektonSettings",
    "connect",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bus' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
