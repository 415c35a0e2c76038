"""Token usage: what each answer cost, reported by the specialist that served it; the totals the
gateway keeps per user and per session; and who is over budget.

- ``<prefix>.usage.<user>``: a specialist publishes a :class:`UsageRecord` per finished answer, a
  few at a time (a msgpack array of records, gathered for up to ``USAGE_BATCH_S``; a single record
  map is read too). ``<user>`` is the owner of the reply inbox, which nats-server pins to the asker.
- ``<prefix>.budget``: the gateway publishes :class:`OverBudget`, the users at or over their budget,
  whenever that changes and every few seconds; specialists refuse those users' requests.
- ``<prefix>.gateway.<user>.usage``: :class:`UsageQuery` -> :class:`UsageReply`, the asker's totals.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import msgpack
from pydantic import Field

from bus.subjects import DEFAULT_PREFIX
from bus.wire import PROTOCOL_VERSION, Wire

# The header a gateway puts on a session chat it forwards, so the specialist's record names the session.
SESSION_HEADER = "Tekton-Session"
# A specialist gathers a user's usage records this long and publishes them in one message: under load
# that is one message (and one wake-up of a gateway) per user per batch, not one per answer.
USAGE_BATCH_S = 0.05


def usage_subject(user: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.usage.{user}"


def budget_subject(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.budget"


def usage_query_subject(prefix: str = DEFAULT_PREFIX, user: str = "*") -> str:
    return f"{prefix}.gateway.{user}.usage"


class Price(Wire):
    """What a model's tokens cost, in USD per million (config: ``[prices."openai:gpt-4o-mini"]``)."""

    input: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return round((prompt_tokens * self.input + completion_tokens * self.output) / 1e6, 8)


def price_of(prices: dict[str, Price], provider: str, model: str) -> Price | None:
    """The price of ``provider:model`` in the table (or of ``provider`` alone, any model); None: the
    table does not price it."""
    return prices.get(f"{provider}:{model}") or prices.get(provider)


Period = Literal["day", "week", "month"]


def period_window(period: Period, now: datetime) -> tuple[str, datetime]:
    """The UTC day, ISO week (from Monday) or month ``now`` falls in: its name (a KV key token:
    ``2026-11-29``, ``2026-W48``, ``2026-11``) and when the next one starts."""
    now = now.astimezone(UTC)
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    if period == "day":
        return day.strftime("%Y-%m-%d"), day + timedelta(days=1)
    if period == "week":
        year, week, weekday = now.isocalendar()
        return f"{year}-W{week:02d}", day + timedelta(days=8 - weekday)
    following = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return day.strftime("%Y-%m"), following


def utc_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M UTC")


def over_budget(user: str, resets: float | None) -> str:
    """The refusal's words."""
    if resets is None:
        return f"user '{user}' is over their budget (aish usage shows it)"
    return f"user '{user}' is over their budget until it resets at {utc_time(resets)} (aish usage shows it)"


class Budget(Wire):
    """What one user may spend: tokens (prompt + completion), USD, or both (None: no limit); over
    their whole use, or (``period``) each UTC day, week or month, starting from zero at the next."""

    tokens: int | None = Field(default=None, ge=1)
    cost: float | None = Field(default=None, gt=0)
    period: Period | None = None

    def exceeded(self, totals: Totals) -> bool:
        return (self.tokens is not None and totals.tokens >= self.tokens) or (
            self.cost is not None and totals.cost >= self.cost
        )


class UsageRecord(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    request_id: str
    specialist: str
    session: str | None = None
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    # What the answer cost (USD) where the config's price table, or the roster's cost_per_1k_tokens,
    # prices the model; else 0.
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


def pack_records(records: list[bytes]) -> bytes:
    """Records from :func:`encode_usage` as one msgpack array (what ``msgpack.packb(list)`` makes of
    them), for one usage message."""
    n = len(records)
    head = (
        bytes([0x90 | n])
        if n < 16
        else b"\xdc" + n.to_bytes(2, "big")
        if n < 1 << 16
        else b"\xdd" + n.to_bytes(4, "big")
    )
    return head + b"".join(records)


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
            cost=round(self.cost + record.cost, 8),
        )


class OverBudget(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    users: list[str] = []
    # For users whose budget has a period: when it starts again (Unix time).
    resets: dict[str, float] = {}


class UsageQuery(Wire):
    """The asker's totals; sent as the admin-only ``_all`` user (``<prefix>.gateway._all.usage``):
    every user's totals, or with ``reset`` that user's totals forgotten (their budget starts again)."""

    v: Literal[1] = PROTOCOL_VERSION
    reset: str | None = None


class UsageReply(Wire):
    type: Literal["usage"] = "usage"
    user: str
    total: Totals
    sessions: dict[str, Totals] = {}
    budget_tokens: int | None = None
    budget_cost: float | None = None
    # A budget per period: which (day, week, month), what was spent in the current one (the budget
    # counts that, ``total`` stays the lifetime's), and when the next starts (Unix time).
    budget_period: Period | None = None
    period_total: Totals | None = None
    period_resets: float | None = None
    # For an admin's query: every user's totals; or, after a reset, how many totals were removed.
    users: dict[str, Totals] = {}
    removed: int | None = None
