"""The error policy: one map from every error code to its HTTP status, JSON-RPC code and whether another
candidate specialist may help; error frames come back as the class of their code."""

from __future__ import annotations

import pytest

from bus.errors import (
    POLICY,
    BadRequest,
    BusError,
    ErrorCode,
    GatewayUnavailable,
    PayloadTooLarge,
    SessionNotFound,
    SpecialistUnavailable,
    from_wire,
)

pytestmark = pytest.mark.fast


def test_every_code_has_one_policy() -> None:
    assert set(POLICY) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_comes_back_as_itself(code: ErrorCode) -> None:
    err = from_wire(str(code), "what happened", retryable=False)
    assert err.code == code and str(err) == "what happened"
    assert err.http_status == POLICY[code].http and err.rpc_code == POLICY[code].rpc


def test_payload_too_large_from_the_wire_is_a_413_that_no_other_specialist_helps() -> None:
    err = from_wire("payload_too_large", "the request is 2,000,000 bytes", retryable=False)
    assert isinstance(err, PayloadTooLarge)
    assert err.http_status == 413 and err.rpc_code == -32002
    assert not err.may_help_elsewhere


def test_what_may_help_elsewhere() -> None:
    # The request's own fault, or the bus itself missing: no candidate does better.
    for err in [
        BadRequest("x"),
        PayloadTooLarge(2, 1),
        SessionNotFound("x"),
        GatewayUnavailable(),
        from_wire("cancelled", "x", False),
    ]:
        assert not err.may_help_elsewhere, err.code
    # This specialist failed: the next one may not.
    for err in [
        SpecialistUnavailable("x"),
        from_wire("provider_error", "x", False),
        from_wire("api_key_missing", "x", False),
        from_wire("shutting_down", "x", True),
        from_wire("something-new", "x", False),
    ]:
        assert err.may_help_elsewhere, err.code


def test_an_unknown_code_is_an_internal_error_that_keeps_its_message() -> None:
    err = from_wire("from-the-future", "a newer specialist failed", retryable=True)
    assert isinstance(err, BusError) and err.code == ErrorCode.INTERNAL
    assert err.retryable and err.http_status == 502
