"""Streaming over a real nats-server with specialists served in this process (scripted provider)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import anyio
import msgpack
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from bus.client import Bus, connect
from bus.errors import (
    BadRequest,
    DeadlineExceeded,
    IdleTimeout,
    MalformedFrame,
    PayloadTooLarge,
    SpecialistUnavailable,
    StreamGap,
)
from bus.logs import Sparse
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.subjects import chat_subject
from bus.wire import (
    ChatMessage,
    ChatOptions,
    ErrorFrame,
    HeartbeatFrame,
    StartFrame,
    decode_frame,
    encode,
    encode_chunk,
)
from specialists import service
from specialists.service import ReplyStream
from tests.helpers import eventually, in_process_gateway, in_process_specialists

pytestmark = pytest.mark.anyio


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def test_flush_returns_once_the_server_has_what_was_sent_before_it(tmp_path: Path) -> None:
    """A subscribe then flush() is in place on the server (nats-py 2.16 sent the flush's PING ahead of
    the SUB, so another connection's request could meet "no responders"). nats-server's own trace
    shows the order it read our commands in."""
    log_file = tmp_path / "nats.log"
    with EmbeddedNats(tmp_path / "store", port=0, log_file=log_file, extra_config="trace: true") as server:
        nc = await connect(server.url)
        try:

            async def heard(_msg: Msg) -> None:
                return None

            await nc.subscribe("order.check", cb=heard)
            await nc.flush()

            def pinged_after_the_sub() -> bool:  # (the log reaches the file through a copying thread)
                said = log_file.read_text()
                return "<<- [PING]" in said.partition("<<- [SUB order.check")[2]

            # Before the fix the flush's PING came first, and no other PING follows within a minute.
            try:
                await eventually(pinged_after_the_sub, within=5)
            except TimeoutError:
                pytest.fail("the server read the flush's PING before the SUB")
        finally:
            await nc.close()


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T in /proc)."""
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    return all((task / "stat").read_text().rpartition(") ")[2].startswith("T") for task in tasks)


async def test_a_flush_that_timed_out_leaves_the_connection_hearing(tmp_path: Path) -> None:
    """nats-py set the result of a timed-out flush's future when its PONG came late; the error ended
    the connection's read loop, and it heard nothing more until the ping check, minutes later."""
    with EmbeddedNats(tmp_path / "store", port=0) as server:
        assert server.process is not None
        nc, other = await connect(server.url), await connect(server.url)
        heard = anyio.Event()

        async def on_message(_msg: Msg) -> None:
            heard.set()

        try:
            await nc.subscribe("still.hearing", cb=on_message)
            await nc.flush()
            server.process.send_signal(signal.SIGSTOP)  # a server too busy to answer in time
            try:
                await eventually(lambda: _all_threads_stopped(server.process.pid))  # (a signal lands later)
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.flush(timeout=0.2)  # type: ignore[arg-type]  # (nats-py types it int)
            finally:
                server.process.send_signal(signal.SIGCONT)
            await other.publish("still.hearing", b"x")
            with anyio.fail_after(5):
                await heard.wait()
            await nc.flush()
        finally:
            await nc.close()
            await other.close()


async def test_stream_tokens_then_result(settings: TektonSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "20")  # a model's pace: each token as it comes
    # (and no burst, even when a loaded machine stalls the loop for longer than a token's 50 ms)
    monkeypatch.setattr(service, "BURST_GAP_S", 0.0)
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        async with bus.stream("apollo", user("queue groups share load")) as s:
            chunks = [c async for c in s]
        result = await s.result()
    assert chunks == ["apollo ", "heard: ", "queue ", "groups ", "share ", "load"]
    assert result.text == "apollo heard: queue groups share load"
    assert result.start.specialist == "apollo" and result.start.provider == "scripted"
    assert result.done.usage.completion_tokens == 6
    assert result.done.finish_reason == "stop"
    assert result.done.timings.first_token_ms is not None
    assert result.done.timings.total_ms >= result.done.timings.first_token_ms


async def test_a_burst_of_tokens_goes_in_fewer_frames_after_the_first(settings: TektonSettings) -> None:
    """A provider producing flat out (the scripted one, unpaced): its first token leaves alone at once,
    the rest of the burst together, and the usage still counts every token."""
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        async with bus.stream("apollo", user("queue groups share load")) as s:
            chunks = [c async for c in s]
        result = await s.result()
    assert chunks[0] == "apollo " and 2 <= len(chunks) < 6, chunks
    assert "".join(chunks) == result.text == "apollo heard: queue groups share load"
    assert result.done.usage.completion_tokens == 6


async def test_held_tokens_leave_when_the_producer_pauses_and_before_any_other_frame(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst's tokens after the first are held for one frame: they leave as soon as the producer
    waits (here, the test reading), not with its next token, and always before a later frame."""
    # A burst as wide as a loaded machine may stall this process between two calls.
    monkeypatch.setattr(service, "BURST_GAP_S", 0.05)
    nc = await nats.connect(settings.nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        reply = ReplyStream(nc, inbox)

        async def frame() -> dict[str, Any]:
            return msgpack.unpackb((await sub.next_msg(timeout=0.5)).data)  # type: ignore[no-any-return]

        await reply.chunk("a ")
        await reply.chunk("b ")  # in the same burst: held
        await reply.chunk("c ")
        first = await frame()
        held = await frame()  # the "producer" waits, with no next token in sight
        assert (first["seq"], first["text"]) == (0, "a ") and (held["seq"], held["text"]) == (1, "b c ")
        await anyio.sleep(0.2)
        await reply.chunk("d ")  # after a pause: alone, at once
        await reply.chunk("e ")  # held, then sent ahead of the heartbeat that follows it
        await reply.send(HeartbeatFrame)
        frames = [await frame() for _ in range(3)]
        assert [(f["seq"], f["type"], f.get("text")) for f in frames] == [
            (2, "chunk", "d "),
            (3, "chunk", "e "),
            (4, "heartbeat", None),
        ]
        assert reply.chunks == 5
    finally:
        await nc.close()


async def test_max_tokens_gives_length(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        result = await bus.ask("apollo", "one two three four five", ChatOptions(max_tokens=2))
    assert result.text == "apollo heard: "
    assert result.done.finish_reason == "length"


async def test_unknown_specialist_suggests_a_name_fast(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo", "athena"), Bus.connect(settings) as bus:
        started = time.perf_counter()
        with anyio.fail_after(2), pytest.raises(SpecialistUnavailable) as info:
            await bus.ask("apolo", "hi")
        elapsed = time.perf_counter() - started
        assert "did you mean 'apollo'?" in str(info.value)
        assert info.value.suggestion == "apollo"
        with pytest.raises(SpecialistUnavailable, match="running: apollo, athena"):
            await bus.ask("zeus", "hi")
    # The figure is measured in bench/stream.py; here only "no hang" (generous for a shared machine).
    assert elapsed < 1.0


async def test_each_request_is_served_in_its_own_task(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_FIRST_TOKEN_MS", "800")
    async with (
        in_process_specialists(settings, "apollo") as services,
        Bus.connect(settings) as bus,
        bus.stream("apollo", user("one")) as a,
        bus.stream("apollo", user("two")) as b,
    ):
        # Both requests are being generated at once: neither waits for the other to finish.
        await eventually(lambda: services["apollo"].counters.in_flight == 2)
        assert "".join([c async for c in a]).endswith("one")
        assert "".join([c async for c in b]).endswith("two")


async def test_heartbeats_keep_a_slow_stream_alive(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_FIRST_TOKEN_MS", "1500")
    async with (
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
        bus.stream("apollo", user("slow"), idle_timeout=0.6) as s,
    ):
        text = "".join([c async for c in s])
    assert text == "apollo heard: slow"


async def test_a_heartbeat_that_cannot_be_sent_takes_down_neither_the_answer_nor_the_replica(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat ticker serves every stream of a replica: a publish refused there (nats-py
    refuses one while it reconnects with a full buffer) ended the ticker's task and, with it, the
    whole replica's task group."""
    monkeypatch.setenv("TEKTON_SCRIPTED_FIRST_TOKEN_MS", "800")  # silent long enough for heartbeats
    send = ReplyStream.send
    refused: list[str] = []

    async def refusing(self: ReplyStream, frame_type: type[Any], **fields: Any) -> None:
        if frame_type is HeartbeatFrame and not refused:
            refused.append(self.subject)
            raise nats.errors.OutboundBufferLimitError
        await send(self, frame_type, **fields)

    monkeypatch.setattr(ReplyStream, "send", refusing)
    async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
        first = await bus.ask("apollo", "through it")
        assert refused and first.text == "apollo heard: through it"
        assert (await bus.ask("apollo", "after")).text == "apollo heard: after"
        assert services["apollo"].counters.in_flight == 0


async def test_deadline_exceeded(settings: TektonSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "20")
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "200")
    async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
        with pytest.raises(DeadlineExceeded, match="deadline"):
            async with bus.stream("apollo", user("x"), timeout=0.3) as s:
                async for _ in s:
                    pass
        assert services["apollo"].counters.errors == 1
        assert (await bus.ask("apollo", "x", ChatOptions(max_tokens=3))).text == "apollo heard: x"


async def test_early_exit_cancels_generation_on_the_specialist(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "50")
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "10000")
    async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
        async with bus.stream("apollo", user("long")) as s:
            async for _ in s:
                break
        counters = services["apollo"].counters
        await eventually(lambda: counters.cancelled == 1 and counters.in_flight == 0)
        assert counters.served == 0


async def test_oversized_message_is_refused_before_sending(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
        too_big = "x" * (bus.nc.max_payload + 1)
        with pytest.raises(PayloadTooLarge, match="max_payload"):
            await bus.ask("apollo", too_big)
        assert services["apollo"].counters.in_flight == 0
        assert (await bus.ask("apollo", "still fine")).text == "apollo heard: still fine"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1garbage",
        msgpack.packb({"v": 1, "type": "chunk", "seq": 0, "text": "a frame, not a request"}),
        b"",
    ],
)
async def test_malformed_or_foreign_request_gets_an_error_frame(
    settings: TektonSettings, payload: bytes
) -> None:
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        reply = await bus.nc.request(chat_subject("apollo"), payload, timeout=2)
        frame = decode_frame(reply.data)
        assert isinstance(frame, ErrorFrame)
        assert frame.code == "bad_request"  # as docs/protocol.md says: the request is the asker's fault
        # The service keeps running.
        assert (await bus.ask("apollo", "next")).text == "apollo heard: next"


async def _rogue_specialist(bus: Bus, name: str, frames: list[bytes]) -> None:
    """A hand-written responder on the real bus that answers with exactly ``frames``."""

    async def answer(msg) -> None:  # type: ignore[no-untyped-def]
        for f in frames:
            await bus.nc.publish(msg.reply, f)

    await bus.nc.subscribe(chat_subject(name), cb=answer)
    await bus.nc.flush()


async def test_a_lost_frame_is_an_error_not_missing_text(settings: TektonSettings) -> None:
    async with Bus.connect(settings) as bus:
        start = encode(StartFrame(seq=0, specialist="rogue", instance="i", provider="p", model="m"))
        await _rogue_specialist(bus, "rogue", [start, encode_chunk(1, "a"), encode_chunk(3, "c")])
        with pytest.raises(StreamGap, match="expected seq 2, got 3"):
            await bus.ask("rogue", "x")


async def test_a_foreign_reply_frame_is_an_error(settings: TektonSettings) -> None:
    async with Bus.connect(settings) as bus:
        await _rogue_specialist(bus, "rogue", [msgpack.packb({"hello": "world"})])
        with pytest.raises(MalformedFrame):
            await bus.ask("rogue", "x")


async def test_silence_is_an_idle_timeout(settings: TektonSettings) -> None:
    async with Bus.connect(settings) as bus:
        start = encode(StartFrame(seq=0, specialist="mute", instance="i", provider="p", model="m"))
        await _rogue_specialist(bus, "mute", [start])
        with anyio.fail_after(3), pytest.raises(IdleTimeout, match=r"sent nothing for 0\.3 s"):
            async with bus.stream("mute", user("x"), idle_timeout=0.3) as s:
                async for _ in s:
                    pass


async def test_bad_options_are_rejected_before_sending(settings: TektonSettings) -> None:
    with pytest.raises(ValueError):
        ChatOptions(max_tokens=0)
    assert BadRequest("x").code == "bad_request"


def poison(kind: str, chat: bytes) -> bytes:
    body = msgpack.packb({"v": 1, "id": "poison1", "messages": [{"role": "user", "content": "x"}]})
    return {
        "reply": b"PUB $SRV.PING _INBOX.x.\xff 0\r\n\r\n",
        "chat-reply": b"PUB %s _INBOX.x.\xfe %d\r\n%s\r\n" % (chat, len(body), body),
        "status": b"HPUB $SRV.PING _INBOX.x.y 15 15\r\nNATS/1.0 \xff\xfe\r\n\r\n\r\n",
        "short-header": b"HPUB $SRV.PING _INBOX.x.y 8 8\r\nNATS/1.0\r\n",
    }[kind]


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["reply", "chat-reply", "status", "short-header"])
async def test_a_message_nats_py_cannot_read_takes_no_service_off_the_bus(
    settings: TektonSettings, kind: str
) -> None:
    """A reply subject or a header status that is not UTF-8, or a header block too short to read
    (nats-server passes them on), is dropped by each service's connection; before, nats-py's read
    loop died of it, and one such `$SRV.PING` took every specialist and the gateway off the bus until
    the ping check, minutes on."""
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        attacker = await nats.connect(settings.nats_url)
        await attacker._send_command(poison(kind, chat_subject("apollo", settings.prefix).encode()))
        await attacker.flush()
        await attacker.close()
        with anyio.fail_after(10):
            answer = await bus.ask("apollo", "still there?")
            sessions = await bus.gateway.list()
    assert answer.text == "apollo heard: still there?" and sessions == []


@pytest.mark.fast
async def test_requests_refused_for_their_reply_subject_are_logged_sparsely(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may send them: 40 pings with a forbidden reply subject to two specialists are one
    warning saying how many, not a line per service per ping (before: 80 lines)."""
    said: list[dict[str, Any]] = []

    class Heard:
        def warning(self, event: str, **fields: Any) -> None:
            said.append({"event": event, **fields})

    monkeypatch.setattr("bus.micro.log", Heard())
    monkeypatch.setattr("bus.logs.refused", Sparse(every=60))
    monkeypatch.setattr("bus.micro.refused", Sparse(every=60), raising=False)
    async with in_process_specialists(settings, "apollo", "athena"), Bus.connect(settings) as bus:
        for _ in range(40):
            await bus.nc.publish("$SRV.PING", b"", reply="$KV.tekton_sessions.s.x")
        # A ping each service answers comes after the 40 on the same subscription: once both answer,
        # all 40 have been handled.
        answers = await bus.nc.subscribe(inbox := bus.nc.new_inbox())
        await bus.nc.publish("$SRV.PING", b"", reply=inbox)
        for _ in range(2):
            await answers.next_msg(timeout=5)
    assert len(said) == 1, f"{len(said)} lines"
    assert [(s["event"], s["times"]) for s in said] == [
        ("service request with a reply subject no client reads dropped", 1)
    ]
