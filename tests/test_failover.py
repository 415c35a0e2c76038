"""One rule for "open the first candidate that starts", from the error policy, on a real nats-server;
and the bridge answering each error code with the policy's status."""

from __future__ import annotations

import httpx
import pytest

from bus.client import Bus
from bus.errors import BusError, PayloadTooLarge
from bus.failover import open_first
from bus.settings import TektonSettings
from bus.subjects import chat_subject
from bus.wire import ChatMessage, ErrorFrame, StartFrame, encode
from tests.helpers import in_process_specialists
from tests.test_http import bridge

pytestmark = pytest.mark.anyio


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def rogue(bus: Bus, name: str, code: str, *, started: bool) -> None:
    """A hand-written responder on the real bus that fails every request with ``code``."""

    async def answer(msg) -> None:  # type: ignore[no-untyped-def]
        seq = 0
        if started:
            start = StartFrame(seq=0, specialist=name, instance="i", provider="p", model="m")
            await bus.nc.publish(msg.reply, encode(start))
            seq = 1
        error = ErrorFrame(seq=seq, code=code, message=f"{name} says {code}")
        await bus.nc.publish(msg.reply, encode(error))

    await bus.nc.subscribe(chat_subject(name), cb=answer)
    await bus.nc.flush()


async def test_an_oversized_request_is_not_tried_on_the_next_candidate(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
        await rogue(bus, "big", "payload_too_large", started=False)
        skipped: list[str] = []
        with pytest.raises(PayloadTooLarge, match="big says"):
            await open_first(
                ["big", "apollo"],
                lambda name: bus.stream(name, user("x")),
                on_skip=lambda name, err, then: skipped.append(name),
            )
        assert skipped == [] and services["apollo"].counters.served == 0


async def test_a_failing_provider_moves_on_to_the_next_candidate(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        # It fails after its start frame, before any text: still "before answering".
        await rogue(bus, "flaky", "provider_error", started=True)
        skipped: list[tuple[str, str, str]] = []
        opened = await open_first(
            ["flaky", "apollo"],
            lambda name: bus.stream(name, user("x")),
            on_skip=lambda name, err, then: skipped.append((name, str(err.code), then)),
        )
        async with opened.stream:
            text = "".join([t async for t in opened.texts])
        assert skipped == [("flaky", "provider_error", "apollo")]
        assert opened.name == "apollo" and text == "apollo heard: x"
        with pytest.raises(BusError, match="flaky says"):
            await open_first(["flaky"], lambda name: bus.stream(name, user("x")))


@pytest.mark.parametrize(
    ("code", "status"),
    [("payload_too_large", 413), ("bad_request", 400), ("provider_error", 502), ("deadline_exceeded", 504)],
)
async def test_the_bridge_answers_a_specialists_error_with_the_policys_status(
    settings: TektonSettings, code: str, status: int
) -> None:
    async with (
        bridge(settings) as url,
        Bus.connect(settings) as bus,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        await rogue(bus, "rogue", code, started=False)
        answer = await http.post("/api/chat", json={"specialist": "rogue", "message": "x"})
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["code"] == code


async def test_refusals_have_the_same_error_body_as_everything_else(settings: TektonSettings) -> None:
    limits = {"http_tokens": ["s3cret"], "http_rate_per_s": 0.01, "http_burst": 1}
    guarded = settings.model_copy(update=limits)
    async with bridge(guarded) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        refused = await http.get("/api/capabilities")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        ok = {"Authorization": "Bearer s3cret"}
        await http.get("/api/capabilities", headers=ok)
        limited = await http.get("/api/capabilities", headers=ok)
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
