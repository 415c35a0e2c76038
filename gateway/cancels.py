"""The cancels the gateway hears for work it runs on a user's behalf: a bulk request, a queued session
message. One subscription to every cancel (``tekton.cancel.<user>.<id>``, under the asker's own name:
the server pins it); a cancel that comes before its work begins (the client was interrupted while the
gateway accepted the request, or gave up waiting for the acceptance) is remembered a while, as
specialists do (specialists/service.py), so it still stops the work once it begins."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

# How long a cancel that came before its work is remembered, and how many at most.
EARLY_CANCEL_S = 30.0
EARLY_CANCEL_MAX = 10_000

Key = tuple[str, str]  # (user, request id)


class Watch:
    """One piece of work's cancel: ``cancelled`` is set, and ``scope`` (for the work to run in, if it
    likes) is cancelled, once its user cancels it."""

    def __init__(self) -> None:
        self.cancelled = anyio.Event()
        self.scope = anyio.CancelScope()

    def cancel(self) -> None:
        self.cancelled.set()
        self.scope.cancel()


class CancelBook:
    def __init__(self) -> None:
        # (Several pieces of work may share a key: a client that reused a request id.)
        self._watched: dict[Key, list[Watch]] = {}
        self._early: OrderedDict[Key, float] = OrderedDict()

    def heard(self, user: str, request_id: str) -> None:
        """A cancel of ``user``'s request ``request_id``: it stops that work now, or when it begins."""
        key = (user, request_id)
        watched = self._watched.get(key)
        if watched:
            for watch in watched:
                watch.cancel()
            return
        now = time.monotonic()
        early = self._early
        early[key] = now
        early.move_to_end(key)
        while early and (len(early) > EARLY_CANCEL_MAX or now - next(iter(early.values())) > EARLY_CANCEL_S):
            early.popitem(last=False)

    @contextmanager
    def watch(self, user: str, request_id: str) -> Iterator[Watch]:
        """What tells the work ``request_id`` of ``user`` that it is cancelled (at once if it was a
        moment ago, before the work began)."""
        key = (user, request_id)
        watch = Watch()
        watched = self._watched.setdefault(key, [])
        watched.append(watch)
        heard_at = self._early.pop(key, None)
        if heard_at is not None and time.monotonic() - heard_at <= EARLY_CANCEL_S:
            watch.cancel()
        try:
            yield watch
        finally:
            watched.remove(watch)
            if not watched and self._watched.get(key) is watched:
                del self._watched[key]
