"""Sessions in a JetStream key-value bucket, every change compare-and-set.

Keys: ``s.<id>`` the session; ``i.<id>`` its summary (small, rewritten with every change, what listing
reads); ``n.o<hex of owner>.<hex of name>`` the id of the session holding that name, created atomically
(``kv.create``), so a name is resolved with two direct gets and two first uses of a name make one
session. Names belong to their owner (the user who made the session): two users may both have a
"work". The bucket has file storage, a TTL (a key expires that long after its last change) and a
little history.
"""

from __future__ import annotations

import itertools
import random
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import anyio
import msgpack
import nats.errors
import nats.js.errors
import structlog
from anyio.abc import TaskGroup
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from pydantic import ValidationError

from bus.errors import BadRequest, BusError, GatewayUnavailable, SessionNotFound, SessionTooLarge
from bus.sessions import SESSION_ID_RE, Session, SessionSummary
from gateway.journal import TurnJournal, merge_turns

log = structlog.get_logger("tekton.gateway.store")

ID_PREFIX_RE = re.compile(r"^[0-9a-f]{6,31}$")

# A compare-and-set loses only to another writer of the same session, which then has made progress;
# with backoff every writer gets through. Past this, something is wrong: say so.
CAS_PATIENCE_S = 10.0

# A KV write is a JetStream publish with headers (the expected last sequence, and trace context or a
# message TTL where used). nats-server counts them against max_payload, and answers a publish over it
# by closing the connection: stored values stay this far under max_payload.
KV_HEADROOM = 4096

# A caller that may go on before its write is stored (a session turn: its answer is core NATS) waits this
# long for it, then the write finishes behind it. On a cluster that lost the sessions bucket's leader the
# replicas elect another after nats-server's Raft election timeout (a random 4-9 s, fixed in the server,
# not configurable): nobody should wait for that before the answer starts.
WRITE_BEHIND_AFTER_S = 0.25
# A read nobody answers (a node just died or restarted) is tried again for this long.
READ_PATIENCE_S = 3.0
# A gateway starting while the bucket elects a leader waits this long for it.
BUCKET_PATIENCE_S = 30.0
# A write behind keeps trying this long for a leader (elections, a cluster regaining its quorum).
BEHIND_PATIENCE_S = 120.0


def value_limit(max_payload: int, wanted: int) -> int:
    """The largest session value the store writes on a server with ``max_payload``."""
    return min(wanted, max_payload - KV_HEADROOM)


@dataclass(frozen=True)
class StoreLimits:
    ttl_s: float
    max_turns: int
    max_bytes: int  # of one stored session value: see value_limit()
    replicas: int = 1


# A watcher's consumer goes this long after its reader stopped (nats-py's default is 5 minutes, and
# nats-server keeps at most 1,000 consumers on a stream: a list a second would reach it).
WATCH_GONE_S = 5.0
# A list waits this long for the summaries at most.
LIST_PATIENCE_S = 10.0


async def current_entries(kv: KeyValue, pattern: str) -> list[KeyValue.Entry]:
    """The live entries (values, not deletes) of the keys matching ``pattern``, as stored now, by one
    ephemeral ordered consumer (gone ``WATCH_GONE_S`` after). Reads on past nats-py's early "nothing
    more" marker, which it puts first when the server had sent everything before nats-py's own check
    though none of it was read yet (a busy gateway listed no sessions so): only a consumer given
    nothing ends there."""
    watcher = await kv.watch(pattern, inactive_threshold=WATCH_GONE_S)
    found: list[KeyValue.Entry] = []
    try:
        with anyio.move_on_after(LIST_PATIENCE_S) as patience:
            async for entry in watcher:
                if entry is None:
                    sub = watcher._sub
                    if sub is None or (await sub.consumer_info()).delivered.consumer_seq == 0:
                        break
                    continue
                if entry.operation is None and entry.value is not None:
                    found.append(entry)
                if entry.delta == 0:  # deletes come too, so the last entry says where the end is
                    break
        if patience.cancelled_caught:
            log.warning("KV read cut short", pattern=pattern, read=len(found), after_s=LIST_PATIENCE_S)
    finally:
        await watcher.stop()
    return found


def bucket_name(prefix: str) -> str:
    return f"{prefix.replace('.', '_')}_sessions"


async def existing_bucket(js: JetStreamContext, name: str) -> KeyValue | None:
    """The bucket ``name`` if it exists; a gateway starting while it elects a leader waits for one."""
    deadline = time.monotonic() + BUCKET_PATIENCE_S
    while True:
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return None
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.ServiceUnavailableError,
        ):
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.2)


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """A KV bucket, created with ``config`` if missing. An existing bucket keeps its own settings."""
    found = await existing_bucket(js, config.bucket)
    if found is not None:
        return found
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:  # another replica created it at the same moment
        return await js.key_value(config.bucket)


async def open_bucket(js: JetStreamContext, prefix: str, limits: StoreLimits) -> KeyValue:
    """The sessions bucket, created if missing. An existing bucket takes the configured TTL; its other
    settings stay as they are."""
    name = bucket_name(prefix)
    found = await existing_bucket(js, name)
    if found is not None:
        try:
            await _keep_ttl(js, name, limits.ttl_s)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as err:
            # A bucket still electing its leader: serve now, the TTL is updated at the next start.
            log.warning("sessions bucket TTL not updated", bucket=name, error=str(err) or type(err).__name__)
        return found
    config = KeyValueConfig(
        bucket=name,
        description="Tekton conversation sessions",
        history=5,
        ttl=limits.ttl_s,
        max_value_size=limits.max_bytes,
        storage=StorageType.FILE,
        direct=True,
        replicas=limits.replicas,
    )
    return await ensure_bucket(js, config)


async def _keep_ttl(js: JetStreamContext, bucket: str, ttl_s: float) -> None:
    """Give an existing bucket the configured TTL (its stream's max_age): a TTL set in config.toml or
    TEKTON_SESSION_TTL_S applies at the next gateway start, not only to a bucket made from scratch."""
    info = await js.stream_info(f"KV_{bucket}")
    had = info.config.max_age or 0.0
    if abs(had - ttl_s) < 0.001:
        return
    # As nats-py creates a bucket: the duplicate window is 2 minutes, at most the TTL.
    window = min(120.0, ttl_s) if ttl_s else 120.0
    await js.update_stream(info.config, max_age=ttl_s, duplicate_window=window)
    log.info("sessions bucket TTL updated", bucket=bucket, was_s=had, ttl_s=ttl_s)


async def _leader_write(
    write: Callable[[], Awaitable[int]], patience: float = CAS_PATIENCE_S, *, repeatable: bool = False
) -> int:
    """A KV write, again while nobody takes it: on a cluster the bucket's leader is gone and its replicas
    are electing another. "No responders" means nothing was written. A timeout may have written it: it
    is tried again only for a ``repeatable`` write (a put, a compare-and-set of an idempotent change)."""
    deadline = time.monotonic() + patience
    retry: tuple[type[Exception], ...] = (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)
    if repeatable:
        retry += (nats.errors.TimeoutError,)
    while True:
        try:
            return await write()
        except retry:
            if time.monotonic() > deadline:
                raise BusError(
                    "the sessions store has no leader; nothing was written", retryable=True
                ) from None
            await anyio.sleep(0.1)


class _Queued:
    """One change waiting for this replica's writer of its session."""

    def __init__(self, change: Callable[[Session], Session]):
        self.change = change
        self.stored = anyio.Event()
        self.session: Session | None = None
        self.error: Exception | None = None

    def result(self) -> Session:
        if self.error is not None:
            raise self.error
        assert self.session is not None
        return self.session


def _key(session_id: str) -> str:
    return f"s.{session_id}"


def _summary_key(session_id: str) -> str:
    return f"i.{session_id}"


def _name_key(name: str, owner: str) -> str:
    # Names may hold dots and dashes; hex keeps every name one valid key token.
    return f"n.o{owner.encode().hex()}.{name.encode().hex()}"


def _decode(data: bytes | None, key: str) -> Session:
    try:
        return Session.model_validate(msgpack.unpackb(data or b"", raw=False))
    except (ValidationError, ValueError, msgpack.UnpackException) as err:
        raise BusError(f"stored session {key} is unreadable: {err}") from err


def _pack(session: Session) -> bytes:
    data: bytes = msgpack.packb(session.model_dump(mode="python", exclude_none=True))
    return data


class SessionStore:
    def __init__(
        self,
        kv: KeyValue,
        limits: StoreLimits,
        cache_size: int = 1024,
        cache_bytes: int = 64 * 1024 * 1024,
        task_group: TaskGroup | None = None,
        journal: TurnJournal | None = None,
    ):
        self.kv = kv
        self.limits = limits
        # On a cluster: where a change the bucket did not store within WRITE_BEHIND_AFTER_S is kept
        # meanwhile (gateway/journal.py), and the sessions this replica has an entry of there.
        self.journal = journal
        self._journaled: set[str] = set()
        # With a task group, every write of a session goes through one writer task per session, in order,
        # and a caller may go on before its write is stored (update_soon): until then this replica's own
        # reads see the change (read-your-writes), and the writer retries until the bucket has a leader.
        self._tg = task_group
        self._queued: dict[str, list[_Queued]] = {}
        # The last value and revision this replica read or wrote, per session: an append then costs one
        # compare-and-set write instead of a read and a write. A stale entry (another replica wrote) only
        # costs the retry the compare-and-set does anyway. Bounded in count and in encoded bytes.
        self._recent: OrderedDict[str, tuple[Session, int, int]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self.cached_bytes = 0
        # Writers of one session in this replica take turns (no compare-and-set fights among
        # themselves); compare-and-set still settles writers in other replicas and processes.
        self._writing: weakref.WeakValueDictionary[str, anyio.Lock] = weakref.WeakValueDictionary()
        # When this replica last rewrote a name's index key (it expires with the bucket's TTL like any
        # key, so a name in use is rewritten now and then).
        self._names_touched: OrderedDict[str, float] = OrderedDict()

    def _remember(self, session: Session, revision: int, size: int) -> None:
        self._forget(session.id)
        self._recent[session.id] = (session, revision, size)
        self.cached_bytes += size
        while self._recent and (
            len(self._recent) > self._cache_size or self.cached_bytes > self._cache_bytes
        ):
            _, (_, _, dropped) = self._recent.popitem(last=False)
            self.cached_bytes -= dropped

    def _forget(self, session_id: str) -> None:
        old = self._recent.pop(session_id, None)
        if old is not None:
            self.cached_bytes -= old[2]

    def _cached(self, session_id: str) -> tuple[Session, int] | None:
        found = self._recent.get(session_id)
        return (found[0], found[1]) if found else None

    def _encode(self, session: Session) -> tuple[Session, bytes]:
        """The stored bytes; over the size limit, the oldest turns are dropped until it fits (never the
        newest one: a single turn over the limit is an error and nothing is written)."""
        data = _pack(session)
        while len(data) > self.limits.max_bytes and len(session.turns) > 1:
            # Drop as many of the oldest turns as the excess needs at once, not one re-encode per turn.
            excess, cut = len(data) - self.limits.max_bytes, 0
            while cut < len(session.turns) - 1 and excess > 0:
                excess -= len(msgpack.packb(session.turns[cut].model_dump(mode="python", exclude_none=True)))
                cut += 1
            session = session.model_copy(
                update={"turns": session.turns[cut:], "dropped": session.dropped + cut}
            )
            data = _pack(session)
        if len(data) > self.limits.max_bytes:
            raise SessionTooLarge(
                f"session {session.name or session.id} would be {len(data):,} bytes even with only its "
                f"newest turn, over the store's limit of {self.limits.max_bytes:,} bytes; nothing was "
                "written (send a shorter message)"
            )
        return session, data

    def _prune(self, session: Session) -> Session:
        extra = len(session.turns) - self.limits.max_turns
        if extra <= 0:
            return session
        return session.model_copy(update={"turns": session.turns[extra:], "dropped": session.dropped + extra})

    async def _get(self, key: str) -> KeyValue.Entry:
        """A direct get, answered by any replica; again for a moment while nobody answers (a node just
        died or restarted and the cluster's interest has not settled yet)."""
        deadline = time.monotonic() + READ_PATIENCE_S
        while True:
            try:
                return await self.kv.get(key)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise BusError(
                        "no replica of the sessions store answers; try again", retryable=True
                    ) from None
                await anyio.sleep(0.05)

    async def _load(self, session_id: str) -> tuple[Session, int] | None:
        try:
            entry = await self._get(_key(session_id))
        except nats.js.errors.KeyNotFoundError:
            self._forget(session_id)
            return None
        session, revision = _decode(entry.value, entry.key), entry.revision or 0
        self._remember(session, revision, len(entry.value or b""))
        return session, revision

    async def _summarise(self, session: Session, patience: float = CAS_PATIENCE_S) -> None:
        """Rewrite the session's summary (what listing reads) and keep its name's index key alive."""
        summary = msgpack.packb(session.summary().model_dump(exclude_none=True))
        put = partial(self.kv.put, _summary_key(session.id), summary)
        await _leader_write(put, patience, repeatable=True)
        if session.name is None:
            return
        key = _name_key(session.name, session.owner)
        touched = self._names_touched.get(key)
        if touched is not None and time.monotonic() - touched < self.limits.ttl_s / 4:
            return
        try:
            entry = await self._get(key)
            if entry.value == session.id.encode():
                await self.kv.update(key, entry.value, last=entry.revision)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyWrongLastSequenceError):
            return  # renamed or taken over meanwhile: the index is someone else's now
        self._names_touched[key] = time.monotonic()
        self._names_touched.move_to_end(key)
        if len(self._names_touched) > self._cache_size:
            self._names_touched.popitem(last=False)

    async def summaries(self, owner: str | None = None) -> list[SessionSummary]:
        """Every live session's summary, of ``owner`` (None: everyone's), by one ephemeral ordered
        consumer over the small ``i.*`` keys."""
        found: list[SessionSummary] = []
        for entry in await current_entries(self.kv, "i.*"):
            if not entry.value:
                continue
            try:
                summary = SessionSummary.model_validate(msgpack.unpackb(entry.value, raw=False))
            except (ValidationError, ValueError, msgpack.UnpackException) as err:
                log.warning("skipping unreadable summary", key=entry.key, error=str(err))
                continue
            if owner is None or summary.owner == owner:
                found.append(summary)
        return found

    async def _holder(self, name: str, owner: str) -> tuple[str, int] | None:
        """The id ``owner``'s name's index key points at, with the key's revision."""
        try:
            entry = await self._get(_name_key(name, owner))
        except nats.js.errors.KeyNotFoundError:
            return None
        return (entry.value or b"").decode(), entry.revision or 0

    async def wait_settled(self, session_id: str, request_ids: set[str], within: float) -> None:
        """Return once none of the turns asked by ``request_ids`` is pending any more (their answers
        stored, by whichever replica records them), or the session is gone; TimeoutError after
        ``within`` seconds."""
        # Shielded: a cancel landing while nats-py sets the watcher up would leave its subscription.
        with anyio.CancelScope(shield=True):
            watcher = await self.kv.watch(_key(session_id), inactive_threshold=WATCH_GONE_S)
        try:
            with anyio.fail_after(within):
                async for entry in watcher:
                    if entry is None:  # the end of the current values: wait for the next change
                        continue
                    if entry.operation is not None or not entry.value:
                        return
                    session = _decode(entry.value, entry.key)
                    if not any(t.status == "pending" and t.request_id in request_ids for t in session.turns):
                        return
        finally:
            await watcher.stop()

    def _overlay(self, found: tuple[Session, int]) -> tuple[Session, int]:
        """``found`` with this replica's changes not stored yet (read-your-writes)."""
        session, revision = found
        for queued in self._queued.get(session.id, ()):
            session = queued.change(session)
        return session, revision

    async def resolve(self, ref: str, owner: str | None = None) -> tuple[Session, int]:
        return self._overlay(await self._resolve(ref, owner))

    async def _resolve(self, ref: str, owner: str | None = None) -> tuple[Session, int]:
        """The session of ``owner`` (None: anyone's) with id ``ref``, else the one named ``ref``, else the
        one whose id starts with ``ref`` (at least 6 hex digits), with its revision. Another user's
        session is not found, exactly as if it did not exist."""

        def mine(found: tuple[Session, int] | None) -> bool:
            return found is not None and (owner is None or found[0].owner == owner)

        if SESSION_ID_RE.match(ref):
            found = await self._load(ref)
            if found is not None and mine(found):
                return found
        if owner is not None:
            holder = await self._holder(ref, owner)
            if holder is not None:
                found = await self._load(holder[0])
                if found is not None and mine(found) and found[0].name == ref:
                    return found
        else:  # an admin looking at everyone's: the newest session of that name
            named = [s for s in await self.summaries() if s.name == ref]
            if named and (found := await self._load(max(named, key=lambda s: s.updated).id)):
                return found
        if ID_PREFIX_RE.match(ref):
            named = [s for s in await self.summaries(owner) if s.id.startswith(ref)]
            if len(named) > 1:
                raise BadRequest(f"'{ref}' is the start of {len(named)} session ids; give more of it")
            if named:
                found = await self._load(named[0].id)
                if found is not None:
                    return found
        raise SessionNotFound.named(ref, self.limits.ttl_s)

    async def recent(self, ref: str, owner: str | None = None) -> Session:
        """The session as this replica last saw it, else as stored: for callers that go on to write it
        (a stale value is caught by the compare-and-set, and the write returns the fresh one)."""
        cached = self._cached(ref)
        if cached and (owner is None or cached[0].owner == owner):
            return self._overlay(cached)[0]
        return (await self.resolve(ref, owner))[0]

    async def claim_name(self, name: str, session_id: str, owner: str) -> None:
        """Make ``owner``'s ``name`` point at ``session_id``, atomically: refused while a live session
        holds it."""
        key, value = _name_key(name, owner), session_id.encode()
        for _ in range(20):
            try:
                await self.kv.create(key, value)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            holder = await self._holder(name, owner)
            if holder is None:
                continue  # released meanwhile: create again
            if holder[0] == session_id:
                return
            found = await self._load(holder[0])
            if found is not None and found[0].name == name:
                raise BadRequest(f"a session named '{name}' already exists; pick another name")
            try:  # the holder expired, was deleted or renamed: take the name over
                await self.kv.update(key, value, last=holder[1])
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise BusError(f"the name '{name}' is changing too fast to claim; try again", retryable=True)

    async def release_name(self, name: str, session_id: str, owner: str) -> None:
        """Drop the name's index key if it still points at ``session_id``."""
        holder = await self._holder(name, owner)
        if holder is not None and holder[0] == session_id:
            try:
                await self.kv.delete(_name_key(name, owner), last=holder[1])
            except nats.js.errors.APIError as err:  # changed meanwhile: it is someone else's now
                log.info("name index left as it is", name=name, error=str(err))
        self._names_touched.pop(_name_key(name, owner), None)

    async def create(self, session: Session) -> Session:
        session, data = self._encode(session)
        if session.name is not None:
            await self.claim_name(session.name, session.id, session.owner)
        try:
            revision = await _leader_write(lambda: self.kv.create(_key(session.id), data))
        except BaseException:
            if session.name is not None:
                with anyio.CancelScope(shield=True):
                    await self.release_name(session.name, session.id, session.owner)
            raise
        self._remember(session, revision, len(data))
        await self._summarise(session)
        return session

    async def update(self, ref: str, change: Callable[[Session], Session]) -> Session:
        """Apply ``change`` to the current value and write it if nobody wrote in between; else retry on
        the newer value, with a small random backoff so many writers on one session all get through.
        ``change`` must be a pure function of the session it is given, and idempotent: a write whose
        outcome was not heard (a timeout while the bucket elects a leader) is applied again to what was
        stored, and must then change nothing more (append a turn only if its id is absent)."""
        if self._tg is None:
            return await self._write(ref, change, CAS_PATIENCE_S)
        queued = self._enqueue(ref, change)
        await self._stored_or_journaled(queued, ref, WRITE_BEHIND_AFTER_S)
        await queued.stored.wait()
        return queued.result()

    async def update_soon(
        self, ref: str, change: Callable[[Session], Session], within: float = WRITE_BEHIND_AFTER_S
    ) -> Session:
        """:meth:`update`, but return after ``within`` seconds even if the write is not stored yet: the
        session as this replica now sees it (its later reads and writes include the change), while a
        writer keeps trying until the bucket has a leader (the change journaled meanwhile, on a
        cluster). A change the store could never take (too large) is refused now."""
        if self._tg is None:
            return await self.update(ref, change)
        session, _ = self._overlay(self._cached(ref) or await self._resolve(ref))
        self._encode(self._prune(change(session)))  # SessionTooLarge now, not behind the caller's back
        queued = self._enqueue(session.id, change)
        journaled = await self._stored_or_journaled(queued, session.id, within, session)
        if queued.stored.is_set():
            return queued.result()
        log.warning("session write goes on behind", session=session.id, waited_s=within, journaled=journaled)
        return self._overlay(self._cached(session.id) or (session, 0))[0]

    async def _stored_or_journaled(
        self, queued: _Queued, session_id: str, within: float, read: Session | None = None
    ) -> bool:
        """Wait up to ``within`` seconds for ``queued`` to be stored. Not stored by then, on a cluster:
        journal the session as this replica sees it now (``read``: as last read, if not cached), so the
        change is durable while the bucket elects a leader; True if the journal took it."""
        with anyio.move_on_after(within):
            await queued.stored.wait()
        if queued.stored.is_set() or self.journal is None:
            return False
        seen = self._cached(session_id) or ((read, 0) if read is not None else None)
        if seen is None:
            return False
        view = self._encode(self._prune(self._overlay(seen)[0]))[0]  # as the bucket would store it
        if not await self.journal.keep(view):
            return False
        if session_id in self._queued:
            self._journaled.add(session_id)  # its writer drops the entry once the bucket has it all
        elif queued.error is None:  # stored meanwhile
            assert self._tg is not None
            self._tg.start_soon(self.journal.forget, session_id)
        return True

    async def forget_journaled(self, session_id: str) -> None:
        """Drop every gateway's journal entry of the session: its turns were removed on purpose (a
        rollback), and no replay may bring them back."""
        if self.journal is not None:
            await self.journal.forget(session_id, "*")

    async def replay_journaled(self, session_id: str) -> None:
        """Store what the journal holds for this session (left by a gateway that died), if anything."""
        if self.journal is None:
            return
        try:
            await self.journal.replay_session(session_id, self.merge_journaled)
        except Exception as err:  # the sweep tries again
            log.info("journal not read", session=session_id, error=str(err) or type(err).__name__)

    async def merge_journaled(self, journaled: Session) -> bool:
        """Store what a journal entry left behind adds to the session (gateway/journal.py); True once
        stored, or when the session is gone."""
        try:
            await self.update(journaled.id, lambda s: merge_turns(s, journaled))
        except (SessionNotFound, SessionTooLarge) as err:  # nothing to merge into, or never storable
            log.warning("journal entry dropped", session=journaled.id, error=str(err))
            return True
        except Exception as err:  # no leader yet: the next sweep
            log.info(
                "journal entry not replayed yet", session=journaled.id, error=str(err) or type(err).__name__
            )
            return False
        return True

    def _enqueue(self, session_id: str, change: Callable[[Session], Session]) -> _Queued:
        queued = _Queued(change)
        waiting = self._queued.get(session_id)
        if waiting is None:
            waiting = self._queued[session_id] = []
            assert self._tg is not None
            self._tg.start_soon(self._writer, session_id, waiting)
        waiting.append(queued)
        return queued

    async def _writer(self, session_id: str, waiting: list[_Queued]) -> None:
        """Store the session's queued changes, each batch in one compare-and-set, until none is left."""
        failed = False
        while waiting:
            batch = list(waiting)

            def change(s: Session, batch: list[_Queued] = batch) -> Session:
                for queued in batch:
                    s = queued.change(s)
                return s

            def stored(batch: list[_Queued] = batch) -> None:
                if waiting[: len(batch)] == batch:  # in the store now: the overlay must not apply them again
                    del waiting[: len(batch)]

            session: Session | None = None
            error: Exception | None = None
            try:
                session = await self._write(session_id, change, BEHIND_PATIENCE_S, stored)
            except Exception as err:  # told to the callers still waiting; logged for those gone on
                error, failed = err, True
                self._journaled.discard(session_id)  # its entry stays for a sweep: none may purge it
                stored()
                log.error("session write failed", session=session_id, error=str(err))
            except BaseException:
                # Cancelled: the replica is stopping. Its callers may wait shielded (a recorder's last
                # write): they are told, never left waiting on a writer that is gone.
                stopping = GatewayUnavailable("the gateway stopped before this session change was stored")
                for queued in dict.fromkeys([*batch, *waiting]):
                    queued.error = stopping
                    queued.stored.set()
                self._queued.pop(session_id, None)
                raise
            for queued in batch:
                queued.session, queued.error = session, error
                queued.stored.set()
        del self._queued[session_id]
        if session_id in self._journaled and self.journal is not None and not failed:  # all stored now
            self._journaled.discard(session_id)
            assert self._tg is not None
            self._tg.start_soon(self.journal.forget, session_id)

    async def _write(
        self,
        ref: str,
        change: Callable[[Session], Session],
        patience: float,
        stored: Callable[[], None] | None = None,
    ) -> Session:
        lock = self._writing.get(ref)
        if lock is None:
            lock = self._writing[ref] = anyio.Lock()
        async with lock:
            session = await self._update(ref, change, patience)
        if stored is not None:
            stored()
        await self._summarise(session, patience)
        return session

    async def _update(self, ref: str, change: Callable[[Session], Session], patience: float) -> Session:
        session, revision = self._cached(ref) or await self._resolve(ref)
        deadline = time.monotonic() + max(CAS_PATIENCE_S, patience)
        for attempt in itertools.count():
            changed = self._prune(change(session).model_copy(update={"updated": time.time()}))
            changed, data = self._encode(changed)
            try:
                write = partial(self.kv.update, _key(session.id), data, last=revision)
                self._remember(changed, await _leader_write(write, patience, repeatable=True), len(data))
                return changed
            except nats.js.errors.KeyWrongLastSequenceError:
                if time.monotonic() > deadline:
                    break
                await anyio.sleep(random.uniform(0, min(0.02, 0.0005 * 2**attempt)))
                found = await self._load(session.id)
                if found is None:
                    raise SessionNotFound.named(ref, self.limits.ttl_s) from None
                session, revision = found
        raise BusError(f"session {ref} is changing too fast to update; try again", retryable=True)

    async def rename(self, ref: str, name: str, owner: str | None = None) -> Session:
        session, _ = await self.resolve(ref, owner)
        await self.claim_name(name, session.id, session.owner)
        try:
            renamed = await self.update(session.id, lambda s: s.model_copy(update={"name": name}))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.release_name(name, session.id, session.owner)
            raise
        if session.name is not None and session.name != name:
            await self.release_name(session.name, session.id, session.owner)
        return renamed

    async def delete(self, ref: str, owner: str | None = None) -> str:
        session, _ = await self.resolve(ref, owner)
        await self.kv.purge(_key(session.id))
        await self.kv.purge(_summary_key(session.id))
        if session.name is not None:
            await self.release_name(session.name, session.id, session.owner)
        self._forget(session.id)
        return session.id

    async def list(
        self, specialist: str | None, name: str | None, limit: int, owner: str | None = None
    ) -> list[SessionSummary]:
        summaries = [
            s
            for s in await self.summaries(owner)
            if (specialist is None or s.specialist == specialist) and (name is None or s.name == name)
        ]
        summaries.sort(key=lambda s: s.updated, reverse=True)
        return summaries[:limit]
