"""The usage book: token totals per user and per session in a JetStream KV bucket (every change
compare-and-set, so gateway replicas sharing the work never lose a count), fed by the specialists'
usage records; who is over budget, told to every specialist; and the asker's totals on request.

Keys: ``u.<user>`` and ``s.<user>.<session id>``, each a msgpack :class:`~bus.usage.Totals`; for a
user whose budget has a period, also ``p.<period>.<user>`` (``p.2026-11-29.alice``): what the budget
counts. A new period's key starts empty, so the budget starts from zero; the broadcast purges the
keys of periods gone by.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime

import anyio
import nats.js.errors
import structlog
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from pydantic import ValidationError

from bus.errors import BadRequest, BusError, MalformedFrame, problems_line
from bus.logs import refused
from bus.runs import answerable
from bus.sessions import ErrorReply
from bus.subjects import ALL_USERS, gateway_queue, gateway_user
from bus.usage import (
    USAGE_BATCH_S,
    Budget,
    OverBudget,
    Totals,
    UsageQuery,
    UsageRecord,
    UsageReply,
    budget_subject,
    period_window,
    usage_query_subject,
    usage_subject,
)
from bus.wire import encode, unpack_frame
from gateway.store import existing_bucket

log = structlog.get_logger("tekton.usage")

# Specialists that start late, or missed a notice, hear who is over budget at least this often.
BROADCAST_S = 2.0
# Records are gathered this long before a batch is stored: one compare-and-set per key per batch, so
# a steady stream of answers costs nats-server one file-store write per key every COALESCE_S, not a
# KV read and write per answer. A query for totals stores what has arrived at once.
COALESCE_S = 0.1
# A query waits at most this long for the records that arrived before it to be stored (a bucket
# that does not answer must not hold the asker's reply).
SETTLE_MAX_S = 2.0
# The last totals and revision written per key, kept so a batch needs no KV read first (the
# compare-and-set still catches another replica's write or a reset); at most this many keys.
KNOWN_MAX = 10_000


def bucket_name(prefix: str) -> str:
    return f"{prefix.replace('.', '_')}_usage"


async def open_usage_bucket(nc: NATS, prefix: str, replicas: int = 1) -> KeyValue:
    js = nc.jetstream()
    name = bucket_name(prefix)
    found = await existing_bucket(js, name)
    if found is not None:
        return found
    config = KeyValueConfig(
        bucket=name, description="Tekton token usage", history=1, storage=StorageType.FILE, replicas=replicas
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:  # another replica created it at the same moment
        return await js.key_value(name)


class UsageBook:
    """``budget`` applies to every user; ``budgets`` per user, field by field over it (a user given
    only a cost keeps the default token budget)."""

    def __init__(
        self,
        nc: NATS,
        kv: KeyValue,
        prefix: str,
        budget: Budget | None = None,
        budgets: dict[str, Budget] | None = None,
    ):
        self.nc = nc
        self.kv = kv
        self.prefix = prefix
        self.budget = budget or Budget()
        self.budgets = budgets or {}
        self.limited = self.budget != Budget() or any(b != Budget() for b in self.budgets.values())
        self.periods = self.budget.period is not None or any(b.period for b in self.budgets.values())
        self.over: frozenset[str] = frozenset()
        self.resets: dict[str, float] = {}  # over users whose budget has a period: when it restarts
        # Records not stored yet, by key: while one batch is written the next gathers, so a burst of
        # answers costs one compare-and-set per key, not a KV read and write per answer.
        self._pending: dict[str, list[UsageRecord]] = {}
        self._arrived = anyio.Event()
        self._hurry = anyio.Event()  # a query waits: store now, not at the end of COALESCE_S
        self._storing = False
        self._stored = anyio.Event()  # set (and replaced) as each batch is stored
        self._batches_stored = 0
        self._known: OrderedDict[str, tuple[Totals, int]] = OrderedDict()

    def budget_for(self, user: str) -> Budget:
        own = self.budgets.get(user)
        if own is None:
            return self.budget
        return self.budget.model_copy(update={f: getattr(own, f) for f in own.model_fields_set})

    def budget_key(self, user: str) -> tuple[str, datetime | None]:
        """The key whose totals ``user``'s budget counts, and when it restarts (None: never)."""
        period = self.budget_for(user).period
        if period is None:
            return f"u.{user}", None
        name, resets = period_window(period, datetime.now(UTC))
        return f"p.{name}.{user}", resets

    async def start(self, tg: TaskGroup) -> None:
        queue = gateway_queue(self.prefix)
        tg.start_soon(self._store)
        await self.nc.subscribe(usage_subject("*", self.prefix), queue=queue, cb=self._on_record)
        await self.nc.subscribe(usage_query_subject(self.prefix), queue=queue, cb=self._on_query)
        if self.limited:
            tg.start_soon(self._broadcast)

    async def _read(self, key: str) -> tuple[Totals, int | None]:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return Totals(), None
        if entry.value is None:
            return Totals(), None
        return Totals.model_validate(unpack_frame(entry.value)), entry.revision

    async def _add(self, key: str, records: list[UsageRecord]) -> Totals:
        known = self._known.pop(key, None)
        while True:
            totals, revision = known if known is not None else await self._read(key)
            known = None
            added = totals
            for record in records:
                added = added.add(record)
            try:
                if revision is None:
                    revision = await self.kv.create(key, encode(added))
                else:
                    revision = await self.kv.update(key, encode(added), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another replica counted in between (or a reset): read again
            self._known[key] = (added, revision)
            if len(self._known) > KNOWN_MAX:
                self._known.popitem(last=False)
            return added

    async def _on_record(self, msg: Msg) -> None:
        user = msg.subject.rsplit(".", 1)[-1]
        try:
            raw = unpack_frame(msg.data)
        except BusError as err:
            log.warning("usage record not counted", user=user, error=str(err))
            return
        # A specialist sends its records a batch at a time (an array); one record alone is a map.
        for item in raw if isinstance(raw, list) else [raw]:
            try:
                record = UsageRecord.model_validate(item)
            except ValidationError as err:
                log.warning("usage record not counted", user=user, error=str(err))
                continue
            self._pending.setdefault(f"u.{user}", []).append(record)
            if self.periods and (key := self.budget_key(user)[0]) != f"u.{user}":
                self._pending.setdefault(key, []).append(record)
            if record.session:
                self._pending.setdefault(f"s.{user}.{record.session}", []).append(record)
        self._arrived.set()

    async def _store(self) -> None:
        """Adds the records that arrived to their keys, a batch at a time (see ``_pending``)."""
        while True:
            await self._arrived.wait()
            with anyio.move_on_after(COALESCE_S):
                await self._hurry.wait()
            self._arrived, self._hurry = anyio.Event(), anyio.Event()
            batch, self._pending = self._pending, {}
            self._storing = True
            try:
                await self._store_batch(batch)
            finally:
                self._storing = False
                self._batches_stored += 1
                stored, self._stored = self._stored, anyio.Event()
                stored.set()

    async def _store_batch(self, batch: dict[str, list[UsageRecord]]) -> None:
        for key, records in batch.items():
            try:
                total = await self._add(key, records)
            except Exception as err:  # the bucket is unreachable: these counts are lost, we go on
                log.warning("usage records not stored", key=key, records=len(records), error=str(err))
                continue
            if not self.limited or key.startswith("s."):
                continue
            user = key.rsplit(".", 1)[-1]
            counted, resets = self.budget_key(user)
            if key == counted and user not in self.over and self.budget_for(user).exceeded(total):
                self.over = self.over | {user}
                if resets is not None:
                    self.resets[user] = resets.timestamp()
                await self._tell()

    async def _settled(self) -> None:
        """The records of answers finished before now are stored, so a query right after an answer
        counts it: a specialist sends its records within ``USAGE_BATCH_S`` of an answer's end (this
        waits three of them for the batch to arrive), and what has arrived is stored at once."""
        await anyio.sleep(3 * USAGE_BATCH_S)
        # The batch being stored now, if any, and the one gathering what has arrived: no later one (on
        # a busy bus records keep arriving, and waiting until none is pending would never end).
        wanted = self._batches_stored + self._storing + bool(self._pending)
        with anyio.move_on_after(SETTLE_MAX_S):
            while self._batches_stored < wanted:
                self._hurry.set()
                await self._stored.wait()

    async def _tell(self) -> None:
        notice = OverBudget(
            users=sorted(self.over), resets={u: self.resets[u] for u in self.over & self.resets.keys()}
        )
        await self.nc.publish(budget_subject(self.prefix), encode(notice))

    async def _broadcast(self) -> None:
        """Who is over budget, from the bucket (other replicas count too, and a reset clears), to
        every specialist."""
        while True:
            over = set()
            resets = {}
            try:
                keys = await self.kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            counted = {key[2:]: self.budget_key(key[2:]) for key in keys if key.startswith("u.")}
            for user, (key, restarts) in counted.items():
                totals, _ = await self._read(key)
                if self.budget_for(user).exceeded(totals):
                    over.add(user)
                    if restarts is not None:
                        resets[user] = restarts.timestamp()
            self.over, self.resets = frozenset(over), resets
            await self._tell()
            for key in keys:  # periods gone by (their totals are in the lifetime's too)
                if key.startswith("p.") and counted.get(key.rsplit(".", 1)[-1], ("",))[0] != key:
                    try:
                        await self.kv.purge(key)
                    except Exception as err:  # tried again at the next broadcast
                        log.warning("old period's usage not purged", key=key, error=str(err))
            await anyio.sleep(BROADCAST_S)

    async def totals(self, user: str) -> UsageReply:
        await self._settled()
        total, _ = await self._read(f"u.{user}")
        sessions = {}
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        for key in keys:
            if key.startswith(f"s.{user}."):
                sessions[key.split(".", 2)[2]], _ = await self._read(key)
        budget = self.budget_for(user)
        reply = UsageReply(
            user=user, total=total, sessions=sessions, budget_tokens=budget.tokens, budget_cost=budget.cost
        )
        key, resets = self.budget_key(user)
        if resets is None:
            return reply
        period_total, _ = await self._read(key)
        return reply.model_copy(
            update={
                "budget_period": budget.period,
                "period_total": period_total,
                "period_resets": resets.timestamp(),
            }
        )

    async def _admin(self, query: UsageQuery) -> UsageReply:
        await self._settled()
        if query.reset is None:
            return UsageReply(user=ALL_USERS, total=Totals(), users=await all_totals(self.kv))
        removed = await reset_usage(self.kv, query.reset)
        for key in [k for k in self._known if _users_key(k, query.reset)]:
            del self._known[key]
        if query.reset in self.over:  # served again now, not at the next broadcast
            self.over = self.over - {query.reset}
            self.resets.pop(query.reset, None)
            await self._tell()
        return UsageReply(user=query.reset, total=Totals(), removed=removed)

    async def _on_query(self, msg: Msg) -> None:
        if not answerable(msg.reply or "", self.prefix):  # we may publish to $KV: answer only clients
            refused.warning(log, "usage query with a reply subject no client reads dropped")
            return
        user = gateway_user(msg.subject, self.prefix)
        try:  # the asker's mistake is said in the asker's code, in one line
            query = UsageQuery.model_validate(unpack_frame(msg.data))
        except (MalformedFrame, ValidationError) as err:
            said = err.message if isinstance(err, MalformedFrame) else problems_line(err, "the query")
            return await msg.respond(encode(ErrorReply.of(BadRequest(f"not a usage query: {said}"))))
        try:  # (a stored total this version cannot read is ours, not the asker's: internal)
            if user == ALL_USERS:  # only admins may use that name in gateway subjects (bus/auth.py)
                payload = encode(await self._admin(query))
            elif query.reset is not None:
                raise BadRequest("only an admin resets usage (tekton usage reset USER)")
            else:
                payload = encode(await self.totals(user))
        except BusError as err:
            payload = encode(ErrorReply.of(err))
        except ValidationError as err:
            log.error("stored usage unreadable", error=problems_line(err, "the totals"))
            payload = encode(
                ErrorReply.of(BusError("stored usage totals are unreadable (the gateway's log)"))
            )
        await msg.respond(payload)


async def reset_usage(kv: KeyValue, user: str) -> int:
    """Forget ``user``'s totals (and their sessions'): their budget starts again. The number of keys
    removed. Gateways stop refusing them at their next over-budget broadcast."""
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        keys = []
    gone = [k for k in keys if _users_key(k, user)]
    for key in gone:
        await kv.purge(key)
    return len(gone)


def _users_key(key: str, user: str) -> bool:
    """Whether ``key`` holds totals of ``user``: lifetime, a session's, or a period's."""
    return (
        key == f"u.{user}"
        or key.startswith(f"s.{user}.")
        or (key.startswith("p.") and key.endswith(f".{user}"))
    )


async def all_totals(kv: KeyValue) -> dict[str, Totals]:
    """Every user's totals in the book."""
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return {}
    totals = {}
    for key in keys:
        if key.startswith("u."):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                totals[key[2:]] = Totals.model_validate(unpack_frame(entry.value))
    return totals
