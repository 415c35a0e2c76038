"""One specialist replica on the bus: a NATS micro service whose ``chat`` endpoint streams answers.

The micro handler only decodes the request and hands it to its own task, so one slow answer never
blocks the next request. That also means micro's own ``processing_time`` measures dispatch only; the
real figures (served, errors, cancelled, in flight, average total and first-token ms) are in the
endpoint's ``data`` in ``$SRV.STATS``.

A stream yields to the event loop every few chunks, so a provider that produces as fast as it can
never holds up cancels, heartbeats or another request's start. Every ``heartbeat_s`` one frame of each
stream is published with a reply subject of ours: when nobody listens on the stream's subject any more
(the asker left without a cancel), NATS answers that probe with "no responders" and the request stops.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import Request
from nats.micro.service import Endpoint, EndpointStats, Service
from pydantic import ValidationError

from bus import tracing
from bus.auth import find_credentials
from bus.client import NothingPending, is_no_responders
from bus.discovery import PREFIX_KEY
from bus.errors import BudgetExceeded, BusError, DeadlineExceeded, ErrorCode
from bus.logs import refused
from bus.micro import add_service
from bus.runs import RunRef, answerable, ensure_runs_stream, parse_run_subject, probe_subject
from bus.settings import TektonSettings
from bus.subjects import (
    ANONYMOUS,
    DEFAULT_PREFIX,
    GATEWAY_USER,
    cancel_parts,
    cancel_wildcard,
    chat_subject,
    inbox_owner,
    queue_group,
    replay_wildcard,
)
from bus.usage import (
    SESSION_HEADER,
    USAGE_BATCH_S,
    OverBudget,
    budget_subject,
    encode_usage,
    over_budget,
    pack_records,
    price_of,
    usage_subject,
)
from bus.wire import (
    ChatMessage,
    ChatOptions,
    ChatRequest,
    ErrorFrame,
    HeartbeatFrame,
    StartFrame,
    Usage,
    decode_request,
    encode,
    encode_chunk,
    encode_done,
    unpack_frame,
)
from specialists.metrics import SpecialistMetrics
from specialists.models import ModelChoice, ModelPool
from specialists.placement import Placement
from specialists.providers.base import Provider, bind_conversation
from specialists.roster import SpecialistSpec
from specialists.tools import ToolBox
from specialists.tools import bind as bind_tools
from specialists.tracing import record_model_part

log = structlog.get_logger("tekton.specialist")

VERSION = "0.1.0"
# A stream yields the event loop after this long of producing without a pause: often enough that
# other requests and cancels wait at most a few ms, rarely enough that its frames still leave in
# large writes (a yield per few chunks costs a socket write each and slows a fast stream).
SLICE_S = 0.002
# The first slice is shorter: the first chunk leaves within this long of being produced, and an
# answer produced within it (a short or cached one) leaves in one write with its done frame.
FIRST_SLICE_S = 0.0002
# A token produced within this long of the one before it joins the frame being gathered instead of
# going out alone: a provider producing flat out sends one chunk frame per slice, not one per token
# (each frame costs the bus, JetStream's capture and the client as much as a token does), while a
# model that pauses between tokens still sends each as it comes. The first token always goes alone.
BURST_GAP_S = 0.0002
# Held tokens leave at once past this many characters: a burst's frame stays far under max_payload.
HELD_MAX_CHARS = 64 * 1024
# A cancel for a request not (yet) known here is remembered this long, in case the request follows.
EARLY_CANCEL_S = 30.0
EARLY_CANCEL_MAX = 10_000
# At most this many usage records in one message (~100 bytes each, well under max_payload).
USAGE_BATCH_MAX = 2_000
# A finished run's frames stay here this many idle timeouts after its last frame, for a client that
# lost its end (replay requests, below); at most this many finished runs, and frames in all, are kept.
FINISHED_KEEP_IDLE_TIMEOUTS = 2.0
FINISHED_KEEP_MAX = 1_000
FINISHED_KEEP_BYTES = 64 * 1024 * 1024
# A live run keeps at most this much; past it, it keeps nothing (a replay then falls to the stream).
RUN_KEEP_BYTES = 16 * 1024 * 1024
# A replay gives other requests a turn after this many frames.
REPLAY_SLICE = 256
# At most this many request tasks wait idle for the next request (see SpecialistService._dispatch).
IDLE_WORKERS_MAX = 256
# How long a draining replica waits for the answers it stopped to end (and be charged) before the last
# usage flush.
STOPPED_GRACE_S = 2.0


# A request to serve: the request, its reply stream, its cancel scope, and how it is traced (None:
# tracing is off).
_Job = tuple[ChatRequest, "ReplyStream", anyio.CancelScope, tracing.Trace | None]


class ReplyStream:
    """Frames of one answer, published to the request's reply subject with consecutive ``seq``."""

    def __init__(self, nc: NATS, subject: str, prefix: str = DEFAULT_PREFIX, run: RunRef | None = None):
        """``run``: the run ``subject`` is the frames subject of (parse_run_subject), None if none."""
        self.nc = nc
        self.subject = subject
        self.seq = 0
        self.chunks = 0  # tokens, whether each went in a frame of its own or with others
        self.last_sent = time.monotonic()
        # Tokens of a burst not sent yet (see BURST_GAP_S), and when the last token came.
        self.held: list[str] = []
        self.held_chars = 0
        self.token_at = 0.0
        self._flushing: asyncio.Future[None] | None = None
        # What a flush on the loop's turn failed with: raised by the answer's next frame instead.
        self._flush_failed: Exception | None = None
        self.listeners = RunListeners(subject, prefix, run is not None)
        # A run's frames as sent (index = seq), so a client that lost some can have them again from
        # here (a replay request) when the runs stream cannot serve them (its node is down).
        self.run = run
        self.kept: list[bytes] | None = [] if run is not None else None
        self.kept_bytes = 0
        self.last_probe = self.last_sent
        # Set by the ticker: the next frame goes out with this reply subject, as a "does anyone listen?"
        self.probe: str | None = None

    async def _publish(self, data: bytes) -> None:
        if self.kept is not None:
            self.kept.append(data)
            self.kept_bytes += len(data)
            if self.kept_bytes > RUN_KEEP_BYTES:
                self.kept = None
        self.seq += 1
        self.last_sent = time.monotonic()
        if self.probe is None:
            await self.nc.publish(self.subject, data)
        else:
            probe, self.probe = self.probe, None
            await self.nc.publish(self.subject, data, reply=probe)

    async def send_encoded(self, data: bytes) -> None:
        """``data`` must carry the current ``seq``: call :meth:`flush` before encoding it."""
        await self._publish(data)

    async def send(self, frame_type: type[Any], **fields: Any) -> None:
        await self.flush()
        await self._publish(encode(frame_type(seq=self.seq, **fields)))

    async def chunk(self, text: str) -> None:
        """One token: sent at once, or held with the rest of its burst until the producer pauses
        (the loop gets a turn), the stream yields at the end of a slice, or another frame follows."""
        self.chunks += 1
        self.check()
        now = time.monotonic()
        burst, self.token_at = now - self.token_at < BURST_GAP_S, now
        if burst:
            if not self.held:
                asyncio.get_running_loop().call_soon(self._flush_soon)
            self.held.append(text)
            self.held_chars += len(text)
            if self.held_chars > HELD_MAX_CHARS:
                await self.flush()
            return
        if self.held:  # (checked here: this is per token, and mostly nothing is held)
            await self.flush()
        await self._publish(encode_chunk(self.seq, text))

    def check(self) -> None:
        """Raise what a flush on the loop's turn failed with, in the answer's own task (not in the
        heartbeat ticker's, which sends through the same stream)."""
        if self._flush_failed is not None:
            failed, self._flush_failed = self._flush_failed, None
            raise failed

    async def flush(self) -> None:
        """Send the held tokens as one chunk frame."""
        if self.held:
            text = "".join(self.held)
            self.held, self.held_chars = [], 0
            await self._publish(encode_chunk(self.seq, text))

    def _flush_soon(self) -> None:
        # The loop got a turn with tokens still held: the producer is waiting (a model between
        # tokens, a slot, a tool), so what it made so far goes now, not with its next token.
        if self.held and self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        try:
            while self.held:
                await self.flush()
        except Exception as err:  # (a lost connection, say) the answer's next frame raises it
            self._flush_failed = err
        finally:
            self._flushing = None

    async def error(self, err: BusError) -> None:
        """End the answer with ``err``'s error frame. Never raises: it is sent where a failure is being
        handled already (a request's own task, or a task of the service's group, which one raising
        error would end), and a frame that cannot go (the connection lost, its buffer full while it
        reconnects) leaves the asker to its idle timeout."""
        if err.http_status >= 500:  # a server-side failure (not the caller's: a bad request, a cancel)
            tracing.fail(tracing.current_recording(), err.message)  # marks the request's span, if any
        try:
            await self.send(ErrorFrame, code=str(err.code), message=err.message, retryable=err.retryable)
        except Exception as failed:
            log.warning(
                "error frame not sent", code=str(err.code), error=str(failed) or type(failed).__name__
            )


class RunListeners:
    """Whether anyone still follows a run (bus/runs.py): an empty probe goes to the run's probe subject
    every ``heartbeat_s`` with a reply subject of ours; NATS answers "no responders" when nobody
    subscribes there. Nobody for the whole resume window (or at once for a detached run: never) and
    the run stops. Streams that are not runs are none of its business."""

    def __init__(self, subject: str, prefix: str, run: bool | None = None):
        """``run``: whether ``subject`` is a run's (None: find out)."""
        if run is None:
            run = parse_run_subject(subject, prefix) is not None
        self.probe = probe_subject(subject) if run else None
        self.detached = False
        self.probed_at = 0.0
        self.unheard_at = 0.0  # the last "no responders"
        self.unheard_since: float | None = None

    def tick(self, now: float, window: float, answer_within: float) -> bool:
        """Called every half heartbeat; True when the run should stop for want of listeners. A probe
        with no "no responders" within ``answer_within`` seconds found someone."""
        if self.probed_at and self.unheard_at < self.probed_at and now - self.probed_at >= answer_within:
            self.unheard_since = None  # the last probe found someone
        return self.unheard_since is not None and not self.detached and now - self.unheard_since >= window

    def unheard(self, now: float) -> None:
        self.unheard_at = now
        if self.unheard_since is None:
            self.unheard_since = now


class _Slot:
    """One of ``max_concurrency`` generation slots, counted by a semaphore. A free one is taken
    without a checkpoint, and neither taking nor giving one back looks up the current task (as
    ``CapacityLimiter`` does three times per request: ~1/10 of a short answer's CPU in the profiles)."""

    __slots__ = ("_slots",)

    def __init__(self, slots: anyio.Semaphore):
        self._slots = slots

    async def __aenter__(self) -> None:
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()


class _RequestLog:
    """The service's logger with the request's id, bound only when something is logged (most answers
    log nothing at the default level; a bound logger per request cost more than that)."""

    __slots__ = ("_log", "_request_id")

    def __init__(self, log: Any, request_id: str):
        self._log, self._request_id = log, request_id

    def __getattr__(self, level: str) -> Any:
        return partial(getattr(self._log, level), request_id=self._request_id)


class _TakeAtOnce(NothingPending):
    """Stands in for the chat endpoint subscription's pending queue: a request is taken there and
    then, with no asyncio queue, no subscription task and no micro wrapper between the read loop and
    the request's own task: one event-loop turn less before the first chunk. micro's request count is
    kept; its processing time measured dispatch only anyway (see the module's docstring)."""

    __slots__ = ("_endpoint", "_sub", "_take")

    def __init__(self, sub: Any, endpoint: Endpoint, take: Callable[[Msg], None]):
        self._sub, self._endpoint, self._take = sub, endpoint, take

    @classmethod
    def install(cls, sub: Any, endpoint: Endpoint, take: Callable[[Msg], None]) -> None:
        if sub is not None and hasattr(sub, "_pending_queue") and hasattr(sub, "_pending_size"):
            sub._pending_queue = cls(sub, endpoint, take)  # (another nats-py: micro's own path)

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)
        self._endpoint._num_requests += 1
        self._take(msg)

    async def get(self) -> Msg:  # the subscription's own task waits here until it is cancelled
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


@dataclass
class ServiceCounters:
    served: int = 0
    errors: int = 0
    cancelled: int = 0
    # Of the cancelled: stopped because nobody listened any more (the asker left without a cancel).
    abandoned: int = 0
    in_flight: int = 0
    total_ms: float = 0.0
    first_token_ms: float = 0.0
    first_tokens: int = 0

    def as_data(self) -> dict[str, Any]:
        data: dict[str, Any] = asdict(self)
        data["avg_ms"] = round(self.total_ms / self.served, 3) if self.served else None
        data["avg_first_token_ms"] = (
            round(self.first_token_ms / self.first_tokens, 3) if self.first_tokens else None
        )
        return data


class SpecialistService:
    def __init__(
        self,
        nc: NATS,
        spec: SpecialistSpec,
        provider: Provider,
        settings: TektonSettings,
        task_group: TaskGroup,
        models: ModelPool | None = None,
    ):
        self.nc = nc
        self.spec = spec
        self._span_name = f"serve {spec.name}"
        self.provider = provider
        # Providers for the models requests name (``-m ollama:qwen2.5:7b``), built on first use.
        self.models = models
        self.settings = settings
        self._tg = task_group
        n = settings.max_concurrency
        self._slots = anyio.Semaphore(n, max_value=n, fast_acquire=True)
        self._scopes: dict[str, anyio.CancelScope] = {}
        # Cancels that arrived before their request: request id -> (when (monotonic), who sent it),
        # oldest first.
        self._early_cancels: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._probe_prefix = nc.new_inbox()
        self._probe_sub: Any = None
        # Whose each request is (the user whose inbox gets its answer): only they may cancel it.
        self._owners: dict[str, str] = {}
        self._streaming: dict[str, ReplyStream] = {}
        # Runs served here, by run id: live ones, then finished ones (with when they expire) for a
        # while: what a replay request reads from.
        # Keyed by (user, run id): the run id is the request's, which its client chose.
        self._runs: dict[tuple[str, str], ReplyStream] = {}
        self._finished_runs: OrderedDict[tuple[str, str], tuple[float, ReplyStream]] = OrderedDict()
        self._finished_bytes = 0
        self._replay_sub: Any = None
        self._idle: anyio.Event | None = None  # set when the last request ends, while a drain waits
        self._draining = False
        self.counters = ServiceCounters()
        self.metrics = SpecialistMetrics()
        self._service: Service | None = None
        self._cancel_sub: Any = None
        self.tools: ToolBox | None = None  # the roster entry's MCP servers, connected at start
        self._over_budget: frozenset[str] = frozenset()  # users the gateway says are over budget
        self._budget_resets: dict[str, float] = {}  # and when the budget restarts, for those with a period
        self._usage_sessions: dict[str, str] = {}  # request id -> session, for the usage record
        self._usage_out: dict[str, list[bytes]] = {}  # owner -> usage records not published yet
        self._usage_due = anyio.Event()
        self._tools_stop = anyio.Event()
        self._run_probe_sub: Any = None
        self._run_probes = ""
        self.placement: Placement | None = None
        self.log = log.bind(specialist=spec.name)
        # Per-request work kept off the hot path: the persona message, the roster's default options
        # and the start frame (always seq 0, the same for every answer of one model) are built once.
        self._system = ChatMessage(role="system", content=spec.system_prompt)
        self._defaults = spec.options.model_dump(exclude_none=True)
        self._default_options = ChatOptions.model_construct(**self._defaults)  # shared: never changed
        self._start_frames: dict[tuple[str, str], bytes] = {}
        # Request tasks done with their request, each waiting on its future for the next one.
        self._idle_workers: deque[asyncio.Future[_Job]] = deque()

    @property
    def instance_id(self) -> str:
        return self._service.id if self._service else ""

    async def start(self) -> None:
        await self._ensure_runs_stream()
        if self.spec.mcp_servers:
            self.tools = await self._tg.start(ToolBox().run, self.spec.mcp_servers, self._tools_stop)
        self._cancel_sub = await self.nc.subscribe(cancel_wildcard(self.settings.prefix), cb=self._on_cancel)
        self._budget_sub = await self.nc.subscribe(budget_subject(self.settings.prefix), cb=self._on_budget)
        self._probe_sub = await self.nc.subscribe(f"{self._probe_prefix}.*", cb=self._on_probe_answer)
        self._replay_sub = await self.nc.subscribe(replay_wildcard(self.settings.prefix), cb=self._on_replay)
        self._service = await add_service(
            self.nc,
            self.settings.prefix,
            name=self.spec.name,
            version=VERSION,
            description=self.spec.description,
            metadata={
                **self.spec.micro_metadata(
                    self.models.own.provider if self.models else self.provider.name, self.provider.model
                ),
                "max_concurrency": str(self.settings.max_concurrency),
                PREFIX_KEY: self.settings.prefix,
            },
            stats_handler=self._stats_data,
        )
        await self._service.add_endpoint(
            name="chat",
            subject=chat_subject(self.spec.name, self.settings.prefix),
            queue_group=queue_group(self.spec.name, self.settings.prefix),
            handler=self._on_chat,
            metadata=self.spec.endpoint_metadata(),
        )
        self._take_at_once(self._service._endpoints[-1])
        self._run_probes = self.nc.new_inbox()
        self._run_probe_sub = await self.nc.subscribe(f"{self._run_probes}.*", cb=self._on_run_probe)
        if self.settings.placement == "slots":
            self.placement = Placement(
                self.nc,
                self._service,
                self._service._endpoints[-1],
                name=self.spec.name,
                prefix=self.settings.prefix,
                slots=self.settings.max_concurrency,
                interval=self.settings.heartbeat_s,
            )
            await self.placement.start(self._tg, self._on_direct)
        self._tg.start_soon(self._heartbeats)
        self._tg.start_soon(self._send_usage)
        await self.nc.flush()
        self.log.info("specialist ready", instance=self.instance_id, provider=self.provider.name)

    async def _on_direct(self, msg: Msg) -> None:
        """A request another replica forwarded to us (placement.py)."""
        self._take(msg)

    def _take_at_once(self, endpoint: Endpoint) -> None:
        """Requests to ``endpoint`` are taken by the read loop as they arrive (:class:`_TakeAtOnce`),
        now and whenever placement subscribes it again."""
        _TakeAtOnce.install(endpoint._subscription, endpoint, self._take)
        start = endpoint._start

        async def start_taking_at_once() -> None:
            await start()
            _TakeAtOnce.install(endpoint._subscription, endpoint, self._take)

        endpoint._start = start_taking_at_once  # type: ignore[method-assign]

    async def _ensure_runs_stream(self) -> None:
        """Create the runs stream when nobody has (the gateway does where a specialist may not)."""
        if find_credentials(self.settings.creds, self.settings.data_dir, "specialist") is not None:
            # Signed in with a role: the specialist role may not create streams (bus/auth.py), and
            # trying would only put a permissions violation in every log.
            return
        try:
            # Short: where a specialist may not create streams the server only says so in an -ERR.
            await ensure_runs_stream(self.nc, self.settings, api_wait=0.5)
        except Exception as err:  # no JetStream, or no right to it: the gateway's job then
            self.log.info("runs stream not created here", error=str(err) or type(err).__name__)

    def _stats_data(self, _endpoint: EndpointStats) -> dict[str, Any]:
        free, total = self._slots.value, self.settings.max_concurrency
        data = {**self.counters.as_data(), **self.metrics.snapshot()}
        # Counted live, so a rate shows while answers stream, not only when they end.
        data["tekton_tokens_out"] += sum(r.chunks for r in list(self._streaming.values()))
        data.update(slots=total, busy=total - free, queued=self._slots.statistics().tasks_waiting)
        return data

    async def _on_cancel(self, msg: Msg) -> None:
        # The server lets a user publish cancels under their own name only; a request is that user's
        # when its answer goes to their inbox.
        user, request_id = cancel_parts(msg.subject)
        scope = self._scopes.get(request_id)
        owner = self._owners.get(request_id)
        if scope is not None and owner is not None and owner != user:
            self.log.warning("cancel refused: not the asker's request", request_id=request_id, user=user)
            return
        if scope is not None:
            self.log.info("cancel received", request_id=request_id)
            scope.cancel()
            return
        # Perhaps its request is still on its way (another subscription, another task): remember it.
        now = time.monotonic()
        early = self._early_cancels
        early[request_id] = (now, user)
        early.move_to_end(request_id)
        while early and (
            len(early) > EARLY_CANCEL_MAX or now - next(iter(early.values()))[0] > EARLY_CANCEL_S
        ):
            early.popitem(last=False)

    def _cancelled_early(self, request_id: str, owner: str) -> bool:
        """A cancel for this request came before it, from its own user, not too long ago."""
        early = self._early_cancels.pop(request_id, None)
        return early is not None and early[1] == owner and time.monotonic() - early[0] <= EARLY_CANCEL_S

    async def _on_probe_answer(self, msg: Msg) -> None:
        """NATS's "no responders" to a probe: nobody subscribes to that stream's subject any more."""
        if not is_no_responders(msg):
            return
        request_id = msg.subject.rsplit(".", 1)[-1]
        scope = self._scopes.get(request_id)
        if scope is not None and not scope.cancel_called:
            self.log.info("nobody listens any more; stopping", request_id=request_id)
            self.counters.abandoned += 1
            scope.cancel()

    async def _on_run_probe(self, msg: Msg) -> None:
        if is_no_responders(msg):
            reply = self._streaming.get(msg.subject.rsplit(".", 1)[-1])
            if reply is not None:
                reply.listeners.unheard(time.monotonic())

    async def _on_replay(self, msg: Msg) -> None:
        """A client lost frames of one of its runs: send the frames after ``seq`` (the payload, as
        decimal text) to the request's reply subject, then an empty message (the end of the replay).
        Runs of other replicas are theirs to answer. Only the run's own user may have it, into their
        own inbox (or the gateway's, whose bridge resumes for its callers): nats-server lets a user
        publish replay requests only under their own name (bus/auth.py), and the reply subject is
        theirs to choose, so it is checked here."""
        user, run_id = cancel_parts(msg.subject)
        key = (user, run_id)
        reply = self._runs.get(key)
        if reply is None:
            finished = self._finished_runs.get(key)
            reply = finished[1] if finished is not None else None
        if reply is None or reply.kept is None or reply.run is None or not msg.reply:
            return
        if reply.run.user != user or inbox_owner(msg.reply) not in (user, GATEWAY_USER):
            self.log.warning("replay refused: not the asker's run or inbox", request_id=run_id, user=user)
            return
        try:
            after = int(msg.data or b"-1")
        except ValueError:
            self.log.warning("unreadable replay request", request_id=run_id)
            return
        # A copy, taken at once: frames sent from now on go to the run's subject, where the client
        # listens again before asking.
        kept = reply.kept[max(0, after + 1) :]
        for n, data in enumerate(kept, 1):
            await self.nc.publish(msg.reply, data)
            if n % REPLAY_SLICE == 0:
                await anyio.lowlevel.checkpoint()  # a long replay lets other requests in
        await self.nc.publish(msg.reply, b"")
        self.log.info("run replayed", request_id=run_id, after=after, upto=after + len(kept))

    def _finish_run(self, reply: ReplyStream, now: float) -> None:
        """A run ended: keep its frames a while for replays (then :meth:`_drop_finished`)."""
        assert reply.run is not None
        key = (reply.run.user, reply.run.run_id)
        if self._runs.get(key) is reply:
            del self._runs[key]
        if reply.kept is not None:
            earlier = self._finished_runs.pop(key, None)  # a retry with the same id: the latest
            if earlier is not None:
                self._finished_bytes -= earlier[1].kept_bytes
            keep = FINISHED_KEEP_IDLE_TIMEOUTS * self.settings.idle_timeout_s
            self._finished_runs[key] = (now + keep, reply)
            self._finished_bytes += reply.kept_bytes
        self._drop_finished(now)

    def _drop_finished(self, now: float) -> None:
        finished = self._finished_runs
        while finished and (
            len(finished) > FINISHED_KEEP_MAX
            or self._finished_bytes > FINISHED_KEEP_BYTES
            or next(iter(finished.values()))[0] <= now
        ):
            _, (_, reply) = finished.popitem(last=False)
            self._finished_bytes -= reply.kept_bytes

    async def _on_chat(self, req: Request) -> None:
        """micro's handler for the chat endpoint (where :class:`_TakeAtOnce` does not stand in)."""
        self._take(req._msg)

    def _take(self, msg: Msg, forward: bool = True) -> None:
        """A chat request, taken where it is read: registered, then served by a request task (one at a
        time: :meth:`_dispatch`). ``forward``: sent on to a replica with room if this one is full.
        Nothing here waits; what must (an error frame, a forward) goes in a task too."""
        try:
            self._take_request(msg, forward)
        except Exception:  # a service never dies of one request (nor stops reading: we are in its loop)
            self.log.exception("chat request not taken")

    async def _forward(self, msg: Msg, subject: str, headers: dict[str, str]) -> None:
        """Send a request on to the replica that has room; if it cannot be sent, serve it here."""
        try:
            await self.nc.publish(subject, msg.data, reply=msg.reply, headers=headers)
        except Exception as err:  # (a service never dies of one request: it waited for a slot here)
            self.log.warning("request not forwarded; served here", error=str(err) or type(err).__name__)
            self._take(msg, forward=False)

    def _take_request(self, msg: Msg, forward: bool = True) -> None:
        reply_to = msg.reply
        if not reply_to:
            refused.warning(self.log, "chat request without a reply subject dropped")
            return
        run = parse_run_subject(reply_to, self.settings.prefix)
        if run is None and not answerable(reply_to, self.settings.prefix):  # nobody may be answered there
            self.counters.errors += 1
            refused.warning(
                self.log, "chat request with a reply subject no client reads dropped", reply=reply_to[:120]
            )
            return
        reply = ReplyStream(self.nc, reply_to, self.settings.prefix, run)
        if self._draining:
            err = BusError("this replica is shutting down", code=ErrorCode.SHUTTING_DOWN, retryable=True)
            self._tg.start_soon(reply.error, err)
            return
        target = self.placement.forward_target(msg) if self.placement and forward else None
        if target is not None:  # full here, room on another replica: send it there (placement.py)
            self._tg.start_soon(self._forward, msg, *target)
            return
        try:
            request = decode_request(msg.data)
        except BusError as err:
            self.counters.errors += 1
            self.log.warning("bad request", error=err.message)
            self._tg.start_soon(reply.error, err)
            return
        owner = inbox_owner(reply_to) or (run.user if run else ANONYMOUS)
        if owner in self._over_budget:
            self.counters.errors += 1  # (refused: it ends in an error frame, as a bad request does)
            over = BudgetExceeded(over_budget(owner, self._budget_resets.get(owner)))
            self._tg.start_soon(reply.error, over)
            return
        headers = msg.headers
        if headers and SESSION_HEADER in headers:
            self._usage_sessions[request.id] = headers[SESSION_HEADER]
        self.counters.in_flight += 1
        self.metrics.requests.inc()
        if self.placement:
            self.placement.update(self.counters.in_flight)
        # Registered before the task starts, so a cancel between now and then finds it.
        scope = anyio.CancelScope()
        self._scopes[request.id] = scope
        self._owners[request.id] = owner
        if reply.run is not None:
            self._runs[(reply.run.user, reply.run.run_id)] = reply
        if self._cancelled_early(request.id, owner):
            scope.cancel()
        # A traced request goes the same way, to a waiting task (a task of its own per request cost
        # ~14 us, paid also by the requests a sampler then leaves out).
        self._dispatch((request, reply, scope, tracing.admit(headers, self._span_name)))

    def _dispatch(self, job: _Job) -> None:
        """Serve a request in a task of the service's task group: one that finished its request and
        waits for the next (:meth:`_worker`), else a new one. Handing a request to a waiting task costs
        ~2.6 us against ~14 us for ``start_soon`` (anyio makes a handle, a cancel scope and an event
        per task); each request still runs in its own cancel scope, and every task is the task
        group's, cancelled with it."""
        idle = self._idle_workers
        while idle:
            waiting = idle.popleft()
            if not waiting.done():  # (done: cancelled, its task is gone)
                waiting.set_result(job)
                return
        self._tg.start_soon(self._worker, job)

    async def _worker(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request, reply, scope, trace = job
            del job  # an idle task holds no finished request (its frames, for a run)
            if trace is None:
                await self._serve(request, reply, scope)
            elif trace.passed is not None:  # sampled out: served plainly, its trace context passed on
                passing = tracing.pass_on(trace)
                try:
                    await self._serve(request, reply, scope)
                finally:
                    tracing.passed(passing)
            else:
                await self._serve_traced(request, reply, scope, trace)
            del request, reply, scope, trace
            if len(self._idle_workers) >= IDLE_WORKERS_MAX:
                return
            waiting: asyncio.Future[_Job] = loop.create_future()
            self._idle_workers.append(waiting)
            job = await waiting

    async def _on_budget(self, msg: Msg) -> None:
        try:
            notice = OverBudget.model_validate(unpack_frame(msg.data))
            self._over_budget, self._budget_resets = frozenset(notice.users), notice.resets
        except (BusError, ValidationError) as err:
            self.log.warning("unreadable budget notice", error=str(err))

    def _cost(
        self, provider: str, model: str, prompt_tokens: int | None, completion_tokens: int
    ) -> float | None:
        """USD for an answer, where the config's price table (or the roster's flat price) prices the
        model; None where nothing does (the local and scripted models, unless configured)."""
        price = price_of(self.settings.prices, provider, model)
        if price is not None:
            return price.cost(prompt_tokens or 0, completion_tokens)
        if self.spec.cost_per_1k_tokens:
            return round(((prompt_tokens or 0) + completion_tokens) / 1000 * self.spec.cost_per_1k_tokens, 8)
        return None

    def _report_usage(
        self,
        request_id: str,
        owner: str,
        session: str | None,
        prompt_tokens: int | None,
        completion_tokens: int,
        cost: float | None,
    ) -> None:
        """What this answer cost, to ``owner``'s usage book (fire and forget), with the other records
        of the next ``USAGE_BATCH_S`` (see :meth:`_send_usage`). The owner and session are the ones
        the request came with (a request id is the client's: another request may reuse it)."""
        record = encode_usage(
            request_id,
            self.spec.name,
            session,
            prompt_tokens or 0,
            completion_tokens,
            cost or 0.0,
        )
        self._usage_out.setdefault(owner, []).append(record)
        self._usage_due.set()

    async def _send_usage(self) -> None:
        """Usage records a batch at a time: one message per user every ``USAGE_BATCH_S`` at most, so
        a busy replica does not wake the gateway (and nats-server) once more per answer."""
        while True:
            await self._usage_due.wait()
            await anyio.sleep(USAGE_BATCH_S)
            self._usage_due = anyio.Event()
            await self._flush_usage()

    async def _flush_usage(self) -> None:
        batch, self._usage_out = self._usage_out, {}
        for owner, records in batch.items():
            for i in range(0, len(records), USAGE_BATCH_MAX):
                try:
                    await self.nc.publish(
                        usage_subject(owner, self.settings.prefix),
                        pack_records(records[i : i + USAGE_BATCH_MAX]),
                    )
                except Exception as err:  # no connection: these counts are lost, the service goes on
                    self.log.warning(
                        "usage records not sent", user=owner, error=str(err) or type(err).__name__
                    )

    async def _serve_traced(
        self, request: ChatRequest, reply: ReplyStream, scope: anyio.CancelScope, trace: tracing.Trace
    ) -> None:
        """:meth:`_serve` inside its span (continuing the caller's trace, if any)."""
        attributes = {"tekton.request_id": request.id, "tekton.instance": self.instance_id}
        with tracing.current(self._span_name, "server", trace, attributes) as span:
            await self._serve(request, reply, scope, span)

    @property
    def _slot(self) -> _Slot:
        return _Slot(self._slots)

    def _start_frame(self, provider: str, model: str) -> bytes:
        frame = self._start_frames.get((provider, model))
        if frame is None:
            start = StartFrame(
                specialist=self.spec.name, instance=self.instance_id, provider=provider, model=model
            )
            frame = self._start_frames[provider, model] = encode(start)
        return frame

    def _prompt(self, request: ChatRequest) -> tuple[list[ChatMessage], ChatOptions]:
        messages = [self._system, *request.messages]
        if not request.options.model_fields_set:  # none given (most requests): the roster's, built once
            return messages, self._default_options
        given = request.options.model_dump(exclude_none=True)
        # Both sides are validated ChatOptions already: merging them needs no second validation.
        return messages, ChatOptions.model_construct(**{**self._defaults, **given})

    async def _serve(
        self, request: ChatRequest, reply: ReplyStream, scope: anyio.CancelScope, span: Any = None
    ) -> None:
        """Answer ``request``; ``span``: its span, if it is traced (the model's part goes on it)."""
        log = _RequestLog(self.log, request.id)
        received = time.perf_counter()
        first_token: float | None = None
        slice_start = 0.0
        tokens = 0
        reported: Usage | None = None
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.settings.request_timeout_s
        bind_tools(self.tools, reply.send)
        owner, session = self._owners.get(request.id, ANONYMOUS), self._usage_sessions.get(request.id)
        bind_conversation(owner, session)
        leased: ModelChoice | None = None  # a request-named model, given back at the end
        charged = False  # its usage sent to the gateway's book
        provider, provider_name = self.provider, self.provider.name
        try:
            messages, options = self._prompt(request)  # inside: whatever fails is this request's error
            with scope:
                if self.models is not None:
                    choice, provider = await self.models.get(request.model)
                    provider_name = choice.provider
                    leased = choice if request.model else None
                await reply.send_encoded(self._start_frame(provider_name, provider.model))
                reply.listeners.detached = bool(request.detach)
                self._streaming[request.id] = reply  # the heartbeat ticker watches it from now on
                # The deadline, on the request's own scope: a second scope per request cost as much
                # again (see the check after the scope).
                scope.deadline = anyio.current_time() + timeout
                try:
                    # aclosing: a stopped answer releases the provider (its model) now, not
                    # whenever the abandoned generator is collected.
                    async with (
                        self._slot,
                        aclosing(provider.stream(messages, options)) as texts,  # type: ignore[type-var]
                    ):
                        async for text in texts:
                            if isinstance(text, Usage):  # a provider's own count (see Provider)
                                reported = text
                                continue
                            await reply.chunk(text)
                            tokens += 1
                            if first_token is None:
                                first_token = time.perf_counter()
                                slice_start = reply.token_at - SLICE_S + FIRST_SLICE_S
                            elif reply.token_at - slice_start >= SLICE_S:
                                # A provider producing flat out never suspends (a publish only
                                # buffers), so nothing else in this process would run: not
                                # other requests, not the read loop that brings its cancel.
                                # The slice's tokens leave as one frame.
                                slice_start = reply.token_at
                                await reply.flush()
                                await anyio.lowlevel.checkpoint()
                finally:
                    self._streaming.pop(request.id, None)
                    record_model_part(  # a failed answer's too: how far it got, and when
                        span,
                        provider_name,
                        provider.model,
                        output_tokens=reported.completion_tokens if reported else tokens,
                        prompt_tokens=reported.prompt_tokens if reported else None,
                        first_token_at=first_token,
                    )
                total = time.perf_counter() - received
                gen = total - (first_token - received) if first_token else 0.0
                if self.placement:
                    await self.placement.finishing()
                prompt_tokens = reported.prompt_tokens if reported else None
                completion_tokens = reported.completion_tokens if reported else tokens
                cost = self._cost(provider_name, provider.model, prompt_tokens, completion_tokens)
                await reply.flush()
                reply.check()
                await reply.send_encoded(
                    encode_done(
                        reply.seq,
                        "length" if options.max_tokens and tokens >= options.max_tokens else "stop",
                        completion_tokens=completion_tokens,
                        prompt_tokens=prompt_tokens,
                        total_ms=round(total * 1000, 3),
                        first_token_ms=round((first_token - received) * 1000, 3) if first_token else None,
                        tokens_per_s=round((tokens - 1) / gen, 2) if tokens > 1 and gen > 0 else None,
                        cost=cost,
                    )
                )
                self.counters.served += 1
                self.counters.total_ms += total * 1000
                self.metrics.done(prompt_tokens, total)
                self._report_usage(request.id, owner, session, prompt_tokens, completion_tokens, cost)
                charged = True
                if first_token:
                    self.counters.first_tokens += 1
                    self.counters.first_token_ms += (first_token - received) * 1000
                log.debug("served", tokens=tokens, total_ms=round(total * 1000, 1))
            if scope.cancelled_caught and anyio.current_time() >= scope.deadline:
                raise TimeoutError  # stopped by its deadline (whatever else asked it to stop too)
            if scope.cancelled_caught:
                self.counters.cancelled += 1
                log.info("generation stopped", tokens=tokens, draining=self._draining)
                # The asker has stopped listening, but an observer (the gateway recording a session)
                # has not: the stream still ends with one closing frame.
                if self._draining:
                    await reply.error(
                        BusError(
                            "the replica shut down mid-answer", code=ErrorCode.SHUTTING_DOWN, retryable=True
                        )
                    )
                else:
                    await reply.error(BusError("cancelled by the client", code=ErrorCode.CANCELLED))
        except TimeoutError:
            self.counters.errors += 1
            await reply.error(
                DeadlineExceeded(f"'{self.spec.name}' did not finish within its {timeout:g} s deadline")
            )
        except BusError as err:
            self.counters.errors += 1
            log.warning("request failed", code=str(err.code), error=err.message)
            await reply.error(err)
        except Exception as err:
            self.counters.errors += 1
            log.exception("request crashed")
            await reply.error(BusError(f"'{self.spec.name}' failed: {type(err).__name__}: {err}"))
        finally:
            if not charged and (tokens or reported):
                # Stopped (cancelled, past its deadline, failed) part way: what the model made is
                # spent all the same, and a budget counts it (else stopping every answer just before
                # its end would get answers for free).
                prompt, made = (
                    (None, tokens)
                    if reported is None
                    else (reported.prompt_tokens, reported.completion_tokens)
                )
                try:
                    cost = self._cost(provider_name, provider.model, prompt, made)
                    self._report_usage(request.id, owner, session, prompt, made, cost)
                except Exception:  # (this is a finally: the request's own error, if any, goes on)
                    log.exception("usage of a stopped answer not recorded")
            if leased is not None and self.models is not None:
                self.models.release(leased)
            self._scopes.pop(request.id, None)
            if reply.run is not None:
                self._finish_run(reply, time.monotonic())
            self.metrics.tokens_out.inc(reply.chunks)
            if first_token is not None:  # (an answer stopped or failed later waited for it all the same)
                self.metrics.first_chunk.observe(first_token - received)
            self._owners.pop(request.id, None)
            self._usage_sessions.pop(request.id, None)
            self.counters.in_flight -= 1
            if self.placement:
                self.placement.update(self.counters.in_flight)
            if self.counters.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def _heartbeats(self) -> None:
        """One ticker per service: a stream silent for ``heartbeat_s`` (model thinking, or waiting for a
        free slot) gets a heartbeat, so the client can tell "slow" from "dead". Every ``heartbeat_s``
        a stream's next frame also probes whether anyone still listens (see :meth:`_on_probe_answer`)."""
        interval = self.settings.heartbeat_s
        while True:
            await anyio.sleep(interval / 2)
            now = time.monotonic()
            self._drop_finished(now)
            for request_id, reply in list(self._streaming.items()):
                # Runs are probed on their own probe subject (_check_listeners): a frame with a reply
                # subject to a run would be acknowledged by JetStream, never "no responders".
                if reply.listeners.probe is None and now - reply.last_probe >= interval:
                    reply.last_probe = now
                    reply.probe = f"{self._probe_prefix}.{request_id}"
                if now - reply.last_sent >= interval:
                    try:
                        await reply.send(HeartbeatFrame)
                    except Exception as err:  # (no connection) the answer's own next frame fails too
                        self.log.debug("heartbeat not sent", request_id=request_id, error=str(err))
                await self._check_listeners(request_id, reply, now)

    async def _check_listeners(self, request_id: str, reply: ReplyStream, now: float) -> None:
        listeners = reply.listeners
        if listeners.probe is None:
            return
        if listeners.tick(now, self.settings.run_resume_window_s, self.settings.heartbeat_s / 2):
            scope = self._scopes.get(request_id)
            if scope is not None and not scope.cancel_called:
                self.log.info("nobody followed the run for its resume window", request_id=request_id)
                scope.cancel()
            return
        if now - listeners.probed_at >= self.settings.heartbeat_s:
            listeners.probed_at = now
            await self.nc.publish(listeners.probe, b"", reply=f"{self._run_probes}.{request_id}")

    async def drain(self, grace: float) -> None:
        """Take no new requests; let in-flight streams finish for up to ``grace`` seconds, then stop them."""
        self._draining = True
        if self.placement is not None:
            await self.placement.stop()
        if self._service is not None:
            await self._service.stop()
        if self.counters.in_flight:
            self._idle = anyio.Event()
            with anyio.move_on_after(grace):
                await self._idle.wait()
        for scope in list(self._scopes.values()):
            scope.cancel()
        if self.counters.in_flight:  # the stopped answers end (and are charged) before the last flush
            self._idle = anyio.Event()
            with anyio.move_on_after(STOPPED_GRACE_S):
                await self._idle.wait()
        if self._cancel_sub is not None:
            await self._cancel_sub.unsubscribe()
        if self._run_probe_sub is not None:
            await self._run_probe_sub.unsubscribe()
        if self._probe_sub is not None:
            await self._probe_sub.unsubscribe()
        await self._flush_usage()  # the last answers' records, not left in the batch
        if self._replay_sub is not None:
            await self._replay_sub.unsubscribe()
        await (self.models or self.provider).aclose()
        self._tools_stop.set()
        self.log.info("specialist stopped", served=self.counters.served)
