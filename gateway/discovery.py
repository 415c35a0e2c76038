"""What runs on the bus, as the gateway sees it: a cached, refreshed survey of `$SRV.INFO`/`$SRV.STATS`,
and routing decisions over it, with the corrections users made (kept in a JetStream KV bucket that
every gateway replica follows, one key per user and request: a user's corrections steer only their own
routing), and, when one is configured, a routing model's judgment (gateway/judge.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from bus.discovery import Correction, SpecialistView, survey
from bus.errors import BadRequest
from bus.subjects import ANONYMOUS, DEFAULT_PREFIX
from gateway.judge import ModelJudge
from gateway.routing import (
    DEFAULT_GENERALIST,
    DEFAULT_THRESHOLD,
    Candidate,
    Learned,
    Method,
    TextMatcher,
    matcher,
    normalise,
    rank_by_capability,
    rank_by_text,
)

FRESH_S = 2.0
_KEY_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
log = structlog.get_logger("tekton.gateway.discovery")


class Catalog:
    """The specialists running now. Refreshed in the background every ``FRESH_S / 2``; a request that
    needs a name the cache lacks triggers one refresh first."""

    def __init__(
        self,
        nc: NATS,
        method: Method,
        prefix: str = DEFAULT_PREFIX,
        generalist: str = DEFAULT_GENERALIST,
        judge: ModelJudge | None = None,
    ):
        self.nc = nc
        self.judge = judge
        self.method = method
        self.prefix = prefix
        self.generalist = generalist
        self._views: list[SpecialistView] = []
        self._at = 0.0
        self._answers = 0  # instances that answered last time: the next gather stops when all did
        self._matcher: TextMatcher | None = None
        # What the text matcher is built from: the profiles and corrections, as a cheap-to-compare
        # generation number bumped whenever either changes (a request must not hash 1,000 examples).
        self._profiles: tuple[object, ...] = ()
        self._generation = 0
        self._built_generation = -1
        self._bucket_name = f"{prefix.replace('.', '_')}_routing"
        self._kv: KeyValue | None = None
        # KV key -> (user, correction); each user's as a Learned, rebuilt when theirs change.
        self._learned: dict[str, tuple[str, Correction]] = {}
        self._mine: dict[str, tuple[tuple[tuple[str, str], ...], Learned]] = {}
        self._building = anyio.Lock()
        self._infos: dict[str, dict[str, Any]] = {}  # instance id -> its $SRV.INFO answer (never changes)

    async def refresh(self, *, thorough: bool = False) -> list[SpecialistView]:
        """Stop the gather when as many answered as last time, unless ``thorough`` (then wait for
        silence): new instances show up at the latest on the next thorough refresh."""
        expected = None if thorough else self._answers or None
        views, answered = await survey(self.nc, expected=expected, known=self._infos, prefix=self.prefix)
        if expected and answered < expected:
            # A quick look that missed some (a busy loop answers late): keep what we knew of those
            # until a thorough look confirms they are gone.
            seen = {v.name for v in views}
            views = sorted([*views, *(v for v in self._views if v.name not in seen)], key=lambda v: v.name)
        else:
            self._answers = answered
        self._views, self._at = views, time.monotonic()
        profiles = tuple(
            (v.name, v.description, str(v.capabilities), tuple(v.keywords), tuple(v.examples)) for v in views
        )
        if profiles != self._profiles:
            self._profiles = profiles
            self._generation += 1
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
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_corrections)
            tg.start_soon(self._prepare_matcher_forever)
            await self._refresh_forever()

    async def _refresh_forever(self) -> None:
        for round_ in itertools.count():
            try:
                await self.refresh(thorough=round_ % 5 == 0)
            except Exception as err:  # NATS reconnecting, say: keep the last view and try again
                log.info("discovery refresh failed", error=str(err))
            await anyio.sleep(FRESH_S / 2)

    async def text_matcher(self) -> TextMatcher:
        """Built once per set of profiles and corrections (they change only when specialists come or go
        or a user corrects a choice), in a worker thread: embedding a thousand examples takes a while.
        Its classifier is trained afterwards in the background; until then it votes alone."""
        async with self._building:
            if self._matcher is None or self._built_generation != self._generation:
                generation = self._generation
                build = partial(matcher, self.method, self._views, train=False)
                self._matcher = await anyio.to_thread.run_sync(build)
                self._built_generation = generation
            return self._matcher

    async def _prepare_matcher_forever(self) -> None:
        """Have the text matcher for what runs now built and trained before a request needs it (apart
        from the refresh loop, which training would hold up for seconds)."""
        while True:
            try:
                if self._views:
                    built = await self.text_matcher()
                    if not built.trained:
                        # A gateway stopping does not wait for this: the half-trained matcher is dropped.
                        await anyio.to_thread.run_sync(built.train, abandon_on_cancel=True)
            except Exception:  # a bad profile must not stop discovery; requests will report it
                log.exception("building the text matcher failed")
            await anyio.sleep(FRESH_S / 2)

    async def _bucket(self) -> KeyValue:
        """The corrections bucket, created if missing (file storage: they outlive restarts)."""
        if self._kv is None:
            js = self.nc.jetstream()
            try:
                self._kv = await js.key_value(self._bucket_name)
            except nats.js.errors.BucketNotFoundError:
                config = KeyValueConfig(
                    bucket=self._bucket_name,
                    description="Tekton routing corrections: requests users sent to another specialist",
                    history=1,
                    storage=StorageType.FILE,
                )
                try:
                    self._kv = await js.create_key_value(config)
                except nats.js.errors.BadRequestError:  # another replica created it at the same moment
                    self._kv = await js.key_value(self._bucket_name)
        return self._kv

    @staticmethod
    def _key(user: str, text: str) -> str:
        """``c.<user>.<id>``: the user's name when it is a safe subject token, else its hash."""
        who = user if _KEY_SAFE.match(user) else "h" + hashlib.sha256(user.encode()).hexdigest()[:16]
        return f"c.{who}.{hashlib.sha256(normalise(text).encode()).hexdigest()[:12]}"

    async def learn(self, text: str, specialist: str, user: str = ANONYMOUS) -> None:
        """Remember that ``text`` belongs to ``specialist`` for ``user`` (who reran it with that name)."""
        if specialist not in await self.names([specialist]):
            raise BadRequest(f"cannot learn a route to '{specialist}': no specialist of that name is running")
        key = self._key(user, text)
        at = time.time()
        value = json.dumps({"user": user, "text": text[:2000], "specialist": specialist, "at": at})
        await (await self._bucket()).put(key, value.encode())
        # At once here; other replicas hear it from the watch.
        correction = Correction(id=key.rsplit(".", 1)[1], text=text[:2000], specialist=specialist, at=at)
        self._learned[key] = (user, correction)

    def corrections(self, user: str) -> list[Correction]:
        """``user``'s corrections, oldest first."""
        return sorted((c for who, c in self._learned.values() if who == user), key=lambda c: c.at)

    async def forget(self, user: str, which: str) -> list[Correction]:
        """Forget ``user``'s correction ``which`` (an id, or a prefix of one) or all with "all"."""
        mine = {k: c for k, (who, c) in self._learned.items() if who == user}
        gone = [k for k, c in mine.items() if which == "all" or c.id.startswith(which)]
        if not gone:
            raise BadRequest(
                f"you have no routing correction {which!r} (`aish route --corrections` lists them)"
            )
        if which != "all" and len(gone) > 1:
            raise BadRequest(f"{which!r} is the start of {len(gone)} corrections' ids: give more of it")
        kv = await self._bucket()
        for key in gone:
            await kv.delete(key)
            self._learned.pop(key, None)
        return self.corrections(user)

    def learned_for(self, user: str) -> Learned | None:
        """``user``'s corrections as extra voters (cached until theirs change)."""
        items = tuple((c.text, c.specialist) for c in self.corrections(user))
        if not items:
            return None
        cached = self._mine.get(user)
        if cached is None or cached[0] != items:
            cached = self._mine[user] = (items, Learned(items))
        return cached[1]

    async def _follow_corrections(self) -> None:
        """Every replica keeps every user's corrections: the bucket's current values, then each change.
        Keys of the first version (``c.<hash>``, shared by everyone) are no one's and are left alone."""
        while True:
            try:
                watcher = await (await self._bucket()).watch("c.*.*")
                try:
                    async for entry in watcher:
                        if entry is None:
                            continue  # the current values have all arrived
                        if entry.operation is not None or not entry.value:  # deleted or purged
                            self._learned.pop(entry.key, None)
                            continue
                        try:
                            data = json.loads(entry.value)
                            correction = Correction(
                                id=entry.key.rsplit(".", 1)[1],
                                text=str(data["text"]),
                                specialist=str(data["specialist"]),
                                at=float(data.get("at", 0.0)),
                            )
                            self._learned[entry.key] = (str(data["user"]), correction)
                        except (ValueError, KeyError, TypeError):
                            log.warning("skipping unreadable routing correction", key=entry.key)
                finally:
                    await watcher.stop()
            except Exception as err:  # NATS reconnecting, say: follow again shortly
                log.info("following routing corrections failed", error=str(err))
            await anyio.sleep(FRESH_S)

    async def for_capability(self, capability: str) -> list[Candidate]:
        views = await self.views()
        if not any(capability in v.capabilities for v in views):  # maybe it just started: look again
            views = await self.refresh(thorough=True)
        return rank_by_capability(views, capability)

    async def for_text(self, text: str, user: str = ANONYMOUS) -> TextRoute:
        """The ranking for ``text`` and who answers: the user's own correction for it; else the routing
        model's pick when one is configured and answers in time; else the best fit, or the generalist
        when nothing fits (or the best-ranked one when the generalist is not running). Never nobody
        while any runs."""
        views = await self.views()
        if not views:
            return TextRoute([], None, [], "no specialists are running (start them with `tekton up`)")
        learned = self.learned_for(user)
        judgement = (await self.text_matcher()).judge(text, learned)
        ranked = rank_by_text(views, judgement)
        best = ranked[0]
        corrected = learned is not None and normalise(text) in learned.exact
        if self.judge is not None and not corrected:
            verdict = await self.judge.judge(text, views)
            if verdict.chosen is not None:
                embedding = f"the embedding router's best: {best.name} {best.fit:.2f}"
                others = [c.name for c in ranked if c.name != verdict.chosen][:3]
                reason = f"{verdict.chosen}: {verdict.note} ({embedding})"
                return TextRoute(ranked, verdict.chosen, others, reason, judged_by=self.judge.model)
            note = f"; {verdict.note}, so the embedding router chose"
        else:
            note = ""
        if judgement.matched and best.fit > 0:
            # Next best, while they fit at least half as well.
            others = [c.name for c in ranked[1:4] if c.fit > 0 and c.score >= best.score / 2]
            return TextRoute(ranked, best.name, others, f"{best.name}: {best.why('text match')}{note}")
        running = {c.name for c in ranked}
        chosen = self.generalist if self.generalist in running else best.name
        others = [c.name for c in ranked if c.name != chosen][:3]
        hint = f"best: {best.name} {best.fit:.2f}" + (f", {best.because}" if best.because else "")
        what = "the generalist" if chosen == self.generalist else "the best-ranked specialist"
        reason = f"{chosen}: no specialist's profile matches this request ({hint}), so {what} answers{note}"
        return TextRoute(ranked, chosen, others, reason, generalist=True)


@dataclass(frozen=True)
class TextRoute:
    ranked: list[Candidate]
    chosen: str | None
    alternatives: list[str]
    reason: str
    generalist: bool = False
    judged_by: str | None = None


def above(candidates: list[Candidate], threshold: float = DEFAULT_THRESHOLD) -> list[Candidate]:
    return [c for c in candidates if c.score >= threshold]
