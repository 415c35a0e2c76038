"""Who records what: work a gateway replica holds (a pending turn to record, a queued message to start)
is written to the sessions bucket with the replica's name, so another replica takes it over when that
one dies, and exactly one does.

Keys (in a bucket of their own, ``<prefix>_work``, whose TTL outlasts any pending turn, so released
work leaves no marker behind for ever):
  ``w.alive.<instance>``  rewritten every ``lease_s / 3`` by each live replica;
  ``w.turn.<request id>``  a pending turn and its holder (written when its answer begins, deleted when
                           it is stored);
  ``w.queued.<request id>`` a queued message (double_text=queue) and its holder, until it has begun.

A sweep every ``lease_s / 2`` reads ``w.>``. A holder whose alive key is gone, or has kept the same
revision for ``lease_s`` on this replica's clock (no clocks of two machines compared), is dead; its work
is taken with a compare-and-set on the work key's revision, which only one sweeper wins.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgpack
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from gateway.store import current_entries, ensure_bucket

log = structlog.get_logger("tekton.gateway.leases")

ALIVE = "w.alive."
TURN = "turn"
QUEUED = "queued"


def work_bucket_name(prefix: str) -> str:
    return f"{prefix.replace('.', '_')}_work"


async def open_work_bucket(js: JetStreamContext, prefix: str, ttl_s: float, replicas: int) -> KeyValue:
    """The work bucket, created if missing (an existing one keeps its settings)."""
    config = KeyValueConfig(
        bucket=work_bucket_name(prefix),
        description="Tekton gateways: who records which turn, who starts which queued message",
        history=1,
        ttl=ttl_s,
        storage=StorageType.FILE,
        direct=True,
        replicas=replicas,
    )
    return await ensure_bucket(js, config)


def work_key(kind: str, request_id: str) -> str:
    return f"w.{kind}.{request_id}"


@dataclass(frozen=True)
class Work:
    """One piece of held work as stored: its kind, request id, holder and whatever it needs to go on."""

    kind: str
    request_id: str
    holder: str
    data: dict[str, Any]
    revision: int


class Leases:
    def __init__(self, kv: KeyValue, instance: str, lease_s: float):
        self.kv = kv
        self.instance = instance
        self.lease_s = lease_s
        # Per holder: (revision of its alive key, when this replica first saw that revision).
        self._seen: dict[str, tuple[int, float]] = {}

    async def hold(self, kind: str, request_id: str, data: dict[str, Any]) -> bool:
        """Record that we hold this work; False when someone already does (or the store is away)."""
        value = msgpack.packb({"holder": self.instance, **data})
        try:
            await self.kv.create(work_key(kind, request_id), value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except (nats.errors.Error, OSError) as err:  # no index: a restart's full scan still finds it
            log.warning("work not indexed", kind=kind, request=request_id, error=str(err))
            return False
        return True

    async def release(self, kind: str, request_id: str) -> None:
        try:
            await self.kv.purge(work_key(kind, request_id))
        except (nats.errors.Error, OSError) as err:  # a stale index only costs a sweep a look
            log.info("work index left", kind=kind, request=request_id, error=str(err))

    async def beat(self) -> None:
        """Say we are alive, for as long as this task runs."""
        key = ALIVE + self.instance
        while True:
            try:
                await self.kv.put(key, msgpack.packb(time.time()))
            except Exception as err:  # reconnecting, or the bucket electing a leader: the next beat
                log.info("alive key not written", error=str(err) or type(err).__name__)
            await anyio.sleep(self.lease_s / 3)

    async def stop(self) -> None:
        """Gone on purpose: what we still hold is for the others at their next sweep."""
        try:
            await self.kv.purge(ALIVE + self.instance)
        except (nats.errors.Error, OSError) as err:
            log.info("alive key left to go stale", error=str(err))

    async def orphans(self) -> list[Work]:
        """Work whose holder is dead, as stored now."""
        alive: dict[str, int] = {}
        work: list[Work] = []
        for entry in await current_entries(self.kv, "w.>"):
            if entry.key.startswith(ALIVE):
                alive[entry.key[len(ALIVE) :]] = entry.revision or 0
                continue
            _, kind, request_id = entry.key.split(".", 2)
            try:
                data = msgpack.unpackb(entry.value, raw=False)
                holder = str(data.pop("holder"))
            except (ValueError, KeyError, TypeError, msgpack.UnpackException):
                log.warning("unreadable work entry", key=entry.key)
            else:
                work.append(Work(kind, request_id, holder, data, entry.revision or 0))
        now = time.monotonic()
        seen = {}
        for holder, revision in alive.items():
            before = self._seen.get(holder)
            seen[holder] = before if before is not None and before[0] == revision else (revision, now)
        self._seen = seen

        def dead(holder: str) -> bool:
            if holder == self.instance:
                return False
            found = seen.get(holder)
            return found is None or now - found[1] >= self.lease_s

        return [w for w in work if dead(w.holder)]

    async def take(self, work: Work) -> bool:
        """Make the work ours if it has not changed since it was read: only one sweeper wins."""
        value = msgpack.packb({"holder": self.instance, **work.data})
        try:
            await self.kv.update(work_key(work.kind, work.request_id), value, last=work.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def sweep(self, handle: Callable[[Work], Awaitable[None]]) -> None:
        """Every ``lease_s / 2``: take over the work of dead replicas and hand each piece to ``handle``."""
        while True:
            try:
                for work in await self.orphans():
                    if await self.take(work):
                        log.info("took over work", kind=work.kind, request=work.request_id, was=work.holder)
                        await handle(work)
            except (nats.errors.Error, OSError) as err:  # the connection or the bucket is away: next time
                log.info("sweep skipped", error=str(err) or type(err).__name__)
            except Exception:  # never the gateway's death
                log.exception("sweep failed")
            await anyio.sleep(self.lease_s / 2)
