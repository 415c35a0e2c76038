"""A specialist acts on every cancel, lets no stream stall the others, and stops answering nobody.

Assertions are on the order of events, not on how long anything took."""

from __future__ import annotations

import itertools
from contextlib import AsyncExitStack
from typing import Any

import anyio
import msgpack
import nats
import pytest

from bus.settings import TektonSettings
from bus.subjects import cancel_subject, chat_subject
from tests.helpers import env, eventually, in_process_specialists, specialist_process

pytestmark = pytest.mark.anyio

SLOW = {"TEKTON_SCRIPTED_TOKENS_PER_S": "20", "TEKTON_SCRIPTED_TOKENS": "10000"}


def request(request_id: str, text: str, **options: Any) -> bytes:
    body = {"v": 1, "id": request_id, "messages": [{"role": "user", "content": text}], "options": options}
    return msgpack.packb(body)


class Recorder:
    """Frames of several reply streams on one plain nats-py connection, in arrival order."""

    def __init__(self, nc: Any):
        self.nc = nc
        self.events: list[tuple[str, str]] = []  # (stream, frame type); chunks are counted, not listed
        self.chunks: dict[str, int] = {}
        self.ends: dict[str, dict[str, Any]] = {}
        self.first_chunk = {}  # type: dict[str, anyio.Event]
        self.ended: dict[str, anyio.Event] = {}

    async def ask(self, tag: str, subject: str, payload: bytes) -> None:
        inbox = self.nc.new_inbox()
        self.chunks[tag] = 0
        self.first_chunk[tag], self.ended[tag] = anyio.Event(), anyio.Event()

        async def on_frame(msg: Any) -> None:
            frame = msgpack.unpackb(msg.data)
            if frame["type"] == "chunk":
                self.chunks[tag] += 1
                self.first_chunk[tag].set()
                return
            self.events.append((tag, frame["type"]))
            if frame["type"] in ("done", "error"):
                self.ends[tag] = frame
                self.ended[tag].set()

        await self.nc.subscribe(inbox, cb=on_frame, pending_msgs_limit=1_000_000, pending_bytes_limit=-1)
        await self.nc.publish(subject, payload, reply=inbox)
        await self.nc.flush()


async def test_a_cancel_that_arrives_before_its_request_is_not_lost(settings: TektonSettings) -> None:
    stack = AsyncExitStack()
    with anyio.fail_after(30):
        with env(**SLOW):
            services = await stack.enter_async_context(in_process_specialists(settings, "apollo"))
        async with stack:
            nc = await nats.connect(settings.nats_url)
            try:
                recorder = Recorder(nc)
                # The cancel goes out first: the specialist has not heard of the request yet.
                await nc.publish(cancel_subject("early-1"), b"")
                await recorder.ask("early", chat_subject("apollo"), request("early-1", "a long answer"))
                with anyio.fail_after(10):
                    await recorder.ended["early"].wait()
            finally:
                await nc.close()
            assert recorder.ends["early"]["type"] == "error"
            assert recorder.ends["early"]["code"] == "cancelled"
            counters = services["apollo"].counters
            await eventually(lambda: counters.cancelled == 1 and counters.in_flight == 0)


async def test_a_stream_at_full_speed_yields_to_other_requests_and_to_cancels(
    settings: TektonSettings,
) -> None:
    # As fast as the provider can, in its own process, and long enough for another request and a
    # cancel to come while it goes (its tokens leave as one frame per slice, see BURST_GAP_S): the
    # only chance anything else gets is the specialist's own yielding (without it, this test fails).
    flood_tokens = 1_000_000
    with (
        specialist_process(settings, "apollo", TEKTON_SCRIPTED_TOKENS=str(flood_tokens)),
        anyio.fail_after(120),
    ):
        # A flood that ended before its cancel arrived proves nothing either way (a loaded machine can
        # delay the cancel past the flood's last chunk): such a round is tried again. A specialist that
        # does not yield never lets a cancel in, so every round ends that way and the test fails.
        for attempt in range(3):
            ended, other_frames, text = await _flood_with_another_request_and_a_cancel(
                settings, f"{attempt}", flood_tokens
            )
            # (its three tokens: the first alone, the others in one or two more chunk frames)
            assert other_frames[0] == "start" and other_frames[-1] == "done", other_frames
            assert set(other_frames[1:-1]) == {"chunk"} and 2 <= len(other_frames) - 2 <= 3, other_frames
            if ended["type"] == "error":
                break
    # The flood was still going when the other request had finished, and the cancel stopped it.
    assert ended["type"] == "error" and ended["code"] == "cancelled", (ended, text)
    # The scripted answer to "flood": these three tokens over and over.
    whole = "".join(itertools.islice(itertools.cycle(["apollo ", "heard: ", "flood"]), flood_tokens))
    assert len(text) < len(whole)


async def _flood_with_another_request_and_a_cancel(
    settings: TektonSettings, round_id: str, flood_tokens: int
) -> tuple[dict[str, Any], list[str], str]:
    """One round: a flood, another request while it goes, and the flood's cancel once the other
    request starts. The flood's last frame, the other request's frame types, the flood's text."""
    nc = await nats.connect(settings.nats_url)
    other_frames: list[str] = []
    other_done = anyio.Event()
    flood_id = f"flood-{round_id}"

    # The other request and the cancel go over a connection of their own: on the flood's, this
    # client would read thousands of flood chunks before the other's frames, and on a fast machine
    # the flood ended while it caught up (CI failed so, twice).
    other_nc = await nats.connect(settings.nats_url)

    async def on_other(msg: Any) -> None:
        frame = msgpack.unpackb(msg.data)
        other_frames.append(frame["type"])
        if frame["type"] == "start":
            # The other request is being answered while the flood is still going: stop the flood.
            await other_nc.publish(cancel_subject(flood_id), b"")
        elif frame["type"] == "done":
            other_done.set()

    try:
        flood_sub = await nc.subscribe(nc.new_inbox(), pending_msgs_limit=1_000_000, pending_bytes_limit=-1)
        other_inbox = other_nc.new_inbox()
        await other_nc.subscribe(other_inbox, cb=on_other)
        await other_nc.flush()
        flood = request(flood_id, "flood", max_tokens=flood_tokens)
        await nc.publish(chat_subject("apollo"), flood, reply=flood_sub.subject)
        first = await flood_sub.next_msg(timeout=30)
        assert msgpack.unpackb(first.data)["type"] == "start"
        # The flood is generating now; another request comes in.
        other = request(f"other-{round_id}", "short", max_tokens=3)
        await other_nc.publish(chat_subject("apollo"), other, reply=other_inbox)
        await other_done.wait()
        texts: list[str] = []
        while True:
            frame = msgpack.unpackb((await flood_sub.next_msg(timeout=30)).data)
            if frame["type"] == "chunk":
                texts.append(frame["text"])
            elif frame["type"] in ("done", "error"):
                return frame, other_frames, "".join(texts)
    finally:
        await nc.close()
        await other_nc.close()


async def test_a_client_that_left_without_a_cancel_is_noticed(settings: TektonSettings) -> None:
    stack = AsyncExitStack()
    with anyio.fail_after(30):
        with env(**SLOW):
            services = await stack.enter_async_context(in_process_specialists(settings, "apollo"))
        async with stack:
            asker = await nats.connect(settings.nats_url)
            recorder = Recorder(asker)
            await recorder.ask("gone", chat_subject("apollo"), request("gone-1", "a long answer"))
            await recorder.first_chunk["gone"].wait()
            await asker.close()  # gone, without a cancel: nobody listens on its inbox any more
            counters = services["apollo"].counters
            # A few heartbeat intervals (0.2 s here), far below the 500 s the answer would take.
            await eventually(lambda: counters.in_flight == 0, within=15)
            assert counters.abandoned == 1 and counters.cancelled == 1 and counters.served == 0
