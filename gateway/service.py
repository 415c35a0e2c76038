"""The gateway: a NATS micro service (queue group, any number of replicas) serving the sessions API.

Chat in a session never puts the gateway on the token path: the gateway forwards the request to the
specialist with the *client's* inbox as reply subject, listens on that same subject itself (NATS fans
the frames out to both) and records the answer when the stream ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service
from pydantic import ValidationError

from bus import tracing
from bus.bulk import BulkAccepted, BulkRequest
from bus.client import SETTLE_WAIT_S, STORED_WAIT_S, Bus, ChatStream, FrameReader
from bus.discovery import PREFIX_KEY, Discover, DiscoveryReply, Ranked
from bus.errors import (
    BadRequest,
    BusError,
    Cancelled,
    ErrorCode,
    RunNotFound,
    SessionBusy,
    SessionTooLarge,
    SpecialistUnavailable,
)
from bus.logs import refused
from bus.micro import add_service
from bus.runs import answerable, ensure_runs_stream, parse_run_subject
from bus.sessions import (
    ChatAccepted,
    CreateSession,
    DeletedReply,
    ErrorReply,
    ForkSession,
    ListSessions,
    RenameSession,
    Session,
    SessionChat,
    SessionRef,
    SessionReply,
    SessionsReply,
    SettleTurn,
    StoredFrame,
    Turn,
    TurnStatus,
)
from bus.settings import TektonSettings
from bus.subjects import (
    ALL_USERS,
    ANONYMOUS,
    SESSION_OPS,
    bulk_subject,
    cancel_parts,
    cancel_subject,
    cancel_wildcard,
    chat_subject,
    discover_subject,
    gateway_queue,
    gateway_user,
    inbox_owner,
    session_subject,
    validate_name,
)
from bus.usage import SESSION_HEADER
from bus.wire import (
    ChatRequest,
    DoneFrame,
    ErrorFrame,
    Wire,
    encode,
    encode_request,
    unpack_frame,
)
from gateway.bulk import BulkRun, StoreAnswer, validate
from gateway.cancels import CancelBook
from gateway.discovery import Catalog
from gateway.judge import ModelJudge
from gateway.leases import QUEUED, TURN, Leases, Work, open_work_bucket
from gateway.routing import Candidate
from gateway.store import SessionStore, value_limit
from gateway.usage import UsageBook

log = structlog.get_logger("tekton.gateway")

VERSION = "0.1.0"
# How long a pending turn's run may take to show in the runs stream (its request on its way to the
# specialist) before a recovering replica calls it not kept.
RUN_APPEARS_S = 5.0

Handler = Callable[[Any], Awaitable[Wire]]

# Who is asking, from the user token of the request's subject (nats-server lets each user publish
# under their own name only); set per request task, never read from the payload.
asking: ContextVar[str] = ContextVar("asking")


def _owner() -> str | None:
    """The owner whose sessions this request may touch; None for an admin asking as ``_all``."""
    user = asking.get()
    return None if user == ALL_USERS else user


def _new_owner(like: Session | None = None) -> str:
    """The owner of a session this request creates: the asker, or for ``_all`` the source's owner."""
    user = asking.get()
    if user != ALL_USERS:
        return user
    if like is None:
        raise BadRequest("as _all (every user's sessions) you cannot create one: ask as its user")
    return like.owner


class GatewayService:
    def __init__(self, nc: NATS, store: SessionStore, settings: TektonSettings, task_group: TaskGroup):
        self.nc = nc
        self.store = store
        self.settings = settings
        self._tg = task_group
        self._service: Service | None = None
        self.counters: dict[str, int] = {
            "requests": 0,
            "errors": 0,
            "recording": 0,
            "recorded": 0,
            "taken_over": 0,  # turns and queued messages of dead replicas (gateway/leases.py)
        }
        self._idle = anyio.Event()
        self._idle.set()
        # Request ids of the turns this replica begins while its start-up recovery runs (None after):
        # their answers are ours to record live, not a dead gateway's to recover.
        self._begun_in_recovery: set[str] | None = set()
        self._handlers: dict[str, tuple[type[Wire], Handler]] = {
            "create": (CreateSession, self._create),
            "get": (SessionRef, self._get),
            "list": (ListSessions, self._list),
            "delete": (SessionRef, self._delete),
            "fork": (ForkSession, self._fork),
            "rename": (RenameSession, self._rename),
            "chat": (SessionChat, self._chat),
            "settle": (SettleTurn, self._settle),
            "bulk": (BulkRequest, self._bulk),
            "discover": (Discover, self._discover),
        }
        self.bus = Bus(nc, settings)
        self.usage: UsageBook | None = None  # set by the runtime once its bucket is open
        judge = None
        if settings.routing_model:
            timeout, generalist = settings.routing_model_timeout_s, settings.routing_generalist
            judge = ModelJudge(self.bus, settings.routing_model, timeout, generalist)
        self.running = Catalog(
            nc, settings.routing_method, settings.prefix, settings.routing_generalist, judge
        )
        self.leases: Leases | None = None  # once started (it names this replica)
        # Cancels of bulk requests and queued session messages, heard before or while they run.
        self.cancels = CancelBook()

    @property
    def instance_id(self) -> str:
        return self._service.id if self._service else ""

    async def start(self) -> None:
        # The gateway may create streams (a specialist's credentials may not): the runs stream too.
        try:
            await ensure_runs_stream(self.nc, self.settings)
        except Exception as err:  # no JetStream: answers still stream, only not resumable
            log.warning("runs stream not available; answers will not be resumable", error=str(err))
        self._service = await add_service(
            self.nc,
            self.settings.prefix,
            name="gateway",
            version=VERSION,
            description="Tekton gateway: conversation sessions in JetStream KV",
            metadata={
                "tekton_role": "gateway",
                "bucket": self.store.kv._name,
                PREFIX_KEY: self.settings.prefix,
            },
            stats_handler=self._stats_data,
        )
        prefix = self.settings.prefix
        await self.nc.subscribe(cancel_wildcard(prefix), cb=self._on_cancel)  # before any request
        endpoints = [(f"session-{op}", session_subject(op, prefix, "*"), op) for op in SESSION_OPS]
        endpoints.append(("bulk", bulk_subject(prefix, "*"), "bulk"))
        endpoints.append(("discover", discover_subject(prefix, "*"), "discover"))
        for name, subject, op in endpoints:
            await self._service.add_endpoint(
                name=name,
                subject=subject,
                queue_group=gateway_queue(self.settings.prefix),
                handler=self._dispatcher(op),
            )
        self._tg.start_soon(self.running.keep_fresh)
        if self.usage is not None:
            await self.usage.start(self._tg)
        # Work outlives nothing longer than a queued message's wait plus its answer.
        ttl = 2 * (self.settings.request_timeout_s + self.settings.idle_timeout_s) + SETTLE_WAIT_S
        js, replicas = self.nc.jetstream(), self.store.limits.replicas
        try:
            work = await open_work_bucket(js, self.settings.prefix, ttl, replicas)
        except Exception as err:  # answers are still recorded; only not taken over when we die
            log.warning("work bucket not available; no takeover of dead replicas' turns", error=str(err))
        else:
            self.leases = Leases(work, self.instance_id, self.settings.gateway_lease_s)
            self._tg.start_soon(self.leases.beat)
            self._tg.start_soon(self.leases.sweep, self._take_over)
        self._tg.start_soon(self._recover_pending)
        if self.store.journal is not None:  # on a cluster: gateway/journal.py
            self._tg.start_soon(self.store.journal.tend, self.store.merge_journaled)
        await self.nc.flush()
        log.info("gateway ready", instance=self.instance_id, bucket=self.store.kv._name)

    async def _on_cancel(self, msg: Msg) -> None:
        user, request_id = cancel_parts(msg.subject)
        self.cancels.heard(user, request_id)

    def _stats_data(self, _endpoint: EndpointStats) -> dict[str, Any]:
        return dict(self.counters)

    async def stop(self, grace: float) -> None:
        """Take no new requests; let answers being recorded finish for up to ``grace`` seconds."""
        if self._service is not None:
            await self._service.stop()
        with anyio.move_on_after(grace):
            await self._idle.wait()
        if self.leases is not None:
            await self.leases.stop()

    def _dispatcher(self, op: str) -> Callable[[Request], Awaitable[None]]:
        model, handler = self._handlers[op]
        span_name = f"gateway {op}"

        async def dispatch(req: Request) -> None:
            if not answerable(req._msg.reply or "", self.settings.prefix):  # (bus/micro.py)
                refused.warning(log, "gateway request with a reply subject no client reads dropped", op=op)
                return
            # Each request in its own task: a slow scan never holds up a quick get.
            trace = tracing.admit(req._msg.headers, span_name)
            if trace is not None:
                self._tg.start_soon(self._handle_traced, trace, op, model, handler, req)
            else:
                self._tg.start_soon(self._handle, op, model, handler, req)

        return dispatch

    async def _handle_traced(
        self, trace: tracing.Trace, op: str, model: type[Wire], handler: Handler, req: Request
    ) -> None:
        with tracing.current(f"gateway {op}", "server", trace):
            await self._handle(op, model, handler, req)

    async def _handle(self, op: str, model: type[Wire], handler: Handler, req: Request) -> None:
        """Validate, run, reply; whatever goes wrong becomes an error reply and the gateway goes on."""
        self.counters["requests"] += 1
        asking.set(gateway_user(req.subject, self.settings.prefix))
        try:
            try:
                request = model.model_validate(unpack_frame(req.data))
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in err.errors()
                )
                raise BadRequest(f"not a valid '{op}' request: {problems}") from err
            except BusError as err:
                raise BadRequest(f"not a valid '{op}' request: {err.message}") from err
            payload = encode(await handler(request), self.nc.max_payload)
        except BusError as err:
            self.counters["errors"] += 1
            log.info("request refused", op=op, code=str(err.code), error=err.message)
            payload = _error_payload(err)
        except Exception as err:
            self.counters["errors"] += 1
            log.exception("request crashed", op=op)
            payload = _error_payload(BusError(f"gateway failed on '{op}': {err}"))
        try:
            await req.respond(payload)
        except Exception as err:  # the asker or the connection is gone: nothing left to tell
            log.warning("reply not sent", op=op, error=str(err))

    # The sessions API

    async def _create(self, r: CreateSession) -> SessionReply:
        if r.specialist is not None:
            _check_name(r.specialist)
        session = Session(
            name=r.name,
            specialist=r.specialist,
            context_window=r.context_window,
            metadata=r.metadata,
            owner=_new_owner(),
        )
        return SessionReply(session=await self.store.create(session))

    async def _get(self, r: SessionRef) -> SessionReply:
        session, _ = await self.store.resolve(r.session, _owner())
        return SessionReply(session=session)

    async def _list(self, r: ListSessions) -> SessionsReply:
        return SessionsReply(sessions=await self.store.list(r.specialist, r.name, r.limit, _owner()))

    async def _delete(self, r: SessionRef) -> DeletedReply:
        return DeletedReply(session=await self.store.delete(r.session, _owner()))

    async def _fork(self, r: ForkSession) -> SessionReply:
        source, _ = await self.store.resolve(r.session, _owner())
        at = len(source.turns) if r.at is None else r.at
        if at > len(source.turns):
            raise BadRequest(
                f"session {source.name or source.id} has {len(source.turns)} turns; cannot fork at {at}"
            )
        now = time.time()
        fork = Session(
            name=r.name,
            specialist=source.specialist,
            context_window=source.context_window,
            metadata={**source.metadata, "forked_from": source.id, "forked_at": str(at)},
            created=now,
            updated=now,
            turns=source.turns[:at],
            owner=_new_owner(source),
        )
        return SessionReply(session=await self.store.create(fork))

    async def _rename(self, r: RenameSession) -> SessionReply:
        return SessionReply(session=await self.store.rename(r.session, r.name, _owner()))

    async def _settle(self, r: SettleTurn) -> StoredFrame:
        """A client's copy of an answer whose recording gateway stopped (see SettleTurn)."""
        session, _ = await self.store.resolve(r.session, _owner())
        turn = next((t for t in session.turns if t.role == "user" and t.request_id == r.request_id), None)
        if turn is None and r.question is not None and (r.specialist or session.specialist):
            # The gateway that took the turn died before even the question was stored: store both.
            asked = Turn(
                id=turn_id(r.request_id),
                role="user",
                content=r.question,
                specialist=r.specialist or session.specialist or "",
                status="pending",
                request_id=r.request_id,
            )
            session = await self.store.update(session.id, lambda s: _with_turn(s, asked, time.time()))
            turn = next((t for t in session.turns if t.id == asked.id), None)
        if turn is None:
            raise BadRequest(f"session {session.name or session.id} has no turn for request {r.request_id}")
        stored = await self._finish(session.id, turn, r.answer, "ok", "")
        if stored is None:
            raise BusError("the answer could not be stored; try again", retryable=True)
        return stored

    async def _begin_turn(
        self, ref: str, specialist: str | None, request: ChatRequest
    ) -> tuple[str, Turn, ChatRequest]:
        """Store the user turn (first, so it survives whatever happens to the answer) and return the
        request with the session's context before the new message(s)."""
        session = await self.store.recent(ref, _owner())
        specialist = specialist or session.specialist
        if not specialist:
            raise BadRequest(
                f"session {session.name or session.id} has no specialist of its own: name one for this turn"
            )
        _check_name(specialist)
        users = [m for m in request.messages if m.role == "user"]
        now = time.time()
        # Past the request's deadline, the stream's idle timeout and the client's wait to settle it,
        # nobody can still store this turn's answer.
        budget = request.timeout_ms / 1000 if request.timeout_ms else self.settings.request_timeout_s
        turn = Turn(
            id=turn_id(request.id),  # a retry of this request (same id) stores this turn once
            role="user",
            content=users[-1].content if users else request.messages[-1].content,
            specialist=specialist,
            status="pending",
            request_id=request.id,
            settle_by=now + budget + self.settings.idle_timeout_s + STORED_WAIT_S + SETTLE_WAIT_S,
        )
        if self._begun_in_recovery is not None:
            self._begun_in_recovery.add(request.id)
        # The answer does not wait for the write: it is stored behind it when the bucket is electing a
        # leader (a node was lost), and this replica's own reads of the session already include it.
        session = await self.store.update_soon(session.id, lambda s: _with_turn(s, turn, now))
        full = request.model_copy(update={"messages": [*session.context(), *request.messages]})
        return session.id, turn, full

    def _check_inbox_owner(self, inbox: str) -> None:
        """Answers go only to the asker's own inbox (or ours, for the HTTP bridge we run)."""
        run = parse_run_subject(inbox, self.settings.prefix)
        if (inbox_owner(inbox) or (run.user if run else "")) not in (asking.get(), self.bus.user):
            raise BadRequest(f"inbox {inbox!r} is not yours: use one under _INBOX.{asking.get()}")

    async def _double_text(self, r: SessionChat) -> list[str]:
        """Apply the caller's double-texting policy when an answer in the session is still streaming;
        the request ids a queued message must wait for (none: go ahead now)."""
        if r.double_text is None:
            return []
        session, _ = await self.store.resolve(r.session, _owner())
        busy = {t.request_id for t in session.turns if t.status == "pending" and t.request_id}
        if not busy:
            return []
        if r.double_text == "reject":
            raise SessionBusy(
                f"session {session.name or session.id} is still answering; wait for it, or send with "
                "another double-texting policy (queue, interrupt, rollback)"
            )
        if r.double_text == "queue":
            return sorted(busy)
        for request_id in busy:
            # Asked by the session's owner, or by the HTTP bridge we run for them.
            for user in {session.owner, self.bus.user}:
                await self.nc.publish(cancel_subject(request_id, user, self.settings.prefix), b"")
        await self.store.wait_settled(session.id, busy, self._settle_within())
        if r.double_text == "rollback":
            await self.store.update(
                session.id,
                lambda s: s.model_copy(update={"turns": [t for t in s.turns if t.request_id not in busy]}),
            )
            await self.store.forget_journaled(session.id)
        return []

    def _settle_within(self) -> float:
        return self.settings.request_timeout_s + self.settings.idle_timeout_s

    async def _chat(self, r: SessionChat) -> ChatAccepted:
        _check_inbox(r.inbox)
        self._check_inbox_owner(r.inbox)
        behind = await self._double_text(r)
        if behind:
            # Queued: the turn begins (with the earlier answer in its context) once that one is stored.
            session = await self.store.recent(r.session, _owner())
            specialist = r.specialist or session.specialist
            await self._hold_queued(session.id, behind, r)
            self._recording(+1)
            self._tg.start_soon(self._queued, session.id, behind, r)
            return ChatAccepted(session=session.id, specialist=specialist or "", context_turns=0, queued=True)
        return await self._start_chat(r)

    async def _hold_queued(self, session_id: str, behind: list[str], r: SessionChat) -> None:
        """Keep a queued message in the store too, so another replica starts it if we die first (one
        too large for a store value waits only here)."""
        data = {"session": session_id, "behind": behind, "asking": asking.get(), "chat": r.model_dump()}
        packed = len(encode(r)) + 1024
        if self.leases is None or packed > value_limit(self.nc.max_payload, self.store.limits.max_bytes):
            log.warning("queued message kept by this replica only", session=session_id, bytes=packed)
            return
        await self.leases.hold(QUEUED, r.request.id, data)

    async def _queued(self, session_id: str, behind: list[str], r: SessionChat) -> None:
        run = parse_run_subject(r.inbox, self.settings.prefix)
        asker = inbox_owner(r.inbox) or (run.user if run else ANONYMOUS)  # whose cancel stops it
        try:
            with self.cancels.watch(asker, r.request.id) as watch, watch.scope:
                await self.store.wait_settled(session_id, set(behind), self._settle_within())
            if watch.cancelled.is_set():  # the asker cancelled it while it waited: it never starts
                log.info("queued message cancelled", session=session_id, request_id=r.request.id)
                with contextlib.suppress(Exception):  # its end, as a specialist's cancel would say it
                    cancelled = BusError("cancelled by the client", code=ErrorCode.CANCELLED)
                    await self.nc.publish(r.inbox, encode(_error_frame(cancelled)))
                return
            session = await self.store.recent(session_id)
            if any(t.request_id == r.request.id for t in session.turns):
                return  # begun already (by a replica that died just after): its turn is recorded
            await self._start_chat(r)
        except Exception as err:  # the asker waits on its inbox: tell it there
            error = err if isinstance(err, BusError) else BusError(f"queued message failed: {err}")
            with contextlib.suppress(Exception):
                await self.nc.publish(r.inbox, encode(_error_frame(error)))
        finally:
            if self.leases is not None:
                with anyio.CancelScope(shield=True):
                    await self.leases.release(QUEUED, r.request.id)
            self._recording(-1)

    async def _start_chat(self, r: SessionChat) -> ChatAccepted:
        session_id, turn, request = await self._begin_turn(r.session, r.specialist, r.request)
        try:
            payload = encode_request(request, limit=self.nc.max_payload)
        except BusError as err:
            await self._finish(session_id, turn, "", "error", err.message)
            raise
        # Listen on the client's inbox before the specialist can answer on it.
        sub = await self.nc.subscribe(r.inbox)
        subject = chat_subject(turn.specialist, self.settings.prefix)
        headers = {SESSION_HEADER: session_id, **(tracing.headers() or {})}  # the usage record names it
        await self.nc.publish(subject, payload, reply=r.inbox, headers=headers)
        # Held before the recorder starts, so its release cannot come first.
        run = parse_run_subject(r.inbox, self.settings.prefix)
        await self._hold_turn(session_id, run.user if run else asking.get(), turn)
        self._recording(+1)
        self._tg.start_soon(self._record, session_id, turn, sub, r.inbox)
        return ChatAccepted(
            session=session_id,
            specialist=turn.specialist,
            context_turns=len(request.messages) - len(r.request.messages),
        )

    def _recording(self, delta: int) -> None:
        self.counters["recording"] += delta
        if delta > 0:
            self._idle = anyio.Event() if self._idle.is_set() else self._idle
        else:
            self.counters["recorded"] += 1
            if self.counters["recording"] == 0:
                self._idle.set()

    async def _session_turn(
        self, ref: str, specialist: str, request: ChatRequest
    ) -> tuple[ChatStream, StoreAnswer]:
        """A bulk operation in a session: the gateway reads the stream itself and stores the answer."""
        session_id, turn, full = await self._begin_turn(ref, specialist, request)
        await self._hold_turn(session_id, self.bus.acting_for, turn)
        stream = ChatStream(self.bus, turn.specialist, full, self.settings.idle_timeout_s)

        async def store(answer: str, status: str, error: str) -> None:
            await self._finish(session_id, turn, answer, _turn_status(status), error)

        return stream, store

    async def _discover(self, r: Discover) -> DiscoveryReply:
        started = time.perf_counter()
        views = await self.running.views(refresh=r.refresh)
        threshold = self.settings.routing_threshold if r.threshold is None else r.threshold
        ranked: list[Candidate] = []
        chosen, reason, alternatives, generalist, judged_by = None, "", [], False, None
        user = asking.get()
        corrections = None
        if r.forget is not None:
            corrections = await self.running.forget(user, r.forget)
        elif r.corrections:
            corrections = self.running.corrections(user)
        if r.capability:
            ranked = await self.running.for_capability(r.capability)
            views = [v for v in views if r.capability in v.capabilities]
            what = r.capability
            best = ranked[0]
            if best.score >= threshold:
                chosen, reason = best.name, f"{best.name}: {best.why(what)}"
                alternatives = [c.name for c in ranked[1:] if c.score >= threshold]
            else:
                reason = (
                    f"no specialist scores {threshold:g} or more for '{what}' "
                    f"(best: {best.name} {best.score:.2f} = {best.why(what)})"
                )
        elif r.text:
            what = "text match"
            if r.correct:
                await self.running.learn(r.text, r.correct, user)
            route = await self.running.for_text(r.text, user)
            ranked, chosen, alternatives = route.ranked, route.chosen, route.alternatives
            reason, generalist, judged_by = route.reason, route.generalist, route.judged_by
        return DiscoveryReply(
            # Without their example requests: routing reads those here; askers need the rest.
            specialists=[v.model_copy(update={"examples": []}) for v in views],
            ranked=[
                Ranked(name=c.name, score=c.score, fit=c.fit, health=c.health, why=c.why(what))
                for c in ranked
            ],
            chosen=chosen,
            alternatives=alternatives,
            reason=reason,
            generalist=generalist,
            took_ms=round((time.perf_counter() - started) * 1000, 3),
            corrections=corrections,
            judged_by=judged_by,
        )

    async def _bulk(self, r: BulkRequest) -> BulkAccepted:
        _check_inbox(r.inbox)
        self._check_inbox_owner(r.inbox)
        graph = validate(r.operations, await self.running.names({op.ai for op in r.operations}))
        run = BulkRun(
            self.nc,
            self.bus,
            r,
            graph,
            max_concurrency=self.settings.bulk_max_concurrency,
            heartbeat_s=self.settings.heartbeat_s,
            session_turn=self._session_turn,
            owner=asking.get(),
        )
        self._recording(+1)

        async def running() -> None:
            try:
                with self.cancels.watch(run.owner, r.id) as watch:
                    await run.run(watch.cancelled)
            except Exception:
                log.exception("bulk request crashed", id=r.id)
            finally:
                self._recording(-1)

        self._tg.start_soon(running)
        return BulkAccepted(id=r.id, operations=len(r.operations))

    async def _hold_turn(self, session_id: str, run_user: str, turn: Turn) -> bool:
        """Note that we record this turn (from the run of ``run_user``): if we die, another replica will."""
        if self.leases is None or turn.request_id is None:
            return False
        data = {"session": session_id, "owner": run_user, "turn": turn.model_dump()}
        return await self.leases.hold(TURN, turn.request_id, data)

    async def _take_over(self, work: Work) -> None:
        """Work of a replica that died, now ours (gateway/leases.py)."""
        try:
            if work.kind == TURN:
                turn = Turn.model_validate(work.data["turn"])
                session_id, owner = str(work.data["session"]), str(work.data["owner"])
                self.counters["taken_over"] += 1
                self._recording(+1)
                self._tg.start_soon(self._record_run, session_id, owner, turn)
            elif work.kind == QUEUED:
                chat = SessionChat.model_validate(work.data["chat"])
                self.counters["taken_over"] += 1
                self._recording(+1)
                self._tg.start_soon(self._resume_queued, work, chat)
        except (KeyError, ValidationError) as err:
            log.warning("unreadable work dropped", kind=work.kind, request=work.request_id, error=str(err))
            assert self.leases is not None
            await self.leases.release(work.kind, work.request_id)

    async def _resume_queued(self, work: Work, chat: SessionChat) -> None:
        asking.set(str(work.data["asking"]))
        await self._queued(str(work.data["session"]), [str(b) for b in work.data["behind"]], chat)

    async def _recover_pending(self) -> None:
        """At start: answers left pending by a gateway that died while recording them are read from
        their runs (still going or kept a while after their end) and stored, so no turn stays pending."""
        try:
            await self._recover_pending_turns()
        finally:
            self._begun_in_recovery = None

    async def _recover_pending_turns(self) -> None:
        try:
            summaries = await self.store.summaries()
        except Exception as err:  # no bucket yet, or the connection is gone: nothing to recover
            log.warning("pending turns not checked", error=str(err))
            return
        for summary in summaries:
            try:
                session, _ = await self.store.resolve(summary.id)
            except BusError:  # gone meanwhile
                continue
            for turn in session.turns:
                if turn.role == "user" and turn.status == "pending" and turn.request_id:
                    if turn.request_id in (self._begun_in_recovery or ()):
                        continue  # begun by us since we started: recorded live
                    # Held by a replica (alive, or for the sweep to take over): none of ours.
                    if self.leases is not None and not await self._hold_turn(session.id, session.owner, turn):
                        continue
                    self._recording(+1)
                    self._tg.start_soon(self._record_run, session.id, session.owner, turn)

    async def _record_run(self, session_id: str, owner: str, turn: Turn) -> None:
        """Store one pending turn's answer from its run in the runs stream (the run of the session's
        owner, or of the HTTP bridge we run, which asks for its callers)."""
        assert turn.request_id is not None
        parts: list[str] = []
        status: TurnStatus = "error"
        error = "the gateway stopped before the answer was stored, and its run is no longer kept"
        # A turn another replica began a moment ago (written, its hold not yet) has no run yet either.
        give_up = time.monotonic() + RUN_APPEARS_S
        try:
            # The question may be only in the journal: its gateway died while the bucket elected a leader.
            await self.store.replay_journaled(session_id)
            if not any(t.id == turn.id for t in (await self.store.resolve(session_id))[0].turns):
                # Nor there (no entry, or it could not be read): the held work's own copy of it.
                await self.store.update(session_id, lambda s: _with_turn(s, turn, time.time()))
            while status != "ok":
                for user in dict.fromkeys([owner, self.bus.user]):
                    try:
                        async with self.bus.attach(
                            turn.request_id, idle_timeout=self.settings.idle_timeout_s, user=user
                        ) as run:
                            async for text in run:
                                parts.append(text)
                            await run.result()
                        status, error = "ok", ""
                        break
                    except RunNotFound:
                        continue
                if status != "ok":
                    if time.monotonic() > give_up:
                        break
                    await anyio.sleep(0.25)
        except Cancelled as err:
            status, error = "cancelled", err.message
        except BusError as err:
            error = err.message
        except Exception as err:
            error = f"gateway lost the run: {err}"
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._finish(session_id, turn, "".join(parts), status, error)
                    log.info("pending turn recovered", session=session_id, request=turn.request_id)
                finally:
                    self._recording(-1)

    async def _record(self, session_id: str, turn: Turn, sub: Any, inbox: str) -> None:
        """Hear the answer on the client's inbox and store it when the stream ends, however it ends."""
        parts: list[str] = []
        status: TurnStatus = "error"
        error = "the answer stream ended without a done frame"
        reader = FrameReader()
        try:
            while True:
                try:
                    msg: Msg = await sub.next_msg(timeout=self.settings.idle_timeout_s)
                except TimeoutError:
                    error = f"'{turn.specialist}' went silent for {self.settings.idle_timeout_s:g} s"
                    break
                try:
                    item = reader.read(msg)
                except BusError as err:  # unreadable, or frames lost (a seq gap): not a whole answer
                    error = f"bad answer stream from '{turn.specialist}': {err.message}"
                    break
                if type(item) is str:
                    parts.append(item)
                elif item is None:
                    # NATS tells only the publisher (us) that nobody listens: pass it on to the client.
                    running = await self.running.names(refresh=True)
                    unavailable = SpecialistUnavailable.named(turn.specialist, running)
                    await self.nc.publish(inbox, encode(_error_frame(unavailable)))
                    error = unavailable.message
                    break
                elif isinstance(item, DoneFrame):
                    status, error = "ok", ""
                    break
                elif isinstance(item, ErrorFrame):
                    status = "cancelled" if item.code == ErrorCode.CANCELLED else "error"
                    error = item.message
                    break
        except Exception as err:  # the connection went away: still try to mark the turn
            error = f"gateway lost the stream: {err}"
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):  # the connection may be closed already
                    await sub.unsubscribe()
                try:
                    stored = await self._finish(session_id, turn, "".join(parts), status, error)
                    if stored is not None:
                        await self.nc.publish(inbox, encode(stored))
                except Exception as err:  # never the gateway's death: the client settles the turn
                    log.warning("stored frame not sent", session=session_id, error=str(err))
                finally:
                    self._recording(-1)

    async def _finish(
        self, session_id: str, turn: Turn, answer: str, status: TurnStatus, error: str
    ) -> StoredFrame | None:
        """Mark the user turn with how its answer ended and store the answer (partial ones too)."""

        def change(s: Session) -> Session:
            if not _pending(s.turns, turn.id):
                return s  # settled already (by the client's copy, or by another recorder)
            turns = _mark(s.turns, turn.id, status, error)
            if answer or status == "ok":
                turns.append(
                    Turn(
                        role="assistant",
                        content=answer,
                        specialist=turn.specialist,
                        status=status,
                        request_id=turn.request_id,
                        error=error or None,
                    )
                )
            return s.model_copy(update={"turns": turns})

        def too_large(s: Session) -> Session:
            if not _pending(s.turns, turn.id):
                return s
            note = "the answer was too large to store in the session"
            return s.model_copy(update={"turns": _mark(s.turns, turn.id, "error", note)})

        try:
            try:
                # Stored means in the bucket, not only journaled: another replica reads the bucket, and
                # a client's next turn there must come after this one.
                session = await self.store.update(session_id, change)
            except SessionTooLarge:
                session = await self.store.update(session_id, too_large)
        except Exception as err:  # a BusError, or nats-py's own (timeout, connection closed)
            log.warning("answer not stored", session=session_id, request=turn.request_id, error=str(err))
            return None
        if self.leases is not None and turn.request_id is not None:  # nothing left for anyone to record
            self._tg.start_soon(self.leases.release, TURN, turn.request_id)
        return StoredFrame(session=session_id, turns=len(session.turns) + session.dropped)


def turn_id(request_id: str) -> str:
    """The user turn's id, from its request's: the same request asked twice is one turn."""
    return hashlib.blake2s(request_id.encode(), digest_size=8).hexdigest()


def _with_turn(s: Session, turn: Turn, now: float) -> Session:
    """The session with ``turn`` appended, unless it holds it already (the change is idempotent)."""
    if any(t.id == turn.id for t in s.turns):
        return s
    return s.model_copy(update={"turns": [*_abandoned(s.turns, now), turn]})


def _mark(turns: list[Turn], turn_id: str, status: TurnStatus, error: str) -> list[Turn]:
    return [
        t.model_copy(update={"status": status, "error": error or None}) if t.id == turn_id else t
        for t in turns
    ]


def _abandoned(turns: list[Turn], now: float) -> list[Turn]:
    """Pending turns whose answer can no longer arrive, marked as such."""
    note = "no answer was stored: its gateway and its client both stopped before the answer ended"
    return [
        t.model_copy(update={"status": "error", "error": note})
        if t.status == "pending" and t.settle_by is not None and t.settle_by < now
        else t
        for t in turns
    ]


def _pending(turns: list[Turn], turn_id: str) -> bool:
    return any(t.id == turn_id and t.status == "pending" for t in turns)


def _check_inbox(inbox: str) -> None:
    """A subject we may subscribe and publish to: no wildcard (we would hear others' streams), no
    whitespace or empty token (nats-server answers those with -ERR and closes our connection)."""
    tokens = inbox.split(".")
    if any(not t or t in ("*", ">") or any(c.isspace() for c in t) for t in tokens) or len(inbox) > 256:
        raise BadRequest(
            f"inbox {inbox[:80]!r} is not a plain NATS subject (no wildcards, spaces or empty tokens)"
        )


def _error_payload(err: BusError) -> bytes:
    try:
        return encode(ErrorReply.of(err))
    except BusError:  # the message quoted text that cannot be encoded: say what kind of error it was
        return encode(ErrorReply(code=str(err.code), message=f"{err.code} (details not encodable)"))


def _turn_status(status: str) -> TurnStatus:
    return "ok" if status == "ok" else "cancelled" if status == "cancelled" else "error"


def _error_frame(err: BusError) -> ErrorFrame:
    return ErrorFrame(seq=0, code=str(err.code), message=err.message, retryable=err.retryable)


def _check_name(name: str) -> None:
    try:
        validate_name(name)
    except ValueError as err:
        raise BadRequest(str(err)) from err
