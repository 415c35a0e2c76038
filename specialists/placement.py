"""Load-aware placement: a request goes to a replica with a free slot whenever one exists.

A NATS queue group picks a member at random, so with CPU-bound replicas one request could wait behind a
busy replica while another idles. Here a replica stays in its chat endpoint's queue group only while it
has a free slot, so NATS only picks among replicas with room; nats-server still does the choosing (and
prefers members on the publisher's own node). Replicas announce their free slots to each other on
``<prefix>.ai.<name>.load`` when that changes (and every ``interval``, so newcomers and the dead are
noticed).

Two rules keep every request served, even when every replica is full:

- the *anchor* (the replica with the smallest id among the live ones) never leaves the group, so a
  request always has somewhere to go: there is never a "no responders" for a running specialist;
- a request that reaches a full replica anyway (the anchor, or one in flight while its replica was
  leaving) is forwarded straight to a replica that announced a free slot, on that replica's own
  subject (``<prefix>.ai.<name>.direct.<id>``), at most ``MAX_HOPS`` times; with no room anywhere it
  waits for a slot (with heartbeats), never refused, where the fewest wait per slot: replicas announce
  their queue and slots too, and a request that lands on a full replica (not one forwarded already)
  goes on to the peer where it would wait behind fewer others per slot. Else every request of a burst
  larger than all the slots queued on the anchor, however few its slots: a one-slot anchor held a
  queue of 5 while an eight-slot peer went idle.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio
import msgpack
import structlog
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.service import Endpoint, Service

log = structlog.get_logger("tekton.placement")

HOPS_HEADER = "Tekton-Hops"
MAX_HOPS = 3
GONE = -1


def load_subject(name: str, prefix: str) -> str:
    return f"{prefix}.ai.{name}.load"


def direct_subject(name: str, instance: str, prefix: str) -> str:
    return f"{prefix}.ai.{name}.direct.{instance}"


def hops(msg: Msg) -> int:
    try:
        return int((msg.headers or {}).get(HOPS_HEADER, 0))
    except ValueError:
        return MAX_HOPS


# Room left for the header a forwarded request gains (hops), on top of those it came with.
FORWARD_HEADROOM = 4096
# A header name nats-py sends (an HTTP token); it reads others, so a raw client's request may bring one.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def forwardable_headers(msg: Msg) -> tuple[dict[str, str], int]:
    """The headers a forwarded copy of ``msg`` carries (those nats-py will send: any other name, from
    a client that is not nats-py, made the forward raise and the replica exit), and their size on the
    wire."""
    headers = {k: v for k, v in (msg.headers or {}).items() if _HEADER_NAME.fullmatch(k)}
    size = len(b"NATS/1.0\r\n\r\n") + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
    return headers, size


class Peer(NamedTuple):
    """A peer replica as it last announced itself."""

    free: int  # free slots (GONE: it stopped)
    seen: float  # when (monotonic)
    queued: int = 0  # requests waiting there for a slot
    slots: int = 0  # 0: not said (a replica older than queues in announcements: not compared by queue)


class Placement:
    """Keeps one replica's chat endpoint in its queue group only while it has room (see module doc)."""

    def __init__(
        self,
        nc: NATS,
        service: Service,
        endpoint: Endpoint,
        *,
        name: str,
        prefix: str,
        slots: int,
        interval: float,
    ):
        self.nc = nc
        self.service = service
        self.endpoint = endpoint
        self.name = name
        self.prefix = prefix
        self.slots = slots
        self.interval = interval
        self.in_flight = 0
        # Requests whose end was announced (finishing) and that are still counted in flight: their
        # slots count as free already, so that the loop's next announcement does not take it back.
        self._ending = 0
        # Peers as they last announced themselves (free slots, queue, slots), and when.
        self.peers: dict[str, Peer] = {}
        self._changed = anyio.Event()
        self._announced: tuple[int, int] | None = None  # (free, queued) as last announced
        self._subs: list[Any] = []
        self._stopped = False
        self.counters = {"forwarded": 0, "left": 0, "joined": 0}

    @property
    def instance(self) -> str:
        return str(self.service.id)

    @property
    def free(self) -> int:
        return max(0, self.slots - self.in_flight + self._ending)

    @property
    def queued(self) -> int:
        return max(0, self.in_flight - self._ending - self.slots)

    @property
    def joined(self) -> bool:
        return self.endpoint._subscription is not None

    async def start(self, task_group: TaskGroup, handle: Callable[[Msg], Awaitable[None]]) -> None:
        """Listen to peers and on our direct subject (forwarded requests go to ``handle``), then keep
        the queue membership right until :meth:`stop`."""
        self._subs = [
            await self.nc.subscribe(load_subject(self.name, self.prefix), cb=self._on_load),
            await self.nc.subscribe(direct_subject(self.name, self.instance, self.prefix), cb=handle),
        ]
        task_group.start_soon(self._run)

    def _live(self) -> dict[str, Peer]:
        horizon = time.monotonic() - 3 * self.interval
        return {i: p for i, p in self.peers.items() if p.seen >= horizon and p.free != GONE}

    def is_anchor(self) -> bool:
        return all(self.instance < other for other in self._live())

    def room_elsewhere(self) -> str | None:
        """A live peer that announced a free slot (the one with the most), or None."""
        live = {i: p.free for i, p in self._live().items() if p.free > 0}
        return max(live, key=lambda i: live[i]) if live else None

    def shorter_wait(self) -> str | None:
        """Every replica full: the live peer where a request would wait behind the fewest others per
        slot, if fewer than here, else None."""
        best, wait = None, (self.queued + 1) / self.slots
        for instance, peer in self._live().items():
            if not peer.slots:
                continue
            there = (peer.queued + 1) / peer.slots
            if there < wait:
                best, wait = instance, there
        return best

    def update(self, in_flight: int) -> None:
        """The replica's requests in flight changed."""
        free, queued = self.free, self.queued
        if in_flight < self.in_flight:  # (one that ended with no finishing counts off one too: bounded)
            self._ending = max(0, self._ending - (self.in_flight - in_flight))
        self.in_flight = in_flight
        # Alone (no peer ever announced itself), only a change of membership matters: announcing
        # every request's start and end to nobody costs a publish and a loop turn each.
        if self.peers:
            if self.free != free or self.queued != queued:
                self._changed.set()
        elif (self.free == 0) != (free == 0):
            self._changed.set()

    async def finishing(self) -> None:
        """A request is about to end (its last frame goes next): tell peers its slot is free *before*
        the asker hears "done", so a request it sends at once finds this replica counted as free.
        (One connection's messages reach the server in order.)"""
        if not self._stopped and self.peers:
            self._ending = min(self._ending + 1, self.in_flight)  # (its slot goes to the next waiting)
            await self._announce(self.free, self.queued)

    def forward_target(self, msg: Msg) -> tuple[str, dict[str, str]] | None:
        """Where to send a request that reached us while we are full: a peer with room (subject and
        headers), or None to take it here."""
        if self.free > 0 or hops(msg) >= MAX_HOPS or self._stopped:
            return None
        # Forwarding adds a header: a request near max_payload (its body and the headers it came with)
        # would then be refused by nats-server, which closes the connection that sent it (a 1 MB
        # traceparent did). Such a request waits for a slot here instead.
        headers, header_size = forwardable_headers(msg)
        if len(msg.data) + header_size + FORWARD_HEADROOM > self.nc.max_payload:
            return None
        peer = self.room_elsewhere()
        if peer is None and hops(msg) == 0:  # (one hop only: what peers said of their queues ages)
            peer = self.shorter_wait()
        if peer is None:
            return None
        there = self.peers[peer]
        # Until it says otherwise: spread a burst.
        if there.free > 0:
            self.peers[peer] = there._replace(free=there.free - 1)
        else:
            self.peers[peer] = there._replace(queued=there.queued + 1)
        self.counters["forwarded"] += 1
        headers[HOPS_HEADER] = str(hops(msg) + 1)
        return direct_subject(self.name, peer, self.prefix), headers

    async def _on_load(self, msg: Msg) -> None:
        try:
            data = msgpack.unpackb(msg.data)
            instance, free = str(data["id"]), int(data["free"])
            queued, slots = int(data.get("queued", 0)), max(0, int(data.get("slots", 0)))
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException):
            return
        if instance == self.instance:
            return
        new = instance not in self.peers
        self.peers[instance] = Peer(free, time.monotonic(), max(0, queued), slots)
        if free == GONE:
            self.peers.pop(instance, None)
        if new and free != GONE:
            self._announced = None  # a newcomer: tell it about us now
        self._changed.set()

    async def _announce(self, free: int, queued: int) -> None:
        self._announced = (free, queued)
        load = {"id": self.instance, "free": free, "queued": queued, "slots": self.slots}
        await self.nc.publish(load_subject(self.name, self.prefix), msgpack.packb(load))

    async def _run(self) -> None:
        last = 0.0
        while not self._stopped:
            now = time.monotonic()
            if self._announced != (self.free, self.queued) or now - last >= self.interval:
                last = now
                await self._announce(self.free, self.queued)
            await self._reconcile()
            with anyio.move_on_after(self.interval):
                await self._changed.wait()
            self._changed = anyio.Event()

    async def _reconcile(self) -> None:
        want = self.free > 0 or self.is_anchor()
        if want and not self.joined:
            await self.endpoint._start()
            self.counters["joined"] += 1
        elif not want and self.joined:
            sub = self.endpoint._subscription
            assert sub is not None
            self.endpoint._subscription = None
            self.counters["left"] += 1
            # Drain, not unsubscribe: requests already delivered to us are still handled (forwarded).
            with contextlib.suppress(Exception):
                await sub.drain()

    async def stop(self) -> None:
        """Tell peers we are gone and stop moving; micro's own stop then ends the endpoint."""
        self._stopped = True
        self._changed.set()
        with contextlib.suppress(Exception):
            await self._announce(GONE, 0)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if not self.joined and self.endpoint in self.service._endpoints:
            self.service._endpoints.remove(self.endpoint)  # nothing of ours for micro to unsubscribe
