"""The sessions API on the bus: wire models and a client. The gateway serves it; see docs/protocol.md.

Requests go to ``<prefix>.gateway.session.<op>`` (request/reply, msgpack). Every reply is a msgpack map
with ``type``: ``session``, ``sessions``, ``deleted``, ``accepted`` or ``error`` (code, message,
retryable, as in reply streams).
"""

from __future__ import annotations

import builtins
import re
import time
import uuid
from typing import Any, Literal, TypeVar

import nats.errors
from pydantic import Field, ValidationError

from bus import tracing
from bus.bulk import BulkAccepted
from bus.discovery import Discover, DiscoveryReply
from bus.errors import (
    BadRequest,
    BusError,
    GatewayTimeout,
    GatewayUnavailable,
    InvalidInput,
    MalformedFrame,
    SessionNotFound,
    SpecialistUnavailable,
    Unauthorized,
    from_wire,
)
from bus.refusals import Refused, or_refused
from bus.subjects import ALL_USERS, ANONYMOUS, REPLY_SUBJECT_PATTERN, discover_subject, session_subject
from bus.usage import UsageQuery, UsageReply, usage_query_subject
from bus.wire import PROTOCOL_VERSION, ChatMessage, ChatRequest, Wire, encode, unpack_frame

AUTO = "auto"  # `@auto`: routed by the request's text
SESSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")
SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def new_session_id() -> str:
    return uuid.uuid4().hex


TurnStatus = Literal["ok", "pending", "error", "cancelled"]


class Turn(Wire):
    """One message of a conversation.

    ``status``: ``ok``; ``pending`` (a user turn whose answer is still streaming, or whose gateway died);
    ``error`` / ``cancelled`` (kept, never dropped, and left out of later prompts).
    """

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    role: Literal["user", "assistant"]
    content: str
    specialist: str
    at: float = Field(default_factory=time.time)
    status: TurnStatus = "ok"
    request_id: str | None = None
    error: str | None = None
    # A pending turn still pending after this (epoch seconds) never gets its answer (its gateway and
    # its client both stopped): the session's next write marks it ``error``.
    settle_by: float | None = None


class Session(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    id: str = Field(default_factory=new_session_id, pattern=SESSION_ID_RE.pattern)
    name: str | None = Field(default=None, pattern=SESSION_NAME_RE.pattern)
    specialist: str | None = None
    context_window: int = Field(default=10, ge=0, le=1000)
    metadata: dict[str, str] = {}
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)
    turns: list[Turn] = []
    # Turns dropped from the front when the stored history reached its cap.
    dropped: int = 0
    # The user who created it (from the gateway subject the server pinned to them); only they (and
    # admins) can see, change or fork it.
    owner: str = ""

    def context(self) -> list[ChatMessage]:
        """The prompt history: the last ``context_window`` turns that completed."""
        ok = [t for t in self.turns if t.status == "ok"]
        recent = ok[-self.context_window :] if self.context_window else []
        return [ChatMessage(role=t.role, content=t.content) for t in recent]

    def summary(self) -> SessionSummary:
        last = self.turns[-1].content if self.turns else ""
        return SessionSummary(
            id=self.id,
            name=self.name,
            specialist=self.specialist,
            created=self.created,
            updated=self.updated,
            turns=len(self.turns) + self.dropped,
            last=last[:80],
            owner=self.owner,
        )


class SessionSummary(Wire):
    id: str
    name: str | None = None
    specialist: str | None = None
    created: float
    updated: float
    turns: int
    last: str = ""
    owner: str = ""


# Requests


class CreateSession(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    specialist: str | None = None
    name: str | None = Field(default=None, pattern=SESSION_NAME_RE.pattern)
    context_window: int = Field(default=10, ge=0, le=1000)
    metadata: dict[str, str] = {}


class SessionRef(Wire):
    """``session`` is an id or a name."""

    v: Literal[1] = PROTOCOL_VERSION
    session: str = Field(min_length=1, max_length=64)


class ListSessions(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    specialist: str | None = None
    name: str | None = None
    limit: int = Field(default=50, ge=1, le=10_000)


FORK_AT_MAX = 1_000_000_000  # more turns than any session keeps


class ForkSession(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    session: str = Field(min_length=1, max_length=64)
    # Keep the first ``at`` turns (all when absent); bounded so it packs as a 64-bit integer.
    at: int | None = Field(default=None, ge=0, le=FORK_AT_MAX)
    name: str | None = Field(default=None, pattern=SESSION_NAME_RE.pattern)


class RenameSession(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    session: str = Field(min_length=1, max_length=64)
    name: str = Field(pattern=SESSION_NAME_RE.pattern)


DoubleText = Literal["reject", "queue", "interrupt", "rollback"]


class SessionChat(Wire):
    """One user turn. ``request.messages`` holds just the new message(s); the gateway puts the session's
    context before them, forwards to the specialist with ``inbox`` as the reply subject and records the
    answer it hears there. The client reads the stream from the specialist directly."""

    v: Literal[1] = PROTOCOL_VERSION
    session: str = Field(min_length=1, max_length=64)
    specialist: str | None = None
    inbox: str = Field(min_length=1, max_length=255, pattern=REPLY_SUBJECT_PATTERN)
    request: ChatRequest
    # A message while an answer in this session is still streaming (None: both go on at once):
    # reject it, queue it after that answer, interrupt that answer (kept as cancelled) or roll it
    # back (cancelled and removed with its question).
    double_text: DoubleText | None = None


class SettleTurn(Wire):
    """A client's copy of a whole answer (it saw ``done``) whose gateway stopped before storing it: the
    gateway stores it if the user turn of ``request_id`` is still ``pending``, else changes nothing."""

    session: str = Field(min_length=1, max_length=64)
    request_id: str = Field(min_length=1, max_length=64)
    answer: str
    # The question and who answered it, stored too when the gateway that took the turn died before it
    # had stored even the question (a cluster electing the sessions bucket's leader at that moment).
    question: str | None = None
    specialist: str | None = None


# Replies


class SessionReply(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["session"] = "session"
    session: Session


class SessionsReply(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["sessions"] = "sessions"
    sessions: list[SessionSummary]


class DeletedReply(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["deleted"] = "deleted"
    session: str


class ChatAccepted(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["accepted"] = "accepted"
    session: str
    specialist: str
    context_turns: int
    # Behind an answer still streaming (double_text "queue"): the stream starts once that one is stored.
    queued: bool = False


class StoredFrame(Wire):
    """Sent by the gateway on the stream's subject after the ``done`` frame, once the answer is stored:
    a client that waits for it reads its own writes (the next turn sees this one)."""

    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["stored"] = "stored"
    session: str
    turns: int


class ErrorReply(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["error"] = "error"
    code: str
    message: str
    retryable: bool = False

    @classmethod
    def of(cls, err: BusError) -> ErrorReply:
        return cls(code=str(err.code), message=err.message, retryable=err.retryable)


REPLIES: dict[str, type[Wire]] = {
    "session": SessionReply,
    "sessions": SessionsReply,
    "deleted": DeletedReply,
    "accepted": ChatAccepted,
    "bulk_accepted": BulkAccepted,
    "discovery": DiscoveryReply,
    "usage": UsageReply,
    "stored": StoredFrame,
}


def decode_reply(data: bytes) -> Wire:
    """A gateway reply as its model; an ``error`` reply is raised as the matching BusError."""
    raw = unpack_frame(data)
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "error":
        err = ErrorReply.model_validate(raw)
        raise from_wire(err.code, err.message, err.retryable)
    model = REPLIES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise MalformedFrame(f"not a gateway reply: type {kind!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise MalformedFrame(f"malformed gateway reply: {err.error_count()} problem(s)") from err


W = TypeVar("W", bound=Wire)


class GatewayClient:
    """Calls the sessions API. ``nc`` is a connected nats-py client."""

    def __init__(
        self, nc: Any, prefix: str, timeout: float = 5.0, user: str = ANONYMOUS, routing_model_s: float = 0.0
    ):
        self.nc = nc
        self.prefix = prefix
        self.timeout = timeout
        # Routing a text may wait this much longer: for the gateway's routing model, when it has one.
        self.routing_model_s = routing_model_s
        # The name in our gateway subjects: nats-server lets us publish under our own only.
        self.user = user

    @staticmethod
    def _request(model: type[W], **fields: Any) -> W:
        try:
            return model(**fields)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise InvalidInput(problems) from err

    async def call(
        self,
        op: str,
        request: Wire,
        subject: str | None = None,
        headers: dict[str, str] | None = None,
        wait_s: float | None = None,
    ) -> Wire:
        """One gateway request/reply (``op`` names it in errors); an error reply is raised. ``headers``:
        the trace context to continue (default: the current span's, when tracing is on)."""
        timeout = wait_s or self.timeout
        subject = subject or session_subject(op, self.prefix, self.user)
        try:
            msg = await or_refused(
                self.nc,
                subject,
                self.nc.request(
                    subject,
                    encode(request, self.nc.max_payload),
                    timeout=timeout,
                    headers=headers or tracing.headers(),
                ),
            )
        except Refused:
            raise self._refusal(subject) from None
        except nats.errors.NoRespondersError:
            raise GatewayUnavailable() from None
        except nats.errors.TimeoutError:
            refused = self._refused(subject)
            if refused is not None:
                raise refused from None
            raise GatewayTimeout(f"the gateway did not answer '{op}' within {timeout:g} s") from None
        return decode_reply(msg.data)

    def _refused(self, subject: str) -> Unauthorized | None:
        """The server's refusal to let us publish to ``subject``, when that is why nobody answered
        (nats-server says so only in an async -ERR, which nats-py keeps as the last error)."""
        said = str(getattr(self.nc, "last_error", None) or "").lower()
        if "permissions violation" in said and subject.lower() in said:
            return self._refusal(subject)
        return None

    @staticmethod
    def _refusal(subject: str) -> Unauthorized:
        admins = "; only an admin may (every user's data)" if f".{ALL_USERS}." in subject else ""
        return Unauthorized(f"the nats-server refused: your credentials may not publish to {subject}{admins}")

    async def create(
        self,
        specialist: str | None = None,
        *,
        name: str | None = None,
        context_window: int = 10,
        metadata: dict[str, str] | None = None,
    ) -> Session:
        reply = await self.call(
            "create",
            self._request(
                CreateSession,
                specialist=specialist,
                name=name,
                context_window=context_window,
                metadata=metadata or {},
            ),
        )
        assert isinstance(reply, SessionReply)
        return reply.session

    async def get(self, ref: str) -> Session:
        reply = await self.call("get", self._request(SessionRef, session=ref))
        assert isinstance(reply, SessionReply)
        return reply.session

    async def find(self, ref: str) -> Session | None:
        try:
            return await self.get(ref)
        except SessionNotFound:
            return None

    async def list(
        self, *, specialist: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[SessionSummary]:
        reply = await self.call(
            "list", self._request(ListSessions, specialist=specialist, name=name, limit=limit)
        )
        assert isinstance(reply, SessionsReply)
        return reply.sessions

    async def delete(self, ref: str) -> str:
        reply = await self.call("delete", self._request(SessionRef, session=ref))
        assert isinstance(reply, DeletedReply)
        return reply.session

    async def fork(self, ref: str, *, at: int | None = None, name: str | None = None) -> Session:
        reply = await self.call("fork", self._request(ForkSession, session=ref, at=at, name=name))
        assert isinstance(reply, SessionReply)
        return reply.session

    async def rename(self, ref: str, name: str) -> Session:
        reply = await self.call("rename", self._request(RenameSession, session=ref, name=name))
        assert isinstance(reply, SessionReply)
        return reply.session

    async def usage(self, reset: str | None = None) -> UsageReply:
        """The asker's token totals (all of them, and per session) and budget. Acting for ``_all``
        (admins): every user's totals, or ``reset`` that user's."""
        query = UsageQuery(reset=reset)
        reply = await self.call("usage", query, subject=usage_query_subject(self.prefix, self.user))
        assert isinstance(reply, UsageReply)
        return reply

    async def settle(
        self,
        session: str,
        request_id: str,
        answer: str,
        question: str | None = None,
        specialist: str | None = None,
    ) -> StoredFrame:
        settle = self._request(
            SettleTurn,
            session=session,
            request_id=request_id,
            answer=answer,
            question=question,
            specialist=specialist,
        )
        reply = await self.call("settle", settle)
        assert isinstance(reply, StoredFrame)
        return reply

    async def discover(
        self,
        *,
        capability: str | None = None,
        text: str | None = None,
        threshold: float | None = None,
        refresh: bool = False,
        correct: str | None = None,
        corrections: bool = False,
        forget: str | None = None,
    ) -> DiscoveryReply:
        """Running specialists; with ``capability`` or ``text`` also the ranking and the chosen one; with
        ``text`` and ``correct``, first teach the gateway that such requests belong to ``correct`` (for
        this user). ``corrections`` lists this user's corrections; ``forget`` drops one by id (or
        "all") first."""
        request = self._request(
            Discover,
            capability=capability,
            text=text,
            threshold=threshold,
            refresh=refresh,
            correct=correct,
            corrections=corrections or None,
            forget=forget,
        )
        subject = discover_subject(self.prefix, self.user)
        timeout = self.timeout + (self.routing_model_s if text else 0.0)
        reply = await self.call("discover", request, subject=subject, wait_s=timeout)
        assert isinstance(reply, DiscoveryReply)
        return reply

    async def pick(self, target: str, text: str = "") -> tuple[builtins.list[str], str]:
        """Who to ask for ``target``: a specialist name as it is; ``@capability`` or ``@auto`` (routed
        by ``text``) as the gateway's choice then its alternatives. Returns them with the reason."""
        if not target.startswith("@"):
            return [target], ""
        wanted = target[1:]
        if wanted == AUTO:
            if not text.strip():
                raise BadRequest(f"{target} picks a specialist by the text it is given, and it has none")
            reply = await self.discover(text=text)
        else:
            reply = await self.discover(capability=wanted)
        if reply.chosen is None:
            raise SpecialistUnavailable(f"{target}: {reply.reason}")
        return [reply.chosen, *reply.alternatives], f"{target} -> {reply.reason}"
