"""The turn journal: on a cluster, a session change the bucket did not store at once is kept durable
within milliseconds anyway, in a second replicated stream whose leader sits on another node.

When a node dies with the sessions bucket's leader, the bucket's replicas elect another after nats-server's
Raft election timeout (a random 4-9 s, fixed in the server). The gateway does not make a turn wait for
that (gateway/store.py writes it behind the answer), but until the election ends the change lives only in
that gateway's memory, and in its client's. This stream, ``<bucket>_journal`` with the bucket's replicas,
keeps it meanwhile: after ``WRITE_BEHIND_AFTER_S`` without a stored write, the session as the gateway now
sees it is published to ``<prefix>.journal.<session id>.<gateway>`` (one message kept per subject, the
newest: one gateway's entry never replaces another's), which a quorum of the journal's replicas
acknowledges at once, its leader being alive.

- Leaders apart: every gateway checks now and then that the journal's leader (and the work bucket's) is
  not on the bucket leader's node, and moves it there if it is (a leader stepdown with a preferred
  placement, nats-server 2.11+), so one node's loss never takes both.
- Dropped: the writer that journaled a session purges its entry once its changes are in the bucket; a
  rollback (double-texting) purges every gateway's entry of the session, so no replay brings back the
  turns it removed.
- Replayed: a gateway taking a dead one's turn over (gateway/leases.py) merges the session's entries
  first; and any entry a gateway has seen for ``REPLAY_AFTER_S`` (its own clock) is merged by whichever
  gateway sweeps first (``merge_turns``: a pending turn takes the journal's outcome, a missing turn goes
  after the one it follows; idempotent, so two sweepers, or a sweeper and the client's own copy of the
  answer, store each turn once). Then the entry is deleted.

Only the gateway may publish to the journal (bus/auth.py), and a specialist never answers into it
(bus/runs.py ``answerable``): what is replayed becomes a stored session. An entry under another
session's subject is dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress

import anyio
import msgpack
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from pydantic import ValidationError

from bus.sessions import Session, Turn

log = structlog.get_logger("tekton.gateway.journal")

# Stores what a journaled session adds to the stored one: True once stored (or the session is gone).
Merge = Callable[[Session], Awaitable[bool]]
# An entry as read: (stream sequence, when its gateway wrote it, the session as that gateway saw it).
Entry = tuple[int, float, Session]

# How long a gateway waits for the journal's acknowledgement before it goes on without it (the journal's
# leader being alive, it takes a few milliseconds).
JOURNAL_ACK_S = 1.0
# An entry a gateway has seen this long (on its own clock) was left by a gateway that could not drop it
# (it died before the bucket took the change): replay it. A live gateway has stored its change by then,
# the election being long over.
REPLAY_AFTER_S = 20.0
# One entry's merge waits this long at most for the bucket (a sweep goes on with the next).
MERGE_PATIENCE_S = 30.0
# How often a gateway sweeps the journal and checks that the two leaders are apart.
SWEEP_EVERY_S = 5.0
# JetStream's error code for a message that is not there (any more).
NO_MESSAGE = 10057
# Entries older than this are dropped by the stream itself.
JOURNAL_KEEP_S = 3600.0


async def open_journal(
    nc: NATS, prefix: str, bucket: str, replicas: int, apart: Sequence[str] = ()
) -> TurnJournal:
    """The journal of the sessions bucket ``bucket``, made if missing (now if it can be, else by the
    first sweep that can: see TurnJournal.open)."""
    journal = TurnJournal(nc, prefix, bucket, replicas, apart)
    await journal.open()
    return journal


def journal_stream_name(bucket: str) -> str:
    return f"{bucket}_journal"


def journal_subject(prefix: str, session_id: str, instance: str) -> str:
    """One subject per session and gateway: a gateway's entry never replaces another's."""
    return f"{prefix}.journal.{session_id}.{instance}"


def _key(turn: Turn) -> tuple[str, str]:
    """What makes a turn the same turn in two copies of a session: a user turn's id comes from its
    request's, an answer is its request's (its own id is random, so the client's copy has another)."""
    return (turn.role, turn.request_id) if turn.request_id else ("id", turn.id)


def merge_turns(stored: Session, journaled: Session) -> Session:
    """``stored`` with what ``journaled`` adds. A turn pending in ``stored`` takes its outcome from
    ``journaled``; a turn ``stored`` lacks goes right after the one it follows in ``journaled``. Except:
    turns ``stored`` has dropped at its cap (by position: ``dropped`` counts them), and an answer to a
    question ``stored`` settled otherwise (given up, or answered from another copy). Pure and
    idempotent."""
    theirs = {_key(t): t for t in journaled.turns}
    turns = [
        theirs[_key(t)] if t.status == "pending" and theirs.get(_key(t), t).status != "pending" else t
        for t in stored.turns
    ]
    settled = {t.request_id for t in stored.turns if t.role == "user" and t.status != "pending"}
    keys = [_key(t) for t in turns]
    for i, t in enumerate(journaled.turns):
        key = _key(t)
        if key in keys or journaled.dropped + i < stored.dropped:  # present, or dropped at the cap
            continue
        if t.role == "assistant" and t.request_id in settled:
            continue
        before = _key(journaled.turns[i - 1]) if i else None
        at = keys.index(before) + 1 if before in keys else len(turns)
        turns.insert(at, t)
        keys.insert(at, key)
    return stored if turns == stored.turns else stored.model_copy(update={"turns": turns})


class TurnJournal:
    def __init__(self, nc: NATS, prefix: str, bucket: str, replicas: int, apart: Sequence[str] = ()):
        """``apart``: more streams whose leaders are kept off the bucket leader's node (the work
        bucket's, gateway/leases.py: a dead gateway's turns are taken over from it)."""
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=JOURNAL_ACK_S)
        self.prefix = prefix
        self.bucket_stream = f"KV_{bucket}"
        self.name = journal_stream_name(bucket)
        self.replicas = replicas
        self.apart = tuple(apart)
        self.opened = False
        self.instance = uuid.uuid4().hex[:12]  # this gateway's own subjects
        # When this gateway first saw each entry (by sequence), on its own clock: no two machines'
        # clocks are compared.
        self._first_seen: dict[int, float] = {}

    async def open(self) -> bool:
        """Make sure the stream exists (created if missing; an existing one keeps its settings). False
        when that cannot be known now (the cluster electing its meta leader): the next sweep tries again,
        and meanwhile an existing journal is used as it is."""
        if self.opened:
            return True
        config = StreamConfig(
            name=self.name,
            description="Tekton sessions: changes the bucket had not stored yet (a leader election)",
            subjects=[journal_subject(self.prefix, "*", "*")],
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            max_msgs_per_subject=1,
            max_age=JOURNAL_KEEP_S,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
        )
        try:
            try:
                await self.js.stream_info(self.name)  # answered by the journal's own leader
            except nats.js.errors.NotFoundError:
                try:
                    await self.nc.jetstream(timeout=5.0).add_stream(config)
                except nats.js.errors.BadRequestError as err:  # made by another gateway just now?
                    await self.js.stream_info(self.name)  # if not, it was refused: said below
                    log.info("turn journal made meanwhile", said=str(err))
        except (nats.errors.Error, OSError) as err:
            log.warning("turn journal not checked yet", error=str(err) or type(err).__name__)
            return False
        self.opened = True
        return True

    async def keep(self, session: Session) -> bool:
        """Journal ``session`` as this gateway now sees it (replacing its own earlier entry of it); False
        when the journal did not take it in ``JOURNAL_ACK_S`` (the change then lives in this gateway's
        memory until the bucket takes it)."""
        data = msgpack.packb(
            {"at": time.time(), "session": session.model_dump(mode="python", exclude_none=True)}
        )
        try:
            ack = await self.js.publish(journal_subject(self.prefix, session.id, self.instance), data)
        except (nats.errors.Error, OSError) as err:
            log.warning(
                "session change not journaled", session=session.id, error=str(err) or type(err).__name__
            )
            return False
        log.info("session change journaled", session=session.id, seq=ack.seq)
        return True

    async def forget(self, session_id: str, instance: str | None = None) -> None:
        """Drop this gateway's entry of the session (every gateway's with ``instance="*"``): the bucket
        holds its changes now, or they were undone (a rollback)."""
        subject = journal_subject(self.prefix, session_id, instance or self.instance)
        try:
            await self.js.purge_stream(self.name, subject=subject)
        except (nats.errors.Error, OSError) as err:  # replayed later, which changes nothing
            log.info("journal entry left", session=session_id, error=str(err) or type(err).__name__)

    async def clear(self, seq: int) -> None:
        """Delete an entry whose change is in the bucket now (gone already: nothing to do)."""
        try:
            await self.js.delete_msg(self.name, seq)
        except nats.js.errors.APIError as err:
            if err.err_code != NO_MESSAGE:  # else a newer entry of its session replaced it
                log.info("journal entry left", seq=seq, error=str(err))
        except (nats.errors.Error, OSError) as err:  # replayed later, which changes nothing
            log.info("journal entry left", seq=seq, error=str(err) or type(err).__name__)

    async def entry(self, subject: str) -> Entry | None:
        """The entry on ``subject`` (a direct get, from any replica): (sequence, when, session); None if
        there is none (an unreadable one is dropped)."""
        try:
            msg = await self.js.get_msg(self.name, subject=subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        try:
            entry = msgpack.unpackb(msg.data or b"", raw=False)
            session = Session.model_validate(entry["session"])
            if session.id != subject.split(".")[-2]:
                raise ValueError(f"an entry of session {session.id} under another session's subject")
            return int(msg.seq or 0), float(entry["at"]), session
        except (KeyError, TypeError, ValueError, ValidationError, msgpack.UnpackException) as err:
            log.warning("unreadable journal entry dropped", subject=subject, error=str(err))
            await self.clear(int(msg.seq or 0))
            return None

    async def entries(self, session_id: str = "*", older_than: float = 0.0) -> list[Entry]:
        """The entries (of one session, or all), each seen by this gateway at least ``older_than``
        seconds ago."""
        filter_ = journal_subject(self.prefix, session_id, "*")
        info = await self.js.stream_info(self.name, subjects_filter=filter_)
        present, now = [], time.monotonic()
        for subject in (info.state.subjects or {}) if info.state else {}:
            entry = await self.entry(subject)
            if entry is not None:
                present.append(entry)
                self._first_seen.setdefault(entry[0], now)
        if session_id == "*":  # forget what is gone
            self._first_seen = {e[0]: self._first_seen[e[0]] for e in present}
        return [e for e in present if now - self._first_seen[e[0]] >= older_than]

    async def replay(self, merge: Merge, older_than: float = REPLAY_AFTER_S) -> int:
        """Merge every entry left behind into the bucket (``merge``: True once stored, or when the
        session is gone), deleting each merged one; how many were merged."""
        merged = 0
        for entry in await self.entries(older_than=older_than):
            merged += await self._merge(entry, merge)
        return merged

    async def replay_session(self, session_id: str, merge: Merge) -> int:
        """Merge the session's entries, whatever their age (a gateway that wrote one is known dead)."""
        merged = 0
        for entry in await self.entries(session_id):
            merged += await self._merge(entry, merge)
        return merged

    async def _merge(self, entry: Entry, merge: Merge) -> bool:
        seq, at, session = entry
        with anyio.move_on_after(MERGE_PATIENCE_S):  # the bucket without a leader: the next sweep
            if await merge(session):
                log.info(
                    "journaled session change replayed", session=session.id, age_s=round(time.time() - at, 1)
                )
                await self.clear(seq)
                return True
        return False

    async def keep_apart(self) -> None:
        """Move the journal's leader, and those of the streams in ``apart``, off the bucket leader's
        node, where one shares it."""
        bucket = await self._leader(self.bucket_stream)
        if bucket is None:
            return
        for stream in (self.name, *self.apart):
            other = await self._leader(stream)
            if other is None or other[0] != bucket[0] or not (elsewhere := sorted(other[1] - {bucket[0]})):
                continue
            request = json.dumps({"placement": {"preferred": elsewhere[0]}}).encode()
            with suppress(nats.errors.Error, OSError):
                await self.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=5)
                log.info("leader moved off the sessions leader's node", stream=stream, to=elsewhere[0])

    async def _leader(self, stream: str) -> tuple[str, set[str]] | None:
        """The stream's leader and its current replicas, None while it has no leader."""
        try:
            info = await self.js.stream_info(stream)
        except (nats.errors.Error, OSError):
            return None
        cluster = info.cluster
        if cluster is None or not cluster.leader:
            return None
        peers = {str(r.name) for r in (cluster.replicas or []) if r.current and not r.offline}
        return str(cluster.leader), peers

    async def tend(self, merge: Merge) -> None:
        """For as long as this task runs: keep the leaders apart, replay what was left behind."""
        while True:
            for step in (self.open, self.keep_apart, lambda: self.replay(merge)):
                try:
                    await step()
                except Exception as err:  # a leader being elected (or anything else): next time
                    log.info("journal not tended", error=str(err) or type(err).__name__)
            await anyio.sleep(SWEEP_EVERY_S)
