"""Subject names: pure functions, one place. See docs/protocol.md."""

from __future__ import annotations

import re

from bus.frames import REQUEST_ID_RE

DEFAULT_PREFIX = "tekton"
NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
NAME_RE = re.compile(NAME_PATTERN)
# A specialist name, or `@capability` / `@auto` for the gateway to choose one.
TARGET_PATTERN = r"^@?[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
# A subject to publish replies to: dot-separated tokens, no wildcard (`*`, `>`), no whitespace.
REPLY_SUBJECT_PATTERN = r"^[^.*>\s]+(?:\.[^.*>\s]+)*$"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid specialist name (``[a-z0-9-]+``), else raise ValueError."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"invalid specialist name {name[:80]!r}: use lowercase letters, digits and '-' "
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


# The identity of a client that has no credentials (a server without auth lets anyone in).
ANONYMOUS = "anonymous"
# The user name of the gateway's credentials (tekton/users.py makes them): its bridge acts for callers.
GATEWAY_USER = "gateway"
# A user token only admins may publish under: the gateway answers it for every user's sessions.
ALL_USERS = "_all"
INBOX_ROOT = "_INBOX"


def inbox_prefix(user: str) -> str:
    """Where ``user``'s replies arrive; nats-server lets only that user subscribe under it."""
    return f"{INBOX_ROOT}.{user}"


def inbox_owner(reply: str) -> str:
    """The user whose private inbox ``reply`` is, or "" when it is not one."""
    parts = reply.split(".", 2)
    return parts[1] if len(parts) == 3 and parts[0] == INBOX_ROOT else ""


def cancel_subject(request_id: str, user: str = ANONYMOUS, prefix: str = DEFAULT_PREFIX) -> str:
    """Published by ``user`` to stop one of their requests (nats-server lets each user publish
    only under their own name, and the specialist checks the request is that user's)."""
    return f"{prefix}.cancel.{user}.{request_id}"


def cancel_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """What a specialist process subscribes to once to hear every cancel."""
    return f"{prefix}.cancel.*.*"


def cancel_parts(subject: str) -> tuple[str, str]:
    """``(user, request_id)`` of a cancel subject."""
    user, request_id = subject.rsplit(".", 2)[-2:]
    return user, request_id


def replay_subject(user: str, run_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Published by ``user`` (only under their own name, as cancels) to have the replica producing
    run ``run_id`` send its frames again to the request's reply subject (specialists/service.py)."""
    return f"{prefix}.replay.{user}.{run_id}"


def replay_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """What a specialist process subscribes to once to hear every replay request."""
    return f"{prefix}.replay.*.*"


SESSION_OPS = ("create", "get", "list", "delete", "fork", "rename", "chat", "settle")


# Gateway subjects carry the asking user's name as a token: nats-server's permissions let a user
# publish only under their own name, so the gateway knows who asks without trusting the payload.


def session_subject(op: str, prefix: str = DEFAULT_PREFIX, user: str = ANONYMOUS) -> str:
    """Where gateway replicas take one sessions-API operation of ``user`` (see docs/protocol.md);
    ``user="*"`` is the subject the gateway serves."""
    if op not in SESSION_OPS:
        raise ValueError(f"unknown session operation {op!r}")
    return f"{prefix}.gateway.{user}.session.{op}"


def bulk_subject(prefix: str = DEFAULT_PREFIX, user: str = ANONYMOUS) -> str:
    """Where gateway replicas take bulk requests."""
    return f"{prefix}.gateway.{user}.bulk"


def discover_subject(prefix: str = DEFAULT_PREFIX, user: str = ANONYMOUS) -> str:
    """Where gateway replicas answer discovery and routing questions."""
    return f"{prefix}.gateway.{user}.discover"


def gateway_user(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The user token of a gateway subject (which nats-server pinned to the publisher)."""
    return subject.split(".")[prefix.count(".") + 2]


def gateway_queue(prefix: str = DEFAULT_PREFIX) -> str:
    """The queue group gateway replicas share."""
    return f"{prefix}.gateway"


# Durable runs (bus/runs.py): a run's frames subject is its request's reply subject.
FRAMES = "f"
PROBE = "p"
# A user token as nats-server's config and our inbox prefixes allow it.
USER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def runs_stream_name(prefix: str) -> str:
    """The JetStream stream holding every run's frames under ``prefix``."""
    return prefix.replace(".", "_").replace("-", "_").upper() + "_RUNS"


def run_subject(user: str, run_id: str, prefix: str) -> str:
    """Where the frames of run ``run_id`` of ``user`` are published (the request's reply subject)."""
    if not USER_RE.match(user):
        raise ValueError(f"invalid user name {user!r}")
    if not REQUEST_ID_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: 1-64 characters of [A-Za-z0-9_-]")
    return f"{prefix}.run.{user}.{run_id}.{FRAMES}"


def run_listen_subject(frames_subject: str) -> str:
    """What a live listener subscribes to: the frames and the probes of one run."""
    return frames_subject[: -len(FRAMES)] + "*"


def runs_filter(prefix: str, user: str = "*") -> str:
    """Every run subject of ``user`` (or of everyone)."""
    return f"{prefix}.run.{user}.*.{FRAMES}"
