"""The Tekton bus contract: subjects, wire models, codec, errors, and the small client helpers."""

from bus.client import Bus, ChatStream, ServiceInstance, StreamResult, connect
from bus.errors import BusError, ErrorCode, SpecialistUnavailable
from bus.settings import TektonSettings, load_settings
from bus.wire import ChatMessage, ChatOptions, ChatRequest

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
