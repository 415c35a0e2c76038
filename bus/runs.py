"""Durable runs: an answer's frames, kept for a while in a JetStream stream so they can be read again.

A Tekton client asks for a run by giving a *run subject* as the request's reply subject::

    <prefix>.run.<user>.<run id>.f

Core NATS delivers each frame live to the subscribers of that subject (the fast path: the specialist
publishes once, with no JetStream acknowledgement to wait for), and the runs stream, which captures
``<prefix>.run.*.*.f``, keeps a copy. A client that lost frames (a reconnect, a crash, a browser reload)
reads them back from the stream after the last ``seq`` it saw, with an ordered consumer that also
follows the run live until its last frame. A specialist checks whether anyone still listens by
publishing an empty probe to the sibling subject ``...<run id>.p`` (which the stream does not capture)
with a reply subject: NATS answers "no responders" when nobody subscribes to ``...<run id>.*``.

This module opens no sockets of its own: it names subjects and builds the stream's configuration, and
its helpers take a connection.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.api import RawStreamMsg
from nats.js.errors import BadRequestError, NotFoundError

from bus.errors import RunNotFound
from bus.refusals import Refused, may_read_every_run, or_refused
from bus.settings import TektonSettings
from bus.subjects import (
    FRAMES,
    PROBE,
    USER_RE,
    run_listen_subject,
    run_subject,
    runs_filter,
    runs_stream_name,
)
from bus.wire import REQUEST_ID_RE, unpack_frame

__all__ = ["FRAMES", "PROBE", "run_listen_subject", "run_subject", "runs_filter", "runs_stream_name"]

RUNS_MAX_CONSUMERS = 20_000

# The frame types only a bulk run has (a chat run's first frame is ``start``; both have heartbeats).
BULK_TYPES = frozenset({"op_start", "op_chunk", "op_end", "bulk_done"})


@dataclass(frozen=True)
class RunRef:
    user: str
    run_id: str


def parse_run_subject(subject: str, prefix: str) -> RunRef | None:
    """``(user, run id)`` if ``subject`` is a run's frames subject under ``prefix``, else None."""
    head = f"{prefix}.run."
    if not subject.startswith(head):
        return None
    parts = subject[len(head) :].split(".")
    if len(parts) != 3 or parts[2] != FRAMES:
        return None
    user, run_id = parts[0], parts[1]
    if not USER_RE.match(user) or not REQUEST_ID_RE.match(run_id):
        return None
    return RunRef(user, run_id)


def answerable(reply: str, prefix: str) -> bool:
    """Whether an answer's frames may go to ``reply``: a client's own subject (an inbox) or a run's
    frames subject. Never a system or JetStream subject (``$KV...``: the frames would be stored as a
    session, ``$JS.API...``) nor another of ours (the sessions journal): under a server's
    ``allow_responses`` a specialist may publish to whatever reply subject it is handed."""
    if reply.startswith("$"):
        return False
    return not reply.startswith(f"{prefix}.") or parse_run_subject(reply, prefix) is not None


def probe_subject(frames_subject: str) -> str:
    """The probe subject next to a run's frames subject (not kept by the stream)."""
    return frames_subject[: -len(FRAMES)] + PROBE


def runs_stream_config(settings: TektonSettings) -> api.StreamConfig:
    """The runs stream: limits retention, oldest dropped first when the byte limit is reached.

    A message's age counts from when it was stored, so ``max_age`` is the longest a run may take (the
    specialists' request deadline) plus how long a finished run is kept: every run stays readable for
    at least ``runs_keep_s`` after its end.
    """
    return api.StreamConfig(
        name=runs_stream_name(settings.prefix),
        description="Tekton runs: every answer's frames, kept briefly for resume and attach",
        subjects=[runs_filter(settings.prefix)],
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=settings.request_timeout_s + settings.runs_keep_s,
        max_bytes=settings.runs_max_bytes,
        storage=api.StorageType.FILE if settings.runs_storage == "file" else api.StorageType.MEMORY,
        num_replicas=1,
        allow_direct=True,
        # Every resume and attach reads through a consumer of its own (gone 5 s after its reader).
        # Unset, nats-server 2.15 stops at 1,000 consumers on a stream, which 400 quick resumes in a
        # row reached (bench.runs); a stream's consumers cost the server little memory each.
        max_consumers=RUNS_MAX_CONSUMERS,
    )


async def ensure_runs_stream(nc: NATS, settings: TektonSettings, api_wait: float = 5.0) -> None:
    """Create the runs stream, or bring an existing one to this configuration."""
    js = nc.jetstream(timeout=api_wait)
    config = runs_stream_config(settings)
    try:
        await js.add_stream(config)
    except BadRequestError:  # exists with another configuration (e.g. a new retention)
        await js.update_stream(config)


async def last_message(nc: NATS, stream: str, subject: str) -> RawStreamMsg:
    """The last message on ``subject`` in ``stream``, by a direct get; :class:`Refused` at once when our
    credentials may not read it (another user's run), rather than after the request's timeout."""
    get = nc.jetstream().get_msg(stream, subject=subject, direct=True)
    return await or_refused(nc, f"$JS.API.DIRECT.GET.{stream}.{subject}", get)


async def run_kind(nc: NATS, settings: TektonSettings, subject: str) -> str | None:
    """``chat`` or ``bulk`` for a run kept in the stream, None when it is not (unknown, expired, not the
    asker's, or no runs stream). One direct get of its last frame; its first only after a heartbeat."""
    js = nc.jetstream()
    stream = runs_stream_name(settings.prefix)
    try:
        last = await last_message(nc, stream, subject)
    except Exception:  # NotFound, refused, a timeout or "no responders" (no stream): not kept for us
        return None
    kind = _frame(last.data).get("type")
    if kind == "heartbeat":
        kind = (await _first_frame(js, stream, subject)).get("type")
    return "bulk" if kind in BULK_TYPES or kind == "heartbeat" else "chat"


# How far back before a session run's "stored" note its done frame is looked for (other runs' frames
# are stored in between when the bus is busy).
DONE_LOOKBACK = 16


async def attach_end(nc: NATS, settings: TektonSettings, subject: str, run_id: str) -> int | None:
    """For a reader attaching to run ``run_id``: the seq of its last frame when it has ended (done,
    error or bulk_done), None while it runs; :class:`RunNotFound` when it is not kept for us. One direct
    get of its last stored message (two or more only for a session's run read by the gateway)."""
    stream = runs_stream_name(settings.prefix)
    try:
        last = await last_message(nc, stream, subject)
    except (NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError, Refused) as err:
        raise RunNotFound.named(run_id, settings.runs_keep_s) from err  # not kept, not ours, no stream
    return await _end_seq(nc, stream, subject, last)


async def _end_seq(nc: NATS, stream: str, subject: str, last: RawStreamMsg) -> int | None:
    """The seq of a finished run's done, error or bulk_done frame, given its ``last`` stored message; None
    while it runs, or when that cannot be told."""
    frame = _frame(last.data)
    if frame.get("type") == "stored" and last.seq and may_read_every_run(nc):
        # A session's run ends with the gateway's note after its done frame: a few messages back at
        # most, read by stream sequence (which needs the gateway's credentials: the HTTP bridge's).
        js = nc.jetstream()
        for back in range(last.seq - 1, max(0, last.seq - 1 - DONE_LOOKBACK), -1):
            try:
                before = await js.get_msg(stream, seq=back, direct=True)
            except Exception:  # expired, deleted, a timeout: cannot be told
                return None
            if before.subject == subject:
                frame = _frame(before.data)
                break
    seq = frame.get("seq")
    return seq if frame.get("type") in ("done", "error", "bulk_done") and type(seq) is int else None


@dataclass(frozen=True)
class RunSummary:
    """One run as ``aish runs`` lists it, read from the stream: its first and its last frame."""

    run_id: str
    specialist: str
    state: str  # running | done | error
    frames: int
    updated: float  # unix time of its last frame


async def list_runs(nc: NATS, settings: TektonSettings, user: str) -> list[RunSummary]:
    """The runs of ``user`` still kept in the stream, oldest first."""
    js = nc.jetstream()
    stream = runs_stream_name(settings.prefix)
    try:
        info = await js.stream_info(stream, subjects_filter=runs_filter(settings.prefix, user))
    except NotFoundError:
        return []
    found: list[RunSummary] = []
    for subject, count in (info.state.subjects or {}).items():
        ref = parse_run_subject(subject, settings.prefix)
        if ref is None:
            continue
        try:
            # Direct gets by subject: a permission can allow them on the user's own run subjects only.
            last = await js.get_msg(stream, subject=subject, direct=True)
        except NotFoundError:  # expired meanwhile
            continue
        head = await _first_frame(js, stream, subject)
        tail = _frame(last.data)
        # A session's run ends with the gateway's "stored" note, after its done frame; a bulk run with
        # bulk_done (its status: ok, partial, failed...).
        kind = tail.get("type")
        state = "done" if kind in ("done", "stored") else "error" if kind == "error" else "running"
        if kind == "bulk_done":
            state = "done" if tail.get("status") == "ok" else str(tail.get("status"))
        updated = last.time.timestamp() if last.time is not None else 0.0
        who = "bulk" if head.get("type") in BULK_TYPES else str(head.get("specialist", "?"))
        found.append(RunSummary(ref.run_id, who, state, count, updated))
    return sorted(found, key=lambda r: r.updated)


async def _first_frame(js: JetStreamContext, stream: str, subject: str) -> dict[str, object]:
    """A run's start frame, through a consumer on its subject (what a user's permissions allow; a
    direct get of the first message by subject cannot be limited to one's own subjects)."""
    config = api.ConsumerConfig(name=uuid.uuid4().hex)
    try:
        sub = await js.subscribe(subject, stream=stream, config=config, ordered_consumer=True)
    except Exception:  # expired meanwhile
        return {}
    try:
        return _frame((await sub.next_msg(timeout=1.0)).data)
    except Exception:
        return {}
    finally:
        await sub.unsubscribe()


def _frame(data: bytes | None) -> dict[str, object]:
    try:
        raw = unpack_frame(data or b"")
    except Exception:  # a frame we cannot read says nothing about the run's state
        return {}
    return raw if isinstance(raw, dict) else {}
