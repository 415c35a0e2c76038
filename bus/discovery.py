"""Discovery over NATS micro: who runs, what they can do (`$SRV.INFO`) and how they are doing
(`$SRV.STATS`), aggregated per specialist across its replicas.

A gather stops as soon as it can: when the expected number of instances answered, or when no answer
came for ``stall`` seconds after the last one, and at the latest after ``window``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

import anyio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import Field

from bus.prompts import PromptTemplate
from bus.subjects import DEFAULT_PREFIX
from bus.wire import PROTOCOL_VERSION, Wire

SPECIALIST_ROLE = "specialist"
# Micro metadata key naming the subject prefix a service serves: `$SRV` subjects are server-wide, so
# discovery keeps only the services of its own prefix (one without the key serves the default one).
PREFIX_KEY = "tekton_prefix"
# Quiet time after the last answer that ends a gather. Answers from processes on a busy machine
# spread out: 10 ms lost some of ten specialist processes in CI; 30 ms has not.
STALL_S = 0.03
# Replicas of one specialist should announce the same things; these differences are reported.
_COMPARED = ("primary", "capabilities", "keywords", "provider", "model", "max_tokens", "context_window")


async def gather(
    nc: NATS, subject: str, *, expected: int | None = None, window: float = 0.05, stall: float = STALL_S
) -> list[dict[str, Any]]:
    """Scatter-gather on a ``$SRV`` subject: every JSON answer until the stop rule above."""
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []
    changed = anyio.Event()

    async def collect(msg: Msg) -> None:
        nonlocal changed
        try:
            answers.append(json.loads(msg.data))
        except ValueError:
            return
        changed.set()
        changed = anyio.Event()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        deadline = time.monotonic() + window
        while not (expected and len(answers) >= expected):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # Before the first answer wait the whole window; after it, only a short stall.
            with anyio.move_on_after(min(left, stall) if answers else left):
                await changed.wait()
                continue
            if answers:
                break
    finally:
        await sub.unsubscribe()
    return answers


_WORDS = re.compile(r"\w+")


def normalise_request(text: str) -> str:
    """The form a routing correction is remembered by (client and gateway agree on it): lowercase words
    with single spaces, at most 2,000 characters."""
    return " ".join(_WORDS.findall(text.lower()))[:2000]


class SpecialistView(Wire):
    """One specialist as discovery sees it: what its replicas announce, plus their live figures."""

    name: str
    instances: list[str]
    description: str = ""
    primary: list[str] = []
    capabilities: dict[str, float] = {}
    keywords: list[str] = []
    # Requests it is for, in varied phrasings: what text routing compares a request with.
    examples: list[str] = []
    provider: str = ""
    model: str = ""
    max_tokens: int | None = None
    context_window: int | None = None
    cost_per_1k_tokens: float | None = None
    features: list[str] = []
    # Named prompt templates it offers (the roster's ``prompts``; MCP prompts).
    prompts: dict[str, PromptTemplate] = {}
    # Live, summed over replicas (averages weighted by requests served).
    served: int = 0
    errors: int = 0
    cancelled: int = 0
    in_flight: int = 0
    capacity: int = 0
    avg_ms: float | None = None
    avg_first_token_ms: float | None = None
    health: float = Field(default=1.0, ge=0, le=1)
    # Replicas that announce different metadata (reported, never merged silently).
    conflicts: list[str] = []


class Discover(Wire):
    """``<prefix>.gateway.discover``: the running specialists, optionally only those with
    ``capability``; with ``capability`` or ``text``, also a ranking and the one chosen."""

    v: Literal[1] = PROTOCOL_VERSION
    capability: str | None = Field(default=None, max_length=64)
    text: str | None = None
    threshold: float | None = Field(default=None, ge=0, le=1)
    refresh: bool = False
    # With ``text``: the user sent that request to this specialist instead of the one routing chose.
    # The gateway remembers it and routes that request, and ones like it, there from now on, for
    # this user only.
    correct: str | None = Field(default=None, max_length=64)
    # List the asking user's corrections (in the reply's ``corrections``). Optional fields are sent
    # only when set, so protocol 1 stays 1.
    corrections: bool | None = None
    # Forget one of the asking user's corrections by its id (or a start of one), or all of them with
    # "all"; never "", which would be the start of every id.
    forget: str | None = Field(default=None, min_length=1, max_length=64)


class Correction(Wire):
    """A request a user sent to another specialist than routing chose: theirs, until forgotten."""

    id: str
    text: str
    specialist: str
    at: float


class Ranked(Wire):
    name: str
    score: float
    fit: float
    health: float
    why: str


class DiscoveryReply(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["discovery"] = "discovery"
    specialists: list[SpecialistView]
    ranked: list[Ranked] = []
    chosen: str | None = None
    # Who to try next if ``chosen`` is unavailable or fails before answering, best first.
    alternatives: list[str] = []
    # Why ``chosen`` won, or why nobody was chosen.
    reason: str = ""
    # No specialist's profile matched the text, so the generalist was chosen.
    generalist: bool = False
    took_ms: float = 0.0
    # With ``corrections`` or ``forget``: the asking user's corrections (after forgetting).
    corrections: list[Correction] | None = None
    # A routing model (``routing_model``) chose: its name; None: the embedding router alone chose.
    judged_by: str | None = None


def health(served: int, errors: int, in_flight: int, capacity: int, first_token_ms: float | None) -> float:
    """0..1 from live stats: success rate (a prior of 19 in 20 so a new specialist starts near 0.95 and a
    failing one drops fast), minus up to half for load, minus up to half for a slow first token."""
    success = (served + 19) / (served + errors + 20)
    load = min(1.0, in_flight / capacity) if capacity else 0.0
    latency = 1 / (1 + (first_token_ms or 0.0) / 5000)
    return round(success * (1 - 0.5 * load) * latency, 4)


def _json(value: str | None, default: Any) -> Any:
    try:
        return json.loads(value) if value else default
    except ValueError:
        return default


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def same_prefix(metadata: dict[str, str] | None, prefix: str) -> bool:
    """Whether a service with this micro ``metadata`` serves subjects under ``prefix``."""
    return (metadata or {}).get(PREFIX_KEY, DEFAULT_PREFIX) == prefix


def aggregate(
    infos: list[dict[str, Any]], stats: list[dict[str, Any]], prefix: str = DEFAULT_PREFIX
) -> list[SpecialistView]:
    """One view per specialist name of ``prefix`` from raw ``$SRV.INFO`` and ``$SRV.STATS`` answers."""
    data_by_id: dict[str, dict[str, Any]] = {}
    for s in stats:
        endpoints = s.get("endpoints") or [{}]
        data_by_id[s.get("id", "")] = endpoints[0].get("data") or {}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for info in infos:
        meta = info.get("metadata") or {}
        if meta.get("tekton_role") == SPECIALIST_ROLE and same_prefix(meta, prefix):
            by_name.setdefault(info["name"], []).append(info)
    views = []
    for name, replicas in sorted(by_name.items()):
        replicas.sort(key=lambda i: i["id"])
        meta = replicas[0].get("metadata") or {}
        conflicts = []
        for other in replicas[1:]:
            theirs = other.get("metadata") or {}
            differ = [k for k in _COMPARED if theirs.get(k) != meta.get(k)]
            if differ:
                conflicts.append(
                    f"replica {other['id']} differs from {replicas[0]['id']} in {', '.join(differ)}"
                )
        datas = [data_by_id.get(r["id"], {}) for r in replicas]
        served = sum(d.get("served", 0) for d in datas)
        errors = sum(d.get("errors", 0) for d in datas)
        in_flight = sum(d.get("in_flight", 0) for d in datas)
        capacity = sum(int(_number((r.get("metadata") or {}).get("max_concurrency")) or 0) for r in replicas)
        first = _weighted(datas, "avg_first_token_ms")
        avg = _weighted(datas, "avg_ms")
        views.append(
            SpecialistView(
                name=name,
                instances=[r["id"] for r in replicas],
                description=replicas[0].get("description") or "",
                primary=_json(meta.get("primary"), []),
                capabilities={str(k): float(v) for k, v in _json(meta.get("capabilities"), {}).items()},
                keywords=_json(meta.get("keywords"), []),
                examples=_json(_endpoint_meta(replicas[0]).get("examples"), []),
                provider=meta.get("provider", ""),
                model=meta.get("model", ""),
                max_tokens=int(n) if (n := _number(meta.get("max_tokens"))) else None,
                context_window=int(n) if (n := _number(meta.get("context_window"))) else None,
                cost_per_1k_tokens=_number(meta.get("cost_per_1k_tokens")),
                features=_json(meta.get("features"), []),
                prompts=_json(_endpoint_meta(replicas[0]).get("prompts"), {}),
                served=served,
                errors=errors,
                cancelled=sum(d.get("cancelled", 0) for d in datas),
                in_flight=in_flight,
                capacity=capacity,
                avg_ms=avg,
                avg_first_token_ms=first,
                health=health(served, errors, in_flight, capacity, first),
                conflicts=conflicts,
            )
        )
    return views


def _endpoint_meta(info: dict[str, Any]) -> dict[str, Any]:
    """The first endpoint's metadata in a ``$SRV.INFO`` answer (a specialist's chat endpoint)."""
    endpoints = info.get("endpoints") or [{}]
    meta = endpoints[0].get("metadata") if isinstance(endpoints[0], dict) else None
    return meta if isinstance(meta, dict) else {}


def _weighted(datas: list[dict[str, Any]], key: str) -> float | None:
    """The replicas' ``key`` averaged, weighted by how many requests each served."""
    pairs = [(float(d[key]), int(d.get("served", 0))) for d in datas if d.get(key) is not None]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    if not total:
        return round(sum(v for v, _ in pairs) / len(pairs), 3)
    return round(sum(v * w for v, w in pairs) / total, 3)


async def survey(
    nc: NATS,
    *,
    expected: int | None = None,
    window: float = 0.05,
    stall: float = STALL_S,
    known: dict[str, dict[str, Any]] | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> tuple[list[SpecialistView], int]:
    """Every running specialist (``$SRV.INFO`` and ``$SRV.STATS`` gathered at once, aggregated) and how
    many micro services answered (pass it as ``expected`` next time to stop as soon as all did).

    With ``known`` (instance id -> its ``$SRV.INFO`` answer, kept by the caller from one call to the
    next) only ``$SRV.STATS`` is gathered, and ``$SRV.INFO`` asked only of instances not known yet:
    an instance's INFO never changes, and with its example requests it is ten times its STATS."""
    if known is not None:
        return await _survey_known(nc, known, expected=expected, window=window, stall=stall, prefix=prefix)
    results: dict[str, list[dict[str, Any]]] = {}

    async def one(subject: str) -> None:
        results[subject] = await gather(nc, subject, expected=expected, window=window, stall=stall)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "$SRV.INFO")
        tg.start_soon(one, "$SRV.STATS")
    infos = results["$SRV.INFO"]
    return aggregate(infos, results["$SRV.STATS"], prefix), len(infos)


async def _survey_known(
    nc: NATS,
    known: dict[str, dict[str, Any]],
    *,
    expected: int | None,
    window: float,
    stall: float,
    prefix: str,
) -> tuple[list[SpecialistView], int]:
    stats = await gather(nc, "$SRV.STATS", expected=expected, window=window, stall=stall)
    answered = {str(s.get("id", "")): s for s in stats if s.get("id") and s.get("name")}

    async def info(instance: str, name: str) -> None:
        try:
            reply = await nc.request(f"$SRV.INFO.{name}.{instance}", b"", timeout=max(window, 0.5))
            known[instance] = json.loads(reply.data)
        except Exception:  # gone meanwhile, or not answering: the next refresh asks again
            return

    async with anyio.create_task_group() as tg:
        for instance, s in answered.items():
            if instance not in known:
                tg.start_soon(info, instance, str(s["name"]))
    if expected is None:  # a thorough look: forget instances that did not answer it
        for gone in set(known) - set(answered):
            del known[gone]
    infos = [known[i] for i in answered if i in known]
    return aggregate(infos, stats, prefix), len(stats)
