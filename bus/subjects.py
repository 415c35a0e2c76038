"""Subject names: pure functions, one place. See docs/protocol.md."""

from __future__ import annotations

import re

DEFAULT_PREFIX = "tekton"
NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
NAME_RE = re.compile(NAME_PATTERN)
# A specialist name, or `@capability` / `@auto` for the gateway to choose one.
TARGET_PATTERN = r"^@?[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid specialist name (``[a-z0-9-]+``), else raise ValueError."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"invalid specialist name {name!r}: use lowercase letters, digits and '-' "
            "(not at the start or end), at most 64 characters"
        )
    return name


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"invalid subject prefix {prefix!r}")
    return prefix


def chat_subject(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where every replica of specialist ``name`` takes chat requests."""
    return f"{prefix}.ai.{validate_name(name)}.chat"


def queue_group(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The queue group replicas of ``name`` share, so each request reaches exactly one of them."""
    return f"{prefix}.ai.{validate_name(name)}"


def cancel_subject(request_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Published by a client to stop generation of one request."""
    return f"{prefix}.cancel.{request_id}"


def cancel_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """What a specialist process subscribes to once to hear every cancel."""
    return f"{prefix}.cancel.*"


SESSION_OPS = ("create", "get", "list", "delete", "fork", "rename", "chat", "settle")


def session_subject(op: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where gateway replicas take one sessions-API operation (see docs/protocol.md)."""
    if op not in SESSION_OPS:
        raise ValueError(f"unknown session operation {op!r}")
    return f"{prefix}.gateway.session.{op}"


def bulk_subject(prefix: str = DEFAULT_PREFIX) -> str:
    """Where gateway replicas take bulk requests."""
    return f"{prefix}.gateway.bulk"


def discover_subject(prefix: str = DEFAULT_PREFIX) -> str:
    """Where gateway replicas answer discovery and routing questions."""
    return f"{prefix}.gateway.discover"


def gateway_queue(prefix: str = DEFAULT_PREFIX) -> str:
    """The queue group gateway replicas share."""
    return f"{prefix}.gateway"
