"""What runs on the bus, as the gateway sees it: a cached, refreshed survey of `$SRV.INFO`/`$SRV.STATS`,
and routing decisions over it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import anyio
import structlog
from nats.aio.client import Client as NATS

from bus.discovery import SpecialistView, survey
from bus.subjects import DEFAULT_PREFIX
from gateway.routing import (
    DEFAULT_THRESHOLD,
    Candidate,
    Method,
    TextMatcher,
    matcher,
    rank_by_capability,
    rank_by_text,
)

FRESH_S = 2.0
log = structlog.get_logger("tekton.gateway.discovery")


class Catalog:
    """The specialists running now. Refreshed in the background every ``FRESH_S / 2``; a request that
    needs a name the cache lacks triggers one refresh first."""

    def __init__(self, nc: NATS, method: Method, prefix: str = DEFAULT_PREFIX):
        self.nc = nc
        self.method = method
        self.prefix = prefix
        self._views: list[SpecialistView] = []
        self._at = 0.0
        self._answers = 0  # instances that answered last time: the next gather stops when all did
        self._matcher: TextMatcher | None = None
        self._profiles: tuple[tuple[str, str], ...] = ()

    async def refresh(self, *, thorough: bool = False) -> list[SpecialistView]:
        """Stop the gather when as many answered as last time, unless ``thorough`` (then wait for
        silence): new instances show up at the latest on the next thorough refresh."""
        expected = None if thorough else self._answers or None
        views, answered = await survey(self.nc, expected=expected, prefix=self.prefix)
        if expected and answered < expected:
            # A quick look that missed some (a busy loop answers late): keep what we knew of those
            # until a thorough look confirms they are gone.
            seen = {v.name for v in views}
            views = sorted([*views, *(v for v in self._views if v.name not in seen)], key=lambda v: v.name)
        else:
            self._answers = answered
        self._views, self._at = views, time.monotonic()
        return views

    async def views(self, need: Iterable[str] = (), *, refresh: bool = False) -> list[SpecialistView]:
        stale = time.monotonic() - self._at > FRESH_S
        missing = not self._views or not set(need) <= {v.name for v in self._views}
        if refresh or stale or missing:
            await self.refresh(thorough=missing)
        return self._views

    async def names(self, need: Iterable[str] = (), *, refresh: bool = False) -> set[str]:
        return {v.name for v in await self.views(need, refresh=refresh)}

    async def keep_fresh(self) -> None:
        for round_ in itertools.count():
            try:
                await self.refresh(thorough=round_ % 5 == 0)
            except Exception as err:  # NATS reconnecting, say: keep the last view and try again
                log.info("discovery refresh failed", error=str(err))
            await anyio.sleep(FRESH_S / 2)

    def text_matcher(self) -> TextMatcher:
        """Built once per set of profiles (they change only when specialists come or go)."""
        profiles = tuple((v.name, v.description + str(v.capabilities) + str(v.keywords)) for v in self._views)
        if self._matcher is None or profiles != self._profiles:
            self._matcher, self._profiles = matcher(self.method, self._views), profiles
        return self._matcher

    async def for_capability(self, capability: str) -> list[Candidate]:
        views = await self.views()
        if not any(capability in v.capabilities for v in views):  # maybe it just started: look again
            views = await self.refresh(thorough=True)
        return rank_by_capability(views, capability)

    async def for_text(self, text: str) -> list[Candidate]:
        views = await self.views()
        return rank_by_text(views, self.text_matcher().scores(text)) if views else []


def above(candidates: list[Candidate], threshold: float = DEFAULT_THRESHOLD) -> list[Candidate]:
    return [c for c in candidates if c.score >= threshold]
