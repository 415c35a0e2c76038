"""One error tree for everything that crosses the bus, and one policy for every error code.

Every error has a stable ``code`` (the same string an ``error`` frame carries on the wire), a message a
person can act on, and ``retryable``. Clients turn error frames back into these classes with
:func:`from_wire`. :data:`POLICY` says once, per code, what the HTTP bridge answers, what JSON-RPC
code it becomes and whether another candidate specialist may help: aish, the bridge and the gateway
read it there and keep no rules of their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pydantic import ValidationError


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    OVERLOADED = "overloaded"
    MODEL_MISSING = "model_missing"
    API_KEY_MISSING = "api_key_missing"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_ERROR = "provider_error"
    INTERNAL = "internal"
    SESSION_NOT_FOUND = "session_not_found"
    SESSION_TOO_LARGE = "session_too_large"
    GATEWAY_UNAVAILABLE = "gateway_unavailable"
    RUN_NOT_FOUND = "run_not_found"
    SESSION_BUSY = "session_busy"
    # Raised on the client side only; never sent in an error frame.
    NATS_UNAVAILABLE = "nats_unavailable"
    SPECIALIST_UNAVAILABLE = "specialist_unavailable"
    STREAM_GAP = "stream_gap"
    IDLE_TIMEOUT = "idle_timeout"
    MALFORMED_FRAME = "malformed_frame"
    BAD_CONFIG = "bad_config"
    # The HTTP bridge's own refusals.
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"  # no such route
    METHOD_NOT_ALLOWED = "method_not_allowed"  # the route, not with this method
    # The user's token budget is spent (the gateway's usage book; docs/observability.md).
    BUDGET_EXCEEDED = "budget_exceeded"


# JSON-RPC 2.0 error codes (the -32000 range is ours; see docs/http.md)
RPC_PARSE_ERROR = -32700
RPC_INVALID_REQUEST = -32600
RPC_METHOD_NOT_FOUND = -32601
RPC_INVALID_PARAMS = -32602
RPC_INTERNAL = -32603
RPC_SESSION_EXPIRED = -32000
RPC_UNAVAILABLE = -32001
RPC_CONTEXT_LIMIT = -32002
RPC_BUSY = -32003


class Policy(NamedTuple):
    """What one error code means to every edge."""

    http: int  # the HTTP bridge's status
    rpc: int  # the JSON-RPC error code on /ws
    elsewhere: bool  # another candidate specialist may answer where this one failed


POLICY: dict[ErrorCode, Policy] = {
    # The request's own fault: no other specialist does better.
    ErrorCode.BAD_REQUEST: Policy(400, RPC_INVALID_PARAMS, False),
    ErrorCode.PAYLOAD_TOO_LARGE: Policy(413, RPC_CONTEXT_LIMIT, False),
    ErrorCode.SESSION_TOO_LARGE: Policy(413, RPC_CONTEXT_LIMIT, False),
    ErrorCode.SESSION_NOT_FOUND: Policy(404, RPC_SESSION_EXPIRED, False),
    ErrorCode.RUN_NOT_FOUND: Policy(404, RPC_SESSION_EXPIRED, False),
    ErrorCode.SESSION_BUSY: Policy(409, RPC_BUSY, False),
    ErrorCode.CANCELLED: Policy(499, RPC_INTERNAL, False),
    ErrorCode.DEADLINE_EXCEEDED: Policy(504, RPC_INTERNAL, False),
    ErrorCode.BAD_CONFIG: Policy(500, RPC_INTERNAL, False),
    ErrorCode.UNAUTHORIZED: Policy(401, RPC_INVALID_REQUEST, False),
    ErrorCode.RATE_LIMITED: Policy(429, RPC_INTERNAL, False),
    ErrorCode.NOT_FOUND: Policy(404, RPC_METHOD_NOT_FOUND, False),
    ErrorCode.METHOD_NOT_ALLOWED: Policy(405, RPC_METHOD_NOT_FOUND, False),
    ErrorCode.BUDGET_EXCEEDED: Policy(429, RPC_INTERNAL, False),
    # The bus itself is missing: every candidate is behind the same gateway or server.
    ErrorCode.GATEWAY_UNAVAILABLE: Policy(503, RPC_UNAVAILABLE, False),
    ErrorCode.NATS_UNAVAILABLE: Policy(503, RPC_UNAVAILABLE, False),
    # This specialist (or its replica, provider, model) failed: another one may not.
    ErrorCode.SPECIALIST_UNAVAILABLE: Policy(404, RPC_UNAVAILABLE, True),
    ErrorCode.SHUTTING_DOWN: Policy(503, RPC_UNAVAILABLE, True),
    ErrorCode.OVERLOADED: Policy(503, RPC_UNAVAILABLE, True),
    ErrorCode.MODEL_MISSING: Policy(502, RPC_INTERNAL, True),
    ErrorCode.API_KEY_MISSING: Policy(502, RPC_INTERNAL, True),
    ErrorCode.PROVIDER_UNAVAILABLE: Policy(502, RPC_INTERNAL, True),
    ErrorCode.PROVIDER_ERROR: Policy(502, RPC_INTERNAL, True),
    ErrorCode.INTERNAL: Policy(502, RPC_INTERNAL, True),
    ErrorCode.STREAM_GAP: Policy(502, RPC_INTERNAL, True),
    ErrorCode.IDLE_TIMEOUT: Policy(504, RPC_INTERNAL, True),
    ErrorCode.MALFORMED_FRAME: Policy(502, RPC_INTERNAL, True),
}


class BusError(Exception):
    """Root of every Tekton error. ``str(err)`` is the one line shown to a user."""

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, code: ErrorCode | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    @property
    def policy(self) -> Policy:
        return POLICY[self.code]

    @property
    def http_status(self) -> int:
        return self.policy.http

    @property
    def rpc_code(self) -> int:
        return self.policy.rpc

    @property
    def may_help_elsewhere(self) -> bool:
        """Another candidate specialist might answer where this error came from."""
        return self.policy.elsewhere


def may_have_started(err: BaseException) -> bool:
    """Whether a request that failed on its way (``err``) may be running anyway: interrupted (Ctrl-C, a
    deadline) while a gateway accepted it, or no acceptance within the wait (:class:`GatewayTimeout`):
    the gateway may well have started it, so the caller cancels it. Any other error is an answer (a
    refusal, an error reply, nobody to ask): nothing started."""
    return not isinstance(err, BusError) or isinstance(err, GatewayTimeout)


class BadRequest(BusError):
    code = ErrorCode.BAD_REQUEST


class InvalidInput(BadRequest):
    """A request the client itself found invalid before sending it (a session name with a space): the
    caller's input to change. aish says it as a usage error (exit 2)."""


class MalformedFrame(BusError):
    code = ErrorCode.MALFORMED_FRAME


class PayloadTooLarge(BusError):
    code = ErrorCode.PAYLOAD_TOO_LARGE
    size = 0
    limit = 0

    def __init__(self, size: int, limit: int, what: str = "message"):
        super().__init__(
            f"{what} is {size:,} bytes, over the server's max_payload of {limit:,} bytes; "
            "send a shorter text or raise max_payload in the nats-server config"
        )
        self.size = size
        self.limit = limit


class NatsUnavailable(BusError):
    code = ErrorCode.NATS_UNAVAILABLE
    retryable = True

    def __init__(self, url: str, reason: str = ""):
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"no NATS server answers at {url}{detail}; start Tekton with `tekton up` "
            "(or just the server with `tekton nats`), or point --nats / TEKTON_NATS_URL at a running one"
        )
        self.url = url


class SpecialistUnavailable(BusError):
    code = ErrorCode.SPECIALIST_UNAVAILABLE

    @classmethod
    def named(cls, name: str, running: Iterable[str] = ()) -> SpecialistUnavailable:
        """Nobody answers for ``name``; suggest the closest of the ``running`` names."""
        names = sorted(set(running))
        import difflib  # only for this message (a one-shot aish starts without it)

        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean '{close[0]}'?"
        elif names:
            hint = f"; running: {', '.join(names)}"
        else:
            hint = "; no specialists are running (start them with `tekton up`)"
        err = cls(f"no specialist named '{name}' is running{hint}")
        err.suggestion = close[0] if close else None
        err.name, err.running = name, names
        return err

    suggestion: str | None = None
    name: str | None = None  # the name nobody answers for, and who does (``named``)
    running: list[str] | None = None


class StreamGap(BusError):
    code = ErrorCode.STREAM_GAP
    retryable = True

    def __init__(self, expected: int, got: int):
        super().__init__(
            f"reply stream lost frames (expected seq {expected}, got {got}); "
            "the client fell behind or the connection dropped, retry the request"
        )
        self.expected = expected
        self.got = got


class IdleTimeout(BusError):
    code = ErrorCode.IDLE_TIMEOUT
    retryable = True

    def __init__(self, specialist: str, seconds: float):
        super().__init__(
            f"'{specialist}' sent nothing for {seconds:g} s (no token, no heartbeat); "
            "it probably died mid-stream, retry to reach another replica"
        )


class DeadlineExceeded(BusError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(BusError):
    code = ErrorCode.CANCELLED


class SessionNotFound(BusError):
    code = ErrorCode.SESSION_NOT_FOUND

    @classmethod
    def named(cls, ref: str, ttl_s: float | None = None) -> SessionNotFound:
        expiry = f", or expired after {ttl_s:g} s unused" if ttl_s else ", or expired"
        return cls(f"no session '{ref}' (unknown, deleted{expiry}); `aish sessions` lists them")


class RunNotFound(BusError):
    code = ErrorCode.RUN_NOT_FOUND

    @classmethod
    def named(cls, run_id: str, keep_s: float) -> RunNotFound:
        return cls(
            f"no run '{run_id}' of yours is kept (finished runs are kept {keep_s:g} s); "
            "`aish runs` lists them"
        )


class SessionBusy(BusError):
    """A message to a session still answering, with the double-texting policy ``reject``."""

    code = ErrorCode.SESSION_BUSY


class SessionTooLarge(BusError):
    code = ErrorCode.SESSION_TOO_LARGE


class GatewayUnavailable(BusError):
    code = ErrorCode.GATEWAY_UNAVAILABLE
    retryable = True

    def __init__(self, message: str = "", *, code: ErrorCode | None = None, retryable: bool | None = None):
        super().__init__(
            message
            or "no gateway is running (sessions, fan-out and routing need one): "
            "start it with `tekton up` or `tekton gateway`",
            code=code,
            retryable=retryable,
        )


class GatewayTimeout(GatewayUnavailable):
    """A gateway took the request but did not answer in time: it may have acted on it all the same."""


class ConfigError(BusError):
    """A setting that cannot be used (bad TOML, a value out of range); the message names where."""

    code = ErrorCode.BAD_CONFIG


class Unauthorized(BusError):
    code = ErrorCode.UNAUTHORIZED


class RateLimited(BusError):
    code = ErrorCode.RATE_LIMITED
    retry_after = 1

    def __init__(self, retry_after: int):
        super().__init__(f"too many requests; retry in {retry_after} s")
        self.retry_after = retry_after


class BudgetExceeded(BusError):
    code = ErrorCode.BUDGET_EXCEEDED


class SpecialistError(BusError):
    """An ``error`` frame sent by a specialist (provider failures, overload, shutdown, ...)."""


_BY_CODE: dict[ErrorCode, type[BusError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.SESSION_BUSY: SessionBusy,
    ErrorCode.RUN_NOT_FOUND: RunNotFound,
    ErrorCode.PAYLOAD_TOO_LARGE: PayloadTooLarge,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.SPECIALIST_UNAVAILABLE: SpecialistUnavailable,
    ErrorCode.SESSION_NOT_FOUND: SessionNotFound,
    ErrorCode.SESSION_TOO_LARGE: SessionTooLarge,
    ErrorCode.GATEWAY_UNAVAILABLE: GatewayUnavailable,
    ErrorCode.NATS_UNAVAILABLE: NatsUnavailable,
    ErrorCode.STREAM_GAP: StreamGap,
    ErrorCode.IDLE_TIMEOUT: IdleTimeout,
    ErrorCode.MALFORMED_FRAME: MalformedFrame,
    ErrorCode.BAD_CONFIG: ConfigError,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.BUDGET_EXCEEDED: BudgetExceeded,
}


def from_wire(code: str, message: str, retryable: bool) -> BusError:
    """Rebuild the exception an ``error`` frame or reply reported, as the class its code belongs to."""
    try:
        known = ErrorCode(code)
    except ValueError:
        known = ErrorCode.INTERNAL
    cls = _BY_CODE.get(known, SpecialistError)
    # Some classes build their message from fields; from the wire the message is already written.
    err = cls.__new__(cls)
    BusError.__init__(err, message, code=known, retryable=retryable)
    return err


def problems_line(err: ValidationError, whole: str = "the value", shown: int = 3) -> str:
    """A pydantic error in one line: where and what, for the first ``shown`` problems (never the
    input, which may be megabytes)."""
    problems = [
        f"{'.'.join(str(p)[:40] for p in e['loc']) or whole}: {' '.join(e['msg'].split())}"
        for e in err.errors(include_url=False)[:shown]
    ]
    more = f" (and {err.error_count() - shown} more)" if err.error_count() > shown else ""
    return f"{'; '.join(problems)}{more}"[:400]
