"""Token usage: what each answer cost, reported by the specialist that served it; the totals the
gateway keeps per user and per session; and who is over budget.

- ``<prefix>.usage.<user>``: a specialist publishes one :class:`UsageRecord` per finished answer
  (``<user>`` is the owner of the reply inbox, which nats-server pins to the asker).
- ``<prefix>.budget``: the gateway publishes :class:`OverBudget`, the users at or over their budget,
  whenever that changes and every few seconds; specialists refuse those users' requests.
- ``<prefix>.gateway.<user>.usage``: :class:`UsageQuery` -> :class:`UsageReply`, the asker's totals.
"""

from __future__ import annotations

from typing import Literal

import msgpack
from pydantic import Field

from bus.subjects import DEFAULT_PREFIX
from bus.wire import PROTOCOL_VERSION, Wire

# The header a gateway puts on a session chat it forwards, so the specialist's record names the session.
SESSION_HEADER = "Tekton-Session"


def usage_subject(user: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.usage.{user}"


def budget_subject(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.budget"


def usage_query_subject(prefix: str = DEFAULT_PREFIX, user: str = "*") -> str:
    return f"{prefix}.gateway.{user}.usage"


class UsageRecord(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    request_id: str
    specialist: str
    session: str | None = None
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    # What the answer cost where the roster prices the specialist (cost_per_1k_tokens), else 0.
    cost: float = Field(default=0.0, ge=0)


def encode_usage(
    request_id: str,
    specialist: str,
    session: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    cost: float,
) -> bytes:
    """A :class:`UsageRecord` as ``encode`` would make it, without building the model: one per answer,
    from values the specialist already validated (same bytes, tested)."""
    record: dict[str, object] = {"v": PROTOCOL_VERSION, "request_id": request_id, "specialist": specialist}
    if session is not None:
        record["session"] = session
    record.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost)
    data: bytes = msgpack.packb(record)
    return data


class Totals(Wire):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, record: UsageRecord) -> Totals:
        return Totals(
            requests=self.requests + 1,
            prompt_tokens=self.prompt_tokens + record.prompt_tokens,
            completion_tokens=self.completion_tokens + record.completion_tokens,
            cost=round(self.cost + record.cost, 6),
        )


class OverBudget(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    users: list[str] = []


class UsageQuery(Wire):
    v: Literal[1] = PROTOCOL_VERSION


class UsageReply(Wire):
    type: Literal["usage"] = "usage"
    user: str
    total: Totals
    sessions: dict[str, Totals] = {}
    budget_tokens: int | None = None
