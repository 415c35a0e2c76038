"""Sessions in a JetStream key-value bucket: one session = one key, every change compare-and-set.

Keys are ``s.<id>``. The bucket has file storage, a TTL (a session expires that long after its last
change) and a little history. Names are not indexed: a name is resolved by scanning the bucket
(``list`` does the same), which costs one ephemeral consumer per lookup and is fine for people-sized
numbers of sessions; ids are one direct get.
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
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from pydantic import ValidationError

from bus.errors import BadRequest, BusError, SessionNotFound, SessionTooLarge
from bus.sessions import SESSION_ID_RE, Session, SessionSummary

log = structlog.get_logger("tekton.gateway.store")

ID_PREFIX_RE = re.compile(r"^[0-9a-f]{6,31}$")

# A compare-and-set loses only to another writer of the same session, which then has made progress;
# with backoff every writer gets through. Past this, something is wrong: say so.
CAS_PATIENCE_S = 10.0


@dataclass(frozen=True)
class StoreLimits:
    ttl_s: float
    max_turns: int
    max_bytes: int
    replicas: int = 1


def bucket_name(prefix: str) -> str:
    return f"{prefix.replace('.', '_')}_sessions"


async def open_bucket(js: JetStreamContext, prefix: str, limits: StoreLimits) -> KeyValue:
    """The sessions bucket, created if missing. An existing bucket keeps its own settings."""
    name = bucket_name(prefix)
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
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
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:  # another replica created it at the same moment
        return await js.key_value(name)


async def _leader_write(write: Callable[[], Awaitable[int]]) -> int:
    """A KV write, again while nobody takes it: on a cluster the bucket's leader is gone and its replicas
    are electing another (a second or two); "no responders" means nothing was written."""
    deadline = time.monotonic() + CAS_PATIENCE_S
    while True:
        try:
            return await write()
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
            if time.monotonic() > deadline:
                raise BusError(
                    "the sessions store has no leader; nothing was written", retryable=True
                ) from None
            await anyio.sleep(0.1)


def _key(session_id: str) -> str:
    return f"s.{session_id}"


def _decode(data: bytes | None, key: str) -> Session:
    try:
        return Session.model_validate(msgpack.unpackb(data or b"", raw=False))
    except (ValidationError, ValueError, msgpack.UnpackException) as err:
        raise BusError(f"stored session {key} is unreadable: {err}") from err


class SessionStore:
    def __init__(self, kv: KeyValue, limits: StoreLimits, cache_size: int = 1024):
        self.kv = kv
        self.limits = limits
        # The last value and revision this replica read or wrote, per session: an append then costs one
        # compare-and-set write instead of a read and a write. A stale entry (another replica wrote) only
        # costs the retry the compare-and-set does anyway.
        self._recent: OrderedDict[str, tuple[Session, int]] = OrderedDict()
        self._cache_size = cache_size
        # Writers of one session in this replica take turns (no compare-and-set fights among
        # themselves); compare-and-set still settles writers in other replicas and processes.
        self._writing: weakref.WeakValueDictionary[str, anyio.Lock] = weakref.WeakValueDictionary()

    def _remember(self, session: Session, revision: int) -> None:
        self._recent[session.id] = (session, revision)
        self._recent.move_to_end(session.id)
        if len(self._recent) > self._cache_size:
            self._recent.popitem(last=False)

    def _encode(self, session: Session) -> tuple[Session, bytes]:
        """The stored bytes; over the size limit, the oldest turns are dropped until it fits (never the
        newest one: a single turn over the limit is an error and nothing is written)."""
        data: bytes = msgpack.packb(session.model_dump(mode="python", exclude_none=True))
        while len(data) > self.limits.max_bytes and len(session.turns) > 1:
            session = session.model_copy(update={"turns": session.turns[1:], "dropped": session.dropped + 1})
            data = msgpack.packb(session.model_dump(mode="python", exclude_none=True))
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

    async def _load(self, session_id: str) -> tuple[Session, int] | None:
        try:
            entry = await self.kv.get(_key(session_id))
        except nats.js.errors.KeyNotFoundError:
            self._recent.pop(session_id, None)
            return None
        session, revision = _decode(entry.value, entry.key), entry.revision or 0
        self._remember(session, revision)
        return session, revision

    async def scan(self, owner: str | None = None) -> list[Session]:
        """Every live session of ``owner`` (None: everyone's), by one ephemeral ordered consumer over the
        bucket's last values."""
        watcher = await self.kv.watch("s.*", ignore_deletes=True)
        sessions: list[Session] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.operation is None and entry.value:
                    try:
                        session = _decode(entry.value, entry.key)
                        if owner is None or session.owner == owner:
                            sessions.append(session)
                    except BusError as err:
                        log.warning("skipping unreadable session", key=entry.key, error=err.message)
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
        return sessions

    async def wait_settled(self, session_id: str, request_ids: set[str], within: float) -> None:
        """Return once none of the turns asked by ``request_ids`` is pending any more (their answers
        stored, by whichever replica records them), or the session is gone; TimeoutError after
        ``within`` seconds."""
        watcher = await self.kv.watch(_key(session_id))
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

    async def resolve(self, ref: str, owner: str | None = None) -> tuple[Session, int]:
        """The session of ``owner`` (None: anyone's) with id ``ref``, else the newest one named ``ref``,
        else the one whose id starts with ``ref`` (at least 6 hex digits), with its revision. Another
        user's session is not found, exactly as if it did not exist."""
        if SESSION_ID_RE.match(ref):
            found = await self._load(ref)
            if found is not None and (owner is None or found[0].owner == owner):
                return found
        sessions = await self.scan(owner)
        named = [s for s in sessions if s.name == ref]
        if not named and ID_PREFIX_RE.match(ref):
            named = [s for s in sessions if s.id.startswith(ref)]
            if len(named) > 1:
                raise BadRequest(f"'{ref}' is the start of {len(named)} session ids; give more of it")
        if named:
            newest = max(named, key=lambda s: s.updated)
            found = await self._load(newest.id)
            if found is not None:
                return found
        raise SessionNotFound.named(ref, self.limits.ttl_s)

    async def recent(self, ref: str, owner: str | None = None) -> Session:
        """The session as this replica last saw it, else as stored: for callers that go on to write it
        (a stale value is caught by the compare-and-set, and the write returns the fresh one)."""
        cached = self._recent.get(ref)
        if cached and (owner is None or cached[0].owner == owner):
            return cached[0]
        return (await self.resolve(ref, owner))[0]

    async def check_name_free(
        self, name: str | None, but: str | None = None, owner: str | None = None
    ) -> None:
        if name is None:
            return
        if any(s.name == name and s.id != but for s in await self.scan(owner)):
            raise BadRequest(f"a session named '{name}' already exists; pick another name")

    async def create(self, session: Session) -> Session:
        await self.check_name_free(session.name, owner=session.owner)
        session, data = self._encode(session)
        self._remember(session, await _leader_write(lambda: self.kv.create(_key(session.id), data)))
        return session

    async def update(self, ref: str, change: Callable[[Session], Session]) -> Session:
        """Apply ``change`` to the current value and write it if nobody wrote in between; else retry on
        the newer value, with a small random backoff so many writers on one session all get through.
        ``change`` must be a pure function of the session it is given."""
        lock = self._writing.get(ref)
        if lock is None:
            lock = self._writing[ref] = anyio.Lock()
        async with lock:
            return await self._update(ref, change)

    async def _update(self, ref: str, change: Callable[[Session], Session]) -> Session:
        session, revision = self._recent.get(ref) or await self.resolve(ref)
        deadline = time.monotonic() + CAS_PATIENCE_S
        for attempt in itertools.count():
            changed = self._prune(change(session).model_copy(update={"updated": time.time()}))
            changed, data = self._encode(changed)
            try:
                write = partial(self.kv.update, _key(session.id), data, last=revision)
                self._remember(changed, await _leader_write(write))
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

    async def delete(self, ref: str, owner: str | None = None) -> str:
        session, _ = await self.resolve(ref, owner)
        await self.kv.purge(_key(session.id))
        self._recent.pop(session.id, None)
        return session.id

    async def list(
        self, specialist: str | None, name: str | None, limit: int, owner: str | None = None
    ) -> list[SessionSummary]:
        sessions = [
            s
            for s in await self.scan(owner)
            if (specialist is None or s.specialist == specialist) and (name is None or s.name == name)
        ]
        sessions.sort(key=lambda s: s.updated, reverse=True)
        return [s.summary() for s in sessions[:limit]]
