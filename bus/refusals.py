"""The server's refusals of what we publish, heard as they happen.

nats-server does not answer a publish it refuses (a subject our credentials may not publish to): it
sends an async ``-ERR 'Permissions Violation for Publish to "<subject>"'``, which nats-py passes to the
error callback, and a request to that subject would wait out its whole timeout. :func:`or_refused`
races a request against the refusal of its subject, so the caller hears "refused" at once.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import structlog

T = TypeVar("T")
log = structlog.get_logger("tekton.refusals")

_REFUSED = re.compile(r'permissions violation for (?:publish|subscription) to "([^"]+)"', re.IGNORECASE)
_ATTRIBUTE = "_tekton_refusals"
_ROLE = "_tekton_role"


class Refused(Exception):
    """The server refused to let us publish the request (its words in ``said``)."""

    def __init__(self, said: str):
        super().__init__(said)
        self.said = said


class Refusals:
    """The requests waiting on a connection, by subject, to be told when the server refuses one.
    Subjects are kept lowercased: nats-py passes the server's -ERR on lowercased."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[str]]] = {}
        self._listeners: set[weakref.WeakMethod[Callable[[str, str], None]]] = set()

    def heard(self, said: str) -> bool:
        """The connection's error callback heard ``said``: wake whoever waits on a refused subject.
        True if a request waited on it (it tells its caller: nobody else need say it)."""
        found = _REFUSED.search(said)
        if found is None:
            return False
        subject = found.group(1).lower()
        told = False
        for waiter in self._waiting.get(subject, ()):
            if not waiter.done():
                waiter.set_result(said)
                told = True
        for ref in list(self._listeners):
            listener = ref()
            if listener is None:  # its bus is gone
                self._listeners.discard(ref)
                continue
            try:
                listener(subject, said)
            except Exception:  # this runs in nats-py's read loop: nothing may escape it
                log.exception("a refusal listener failed", subject=subject)
        return told

    def listen(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(subject, said)`` (a bound method, held weakly: it goes with its object) for
        every publish or subscription the server refuses (``subject`` lowercased). A bus listens once
        for all its streams: refusals are rare, requests are not, so a request costs nothing here."""
        self._listeners.add(weakref.WeakMethod(listener))

    @contextmanager
    def watch(self, subject: str) -> Iterator[asyncio.Future[str]]:
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        subject = subject.lower()
        self._waiting.setdefault(subject, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiting = self._waiting.get(subject, set())
            waiting.discard(waiter)
            if not waiting:
                self._waiting.pop(subject, None)
            waiter.cancel()


def install(nc: Any, refusals: Refusals, role: str | None) -> None:
    """Keep ``refusals`` with the connection whose error callback feeds it, and the role its
    credentials have (None: none, a server without users)."""
    setattr(nc, _ATTRIBUTE, refusals)
    setattr(nc, _ROLE, role)


def refusals_of(nc: Any) -> Refusals | None:
    """The refusals kept with a connection made by bus.client.connect (None for one made elsewhere)."""
    return getattr(nc, _ATTRIBUTE, None)


def may_read_every_run(nc: Any) -> bool:
    """Whether this connection may read the runs stream by sequence, past its own runs' subjects: the
    gateway's role may (its HTTP bridge resumes its callers' runs), and anyone on a server without
    users. Asking without leave is refused with a warning, so it is not asked."""
    return getattr(nc, _ROLE, "unknown") in (None, "gateway")


async def or_refused(nc: Any, subject: str, work: Awaitable[T]) -> T:
    """``work`` (a request published to ``subject``), or :class:`Refused` as soon as the server refuses
    that publish. A connection made elsewhere (no refusals kept) just awaits ``work``."""
    refusals = refusals_of(nc)
    if refusals is None:
        return await work
    with refusals.watch(subject) as refused:
        task = asyncio.ensure_future(work)
        either: set[asyncio.Future[Any]] = {task, refused}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise Refused(refused.result())
