"""The turn journal (gateway/journal.py): what it adds to a stored session, and its replay against a real
nats-server. Losing the sessions bucket's leader on a real cluster is in tests/test_cluster.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import pytest
from anyio.abc import TaskGroup
from nats.js.kv import KeyValue

from bus.client import connect
from bus.errors import SessionNotFound
from bus.sessions import Session, Turn
from bus.settings import TektonSettings
from gateway.journal import TurnJournal, merge_turns
from gateway.store import SessionStore, StoreLimits, bucket_name, open_bucket
from tests.helpers import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.fast]


def _user(request_id: str, status: str = "pending", at: float = 1.0) -> Turn:
    return Turn(id=f"u-{request_id}", role="user", content=f"q {request_id}", specialist="apollo",
                status=status, request_id=request_id, at=at)  # fmt: skip


def _answer(request_id: str, turn_id: str, at: float = 2.0) -> Turn:
    """An answer: its own id is random, so two copies of one answer have different ids."""
    return Turn(id=turn_id, role="assistant", content=f"a {request_id}", specialist="apollo",
                request_id=request_id, at=at)  # fmt: skip


def _session(*turns: Turn, dropped: int = 0) -> Session:
    return Session(id="0" * 32, specialist="apollo", turns=list(turns), dropped=dropped)


def _shape(s: Session) -> list[tuple[str, str, str]]:
    return [(t.role, t.content, t.status) for t in s.turns]


@pytest.mark.parametrize(
    ("stored", "journaled", "expected"),
    [
        # The question the bucket never got.
        (
            _session(_user("r1", "ok"), _answer("r1", "x1")),
            _session(_user("r1", "ok"), _answer("r1", "x1"), _user("r2", at=3.0)),
            [("user", "q r1", "ok"), ("assistant", "a r1", "ok"), ("user", "q r2", "pending")],
        ),
        # Its answer too: the pending question takes the journal's outcome.
        (
            _session(_user("r1")),
            _session(_user("r1", "ok"), _answer("r1", "x1")),
            [("user", "q r1", "ok"), ("assistant", "a r1", "ok")],
        ),
        # The client's copy of the answer was stored meanwhile (another random id): not twice.
        (
            _session(_user("r1", "ok"), _answer("r1", "client")),
            _session(_user("r1", "ok"), _answer("r1", "gateway")),
            [("user", "q r1", "ok"), ("assistant", "a r1", "ok")],
        ),
        # The bucket has moved on (settled later): an older journal changes nothing.
        (
            _session(_user("r1", "error")),
            _session(_user("r1")),
            [("user", "q r1", "error")],
        ),
        # The bucket dropped its oldest turns (its cap): they are not brought back.
        (
            _session(_user("r2", "ok", at=3.0), dropped=2),
            _session(_user("r1", "ok"), _answer("r1", "x1"), _user("r2", "ok", at=3.0), _user("r3", at=4.0)),
            [("user", "q r2", "ok"), ("user", "q r3", "pending")],
        ),
        # Nothing in common: the dropped one stays dropped, the newer one comes.
        (
            _session(_user("r5", "ok", at=5.0), dropped=1),
            _session(_user("r1", "ok"), _user("r6", at=6.0)),
            [("user", "q r5", "ok"), ("user", "q r6", "pending")],
        ),
        # Another gateway stored a later question while this one was only journaled: both kept.
        (
            _session(_user("r2", "ok", at=3.0)),
            _session(_user("r1", at=1.0)),
            [("user", "q r2", "ok"), ("user", "q r1", "pending")],
        ),
        # Another gateway stored a later question first: the answer goes back beside its own.
        (
            _session(_user("r1"), _user("r2", "ok", at=3.0), _answer("r2", "x2", at=4.0)),
            _session(_user("r1", "ok"), _answer("r1", "x1"), _user("r2", at=3.0)),
            [
                ("user", "q r1", "ok"),
                ("assistant", "a r1", "ok"),
                ("user", "q r2", "ok"),
                ("assistant", "a r2", "ok"),
            ],
        ),
        # The bucket gave the question up (no answer came in time): no answer without its question.
        (
            _session(_user("r1", "error")),
            _session(_user("r1", "ok"), _answer("r1", "x1")),
            [("user", "q r1", "error")],
        ),
    ],
    ids=[
        "question",
        "answer",
        "client-copy",
        "older",
        "dropped",
        "disjoint",
        "elsewhere",
        "interleaved",
        "given-up",
    ],
)
def test_a_journaled_session_adds_only_what_the_stored_one_lacks(
    stored: Session, journaled: Session, expected: list[tuple[str, str, str]]
) -> None:
    merged = merge_turns(stored, journaled)
    assert _shape(merged) == expected
    assert merge_turns(merged, journaled) == merged, "merging again changed it"


async def _no_entries(journal: TurnJournal, session_id: str) -> bool:
    return await journal.entries(session_id) == []


@dataclass
class Journaled:
    store: SessionStore
    journal: TurnJournal
    kv: KeyValue
    limits: StoreLimits
    tg: TaskGroup


@asynccontextmanager
async def journaled_store(settings: TektonSettings) -> AsyncIterator[Journaled]:
    """A gateway's session store with a turn journal, on the real nats-server of ``settings``."""
    nc = await connect(settings.nats_url)
    try:
        limits = StoreLimits(ttl_s=600, max_turns=100, max_bytes=64 * 1024)
        kv = await open_bucket(nc.jetstream(), settings.prefix, limits)
        journal = TurnJournal(nc, settings.prefix, bucket_name(settings.prefix), replicas=1)
        await journal.open()
        async with anyio.create_task_group() as tg:
            yield Journaled(SessionStore(kv, limits, task_group=tg, journal=journal), journal, kv, limits, tg)
            tg.cancel_scope.cancel()
    finally:
        await nc.close()


async def test_an_entry_left_behind_is_replayed_into_the_bucket_once_and_cleared(
    settings: TektonSettings,
) -> None:
    """What a gateway journaled and died before storing ends up in the bucket, once, however often it
    is replayed (two sweepers), and the entry is gone after."""
    async with journaled_store(settings) as j:
        session = await j.store.create(_session(_user("r1", "ok", at=time.time())))
        # The dying gateway's view: its question and answer, which the bucket never got.
        seen = session.model_copy(update={"turns": [*session.turns, _user("r2", "ok"), _answer("r2", "x")]})
        assert await j.journal.keep(seen)
        assert await j.journal.replay(j.store.merge_journaled) == 0, "an entry younger than the wait replayed"
        other = SessionStore(j.kv, j.limits, task_group=j.tg, journal=j.journal)  # a second sweeper
        async with anyio.create_task_group() as sweepers:
            for s in (j.store, other):
                sweepers.start_soon(j.journal.replay, s.merge_journaled, 0.0)
        stored, _ = await SessionStore(j.kv, j.limits).resolve(session.id)
        assert _shape(stored) == [("user", "q r1", "ok"), ("user", "q r2", "ok"), ("assistant", "a r2", "ok")]
        # (a merge slower than 0.25 s journals its own entry, which its writer then drops)
        await eventually(lambda: _no_entries(j.journal, session.id), within=10)


async def test_a_session_deleted_since_drops_its_entry(settings: TektonSettings) -> None:
    async with journaled_store(settings) as j:
        session = await j.store.create(_session())
        await j.journal.keep(session.model_copy(update={"turns": [_user("r1")]}))
        await j.store.delete(session.id)
        assert await j.journal.replay(j.store.merge_journaled, 0.0) == 1
        assert await j.journal.entries(session.id) == []
        with pytest.raises(SessionNotFound):
            await j.store.resolve(session.id)
