"""One error tree for everything that crosses the bus.

Every error has a stable ``code`` (the same string an ``error`` frame carries on the wire), a message a
person can act on, and ``retryable``. Clients turn error frames back into these classes with
:func:`from_wire`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from enum import StrEnum


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


class BadRequest(BusError):
    code = ErrorCode.BAD_REQUEST


class MalformedFrame(BusError):
    code = ErrorCode.MALFORMED_FRAME


class PayloadTooLarge(BusError):
    code = ErrorCode.PAYLOAD_TOO_LARGE

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
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean '{close[0]}'?"
        elif names:
            hint = f"; running: {', '.join(names)}"
        else:
            hint = "; no specialists are running (start them with `tekton up`)"
        err = cls(f"no specialist named '{name}' is running{hint}")
        err.suggestion = close[0] if close else None
        return err

    suggestion: str | None = None


class StreamGap(BusError):
    code = ErrorCode.STREAM_GAP
    retryable = True

    def __init__(self, expected: int, got: int):
        super().__init__(
            f"reply stream lost frames (expected seq {expected}, got {got}); "
            "the client fell behind or the connection dropped, retry the request"
        )


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


class SpecialistError(BusError):
    """An ``error`` frame sent by a specialist (provider failures, overload, shutdown, ...)."""


_BY_CODE: dict[ErrorCode, type[BusError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.SESSION_BUSY: SessionBusy,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.SPECIALIST_UNAVAILABLE: SpecialistUnavailable,
    ErrorCode.SESSION_NOT_FOUND: SessionNotFound,
    ErrorCode.SESSION_TOO_LARGE: SessionTooLarge,
}


def from_wire(code: str, message: str, retryable: bool) -> BusError:
    """Rebuild the exception a specialist reported in an ``error`` frame."""
    try:
        known = ErrorCode(code)
    except ValueError:
        known = ErrorCode.INTERNAL
    cls = _BY_CODE.get(known, SpecialistError)
    return cls(message, code=known, retryable=retryable)
