"""Double-texting: a second message to a session whose answer is still streaming follows the policy
the caller picks (reject, queue, interrupt, rollback). Real nats-server, gateway and scripted specialist
in this process."""

from __future__ import annotations

import itertools

import anyio
import pytest

from bus.client import Bus, ChatStream
from bus.errors import Cancelled, SessionBusy
from bus.sessions import DoubleText
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from tests.helpers import env, in_process_gateway, in_process_specialists

pytestmark = [pytest.mark.anyio, pytest.mark.fast]

# Slow enough that the first answer is still streaming when the second message comes.
SLOW = env(TEKTON_SCRIPTED_TOKENS_PER_S="40", TEKTON_SCRIPTED_TOKENS="40")
# The whole first answer: its 40 tokens. Compared as text, since tokens of a stalled loop catching
# up may share a chunk frame.
WHOLE_FIRST = "".join(itertools.islice(itertools.cycle(["apollo ", "heard: ", "first"]), 40))


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def second_while_first_streams(
    settings: TektonSettings, policy: DoubleText
) -> tuple[list[str], BaseException | None, str | BaseException, list[tuple[str, str, str]]]:
    """Send "first", read two chunks, send "second" with ``policy``; both outcomes and the turns."""
    with SLOW:
        async with (
            in_process_gateway(settings),
            in_process_specialists(settings, "apollo"),
            Bus.connect(settings) as bus,
        ):
            session = await bus.gateway.create("apollo")
            first_chunks: list[str] = []
            first_error: BaseException | None = None
            second: str | BaseException = ""
            started = anyio.Event()

            async def first() -> None:
                nonlocal first_error
                try:
                    async with bus.stream("apollo", user("first"), session=session.id) as s:
                        async for chunk in s:
                            first_chunks.append(chunk)
                            if len(first_chunks) == 2:
                                started.set()
                        await s.result()
                except Cancelled as err:
                    first_error = err
                finally:
                    started.set()

            async def then_second() -> None:
                nonlocal second
                await started.wait()
                stream: ChatStream = bus.stream(
                    "apollo", user("second"), session=session.id, double_text=policy
                )
                try:
                    async with stream as s:
                        second = (await s.result()).text
                except SessionBusy as err:
                    second = err

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                tg.start_soon(then_second)
            turns = [
                (t.role, t.content.split(":")[0], t.status) for t in (await bus.gateway.get(session.id)).turns
            ]
    return first_chunks, first_error, second, turns


async def test_reject(settings: TektonSettings) -> None:
    chunks, first_error, second, turns = await second_while_first_streams(settings, "reject")
    assert isinstance(second, SessionBusy) and "still answering" in str(second)
    assert first_error is None and "".join(chunks) == WHOLE_FIRST
    assert turns == [("user", "first", "ok"), ("assistant", "apollo heard", "ok")]


async def test_queue(settings: TektonSettings) -> None:
    chunks, first_error, second, turns = await second_while_first_streams(settings, "queue")
    assert first_error is None and "".join(chunks) == WHOLE_FIRST
    assert isinstance(second, str) and second.startswith("apollo heard: second")
    # The second turn began after the first answer was stored: in order, both complete.
    assert turns == [
        ("user", "first", "ok"),
        ("assistant", "apollo heard", "ok"),
        ("user", "second", "ok"),
        ("assistant", "apollo heard", "ok"),
    ]


async def test_interrupt(settings: TektonSettings) -> None:
    chunks, first_error, second, turns = await second_while_first_streams(settings, "interrupt")
    assert isinstance(first_error, Cancelled) and len(chunks) >= 2 and len("".join(chunks)) < len(WHOLE_FIRST)
    assert isinstance(second, str) and second.startswith("apollo heard: second")
    assert turns == [
        ("user", "first", "cancelled"),
        ("assistant", "apollo heard", "cancelled"),
        ("user", "second", "ok"),
        ("assistant", "apollo heard", "ok"),
    ]


async def test_rollback(settings: TektonSettings) -> None:
    chunks, first_error, second, turns = await second_while_first_streams(settings, "rollback")
    assert isinstance(first_error, Cancelled) and len(chunks) >= 2 and len("".join(chunks)) < len(WHOLE_FIRST)
    assert isinstance(second, str) and second.startswith("apollo heard: second")
    assert turns == [("user", "second", "ok"), ("assistant", "apollo heard", "ok")]
