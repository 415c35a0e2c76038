"""Durable runs (bus/runs.py): resume after lost frames or a killed client, attach, detach, list.

Real nats-server with JetStream, specialists in this process (scripted provider), clients as real
subprocesses where the test is about a process going away.
"""

from __future__ import annotations

import signal
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest

from bus.client import Bus, StreamResult
from bus.errors import Cancelled, RunNotFound
from bus.runs import ensure_runs_stream, probe_subject, run_subject, runs_stream_name
from bus.server import EmbeddedNats
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from tests.helpers import (
    child_env,
    env,
    eventually,
    gateway_process,
    in_process_gateway,
    in_process_specialists,
    run_aish,
    spawn,
)

pytestmark = pytest.mark.anyio

WORDS = [f"w{i}" for i in range(40)]
QUESTION = " ".join(WORDS)
# What the scripted apollo answers to QUESTION, token by token: every word is unique, so a duplicate
# or a gap shows.
TOKENS = ["apollo ", "heard: ", *(w + " " for w in WORDS[:-1]), WORDS[-1]]
# The whole answer: compared as text, since a burst of tokens (a stalled loop catching up) may come in
# one chunk frame.
ANSWER = "".join(TOKENS)
SLOW = env(TEKTON_SCRIPTED_TOKENS_PER_S="40")
# A dead gateway's turns are taken over once its alive key has not changed for this long (default 6 s).
LEASE = {"TEKTON_GATEWAY_LEASE_S": "1"}


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


@pytest.mark.fast
async def test_frames_lost_on_the_live_path_are_read_back_from_the_run(settings: TektonSettings) -> None:
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            resumed: list[int] = []
            got: list[str] = []
            async with bus.stream("apollo", user(QUESTION), idle_timeout=0.5) as s:
                s.on_resume = resumed.append
                async for chunk in s:
                    got.append(chunk)
                    if len(got) == 5:
                        # As a dropped connection would: the live subscription goes away, frames
                        # published meanwhile reach nobody but the runs stream.
                        assert s.run_subject is not None
                        await bus._run_subs[s.run_subject].unsubscribe()
                result = await s.result()
    assert "".join(got) == ANSWER
    assert result.text == "".join(TOKENS)
    assert resumed == [6]  # frames 0 (start) and 1-5 (chunks) were read live


@pytest.mark.fast
async def test_resume_midway_gives_every_chunk_once(settings: TektonSettings) -> None:
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            got: list[str] = []
            async with bus.stream("apollo", user(QUESTION)) as s:
                async for chunk in s:
                    got.append(chunk)
                    if len(got) in (3, 20):
                        await s.resume()
    assert "".join(got) == ANSWER


async def _ask_by_frame(bus: Bus, question: str) -> tuple[StreamResult, dict[int, str]]:
    """An answer, and the text of each of its chunk frames by seq."""
    frames: dict[int, str] = {}
    async with bus.stream("apollo", user(question)) as s:
        async for chunk in s:
            frames[s.last_seq] = chunk
    return await s.result(), frames


@pytest.mark.fast
async def test_attach_after_a_seq_and_list_runs(settings: TektonSettings) -> None:
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            result, frames = await _ask_by_frame(bus, QUESTION)
            runs = await bus.runs()
            assert [(r.specialist, r.state) for r in runs] == [("apollo", "done")]
            async with bus.attach(runs[0].run_id, after=10) as a:
                rest = [c async for c in a]
            assert (await a.result()).done == result.done
    # Frame 0 is the start: the rest begins with the frame after seq 10.
    assert rest == [text for seq, text in sorted(frames.items()) if seq > 10] != []


@pytest.mark.fast
async def test_runs_that_end_together_leave_nobody_listening_on_any_of_them(settings: TektonSettings) -> None:
    """A run's subscription ends with it (its UNSUB may ride another write): a specialist's probe of
    any of them, from elsewhere, hears "no responders" at once, with no later traffic from the client."""
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:

        async def ask(i: int, into: list[str]) -> None:
            async with bus.stream("apollo", user(f"q{i}")) as s:
                async for _ in s:
                    pass
            assert s.run_subject is not None
            into.append(s.run_subject)

        subjects: list[str] = []
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(ask, i, subjects)
        assert len(subjects) == 60 and not bus._run_subs
        async with Bus.connect(settings) as other:
            for subject in subjects:
                with pytest.raises(nats.errors.NoRespondersError):
                    await other.nc.request(probe_subject(subject), b"", timeout=2)


@pytest.mark.fast
def test_a_run_subscription_sets_every_field_a_nats_py_subscription_has() -> None:
    """A run's subscription is made without nats-py's constructor (bus/client.py, _RunSubscription):
    a field nats-py adds in a later release would be read and missing there."""
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription

    from bus.client import _Deliver, _RunSubscription

    real = Subscription(Client(), 1, "tekton.run.u.r.*")
    lean = _RunSubscription(Client(), 1, "tekton.run.u.r.*", _Deliver({}, "tekton.run.u.r.f"))
    assert set(vars(lean)) == set(vars(real))


@pytest.mark.fast
async def test_a_run_listened_to_with_no_request_after_it_hears_its_frames(settings: TektonSettings) -> None:
    """A run's SUB waits for a write already due (its request's), else goes at once: a listener that
    sends nothing after it (an attach to a run another client asked) hears the run from the start,
    not from whenever its connection next writes (a SUB left waiting went out ~2 s later)."""
    async with Bus.connect(settings) as bus, Bus.connect(settings) as other:
        subject = run_subject("anonymous", "r1", settings.prefix)
        inbox = await bus.open_run(subject)
        await eventually(lambda: _listened(other, subject), within=1)
        await other.nc.publish(subject, b"frame")
        msg = await inbox.get(5)
        assert msg is not None and msg.data == b"frame"
        await bus.close_run(subject)


async def test_a_run_opened_and_closed_while_reconnecting_leaves_nobody_listening(
    tmp_path: Path, settings: TektonSettings
) -> None:
    """A run's SUB written while the connection is down waits with the other pending writes, which
    go out after nats-py re-sends the live subscriptions: its UNSUB must follow it there, else the
    server keeps listening for a run that ended, and its probes hear silence, not "no responders"."""
    server = EmbeddedNats(tmp_path / "store", port=0)
    server.start()
    port = server.port
    here = settings.model_copy(update={"nats_url": server.url})
    try:
        async with Bus.connect(here) as bus:
            server.stop()
            await eventually(lambda: not bus.nc.is_connected, within=10)
            subject = run_subject("anonymous", "gone", here.prefix)
            await bus.open_run(subject)
            await bus.close_run(subject)
            server = EmbeddedNats(tmp_path / "store", port=port)
            server.start()
            await eventually(lambda: bus.nc.is_connected, within=15)
            await bus.nc.flush()
            async with Bus.connect(here) as other:
                with pytest.raises(nats.errors.NoRespondersError):
                    await other.nc.request(probe_subject(subject), b"", timeout=2)
    finally:
        server.stop()


async def _listened(other: Bus, subject: str) -> bool:
    try:
        await other.nc.request(probe_subject(subject), b"", timeout=0.2)
    except nats.errors.NoRespondersError:
        return False
    except nats.errors.TimeoutError:
        return True  # a listener answers a probe with silence
    return True


async def test_a_closed_attach_leaves_no_consumer_behind(settings: TektonSettings) -> None:
    """Each resume or attach reads through a consumer of the runs stream, and nats-server keeps at most
    1,000 consumers on a stream: those of closed readers must go soon, not hold the limit for a minute
    (the bench's 120 attaches in a row once ended in "maximum consumers limit reached")."""
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            result, frames = await _ask_by_frame(bus, QUESTION)
            run_id = (await bus.runs())[0].run_id
            for _ in range(3):
                async with bus.attach(run_id, after=10) as a:
                    assert [c async for c in a] == [text for seq, text in sorted(frames.items()) if seq > 10]
            js = bus.nc.jetstream()

            async def consumers() -> int:
                return (await js.stream_info(runs_stream_name(settings.prefix))).state.consumer_count

            assert await consumers() >= 1
            await eventually(lambda: _none_left(consumers), within=20)
    assert result.done.finish_reason == "stop"


async def _none_left(consumers: Callable[[], Awaitable[int]]) -> bool:
    return await consumers() == 0


async def test_the_runs_stream_takes_more_than_a_thousand_readers_at_once(settings: TektonSettings) -> None:
    """Unset, nats-server stops at 1,000 consumers on a stream: 400 quick resumes in a row (each made
    up to three) reached it and every later resume failed with "maximum consumers limit reached"."""
    async with Bus.connect(settings) as bus:
        await ensure_runs_stream(bus.nc, settings)
        js = bus.nc.jetstream()
        subject = run_subject("alice", "r1", settings.prefix)
        await js.publish(subject, b"x")

        async def ignore(_msg: Any) -> None:
            return None

        # All open at once: a consumer whose reader left goes 5 s later, and on a loaded machine the
        # first ones went before the last were made (1,038 counted once, on two test workers).
        subs = [
            await js.subscribe(
                subject, cb=ignore, stream=runs_stream_name(settings.prefix), ordered_consumer=True
            )
            for _ in range(1100)
        ]
        info = await js.stream_info(runs_stream_name(settings.prefix))
        assert info.state.consumer_count >= 1100
        for sub in subs:
            await sub.unsubscribe()


@pytest.mark.fast
async def test_attach_to_an_unknown_run_says_so(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        with pytest.raises(RunNotFound, match="no run 'nosuchrun'"):
            async with bus.attach("nosuchrun") as a:
                async for _ in a:
                    pass


CLIENT = textwrap.dedent(
    """
    import sys, anyio
    from bus.client import Bus
    from bus.settings import load_settings
    from bus.wire import ChatMessage

    async def main():
        async with Bus.connect(load_settings()) as bus:
            msgs = [ChatMessage(role="user", content=sys.argv[1])]
            async with bus.stream("apollo", msgs) as s:
                print("RUN", s.run_id, flush=True)
                async for chunk in s:
                    print("CHUNK", s.last_seq, repr(chunk), flush=True)

    anyio.run(main)
    """
)


async def test_a_killed_client_resumes_from_its_last_seq(settings: TektonSettings) -> None:
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            child = spawn([sys.executable, "-c", CLIENT, QUESTION], child_env(settings))
            try:
                run_id = (
                    await anyio.to_thread.run_sync(child.wait_for, lambda ln: ln.startswith("RUN"))
                ).split()[1]
                await anyio.to_thread.run_sync(child.wait_for, lambda ln: ln.startswith("CHUNK 8 "))
            finally:
                child.stop(signal.SIGKILL)
            seen = [line.split(" ", 2) for line in child.seen if line.startswith("CHUNK")]
            before = [eval(text) for _, _, text in seen]  # repr() of a str, printed by the child
            last = int(seen[-1][1])
            async with bus.attach(run_id, after=last) as a:
                after = [c async for c in a]
    assert "".join(before + after) == ANSWER
    assert len(before) >= 8


async def test_detach_then_attach_from_another_process(settings: TektonSettings) -> None:
    with SLOW:
        async with in_process_specialists(settings, "apollo"):
            detached = await run_aish(settings, "--detach", "apollo", QUESTION)
            assert detached.returncode == 0, detached.stderr
            run_id = detached.stdout.strip()
            assert "aish attach" in detached.stderr
            attached = await run_aish(settings, "attach", run_id)
            assert attached.returncode == 0, attached.stderr
            assert attached.stdout == "".join(TOKENS) + "\n"
            listed = await run_aish(settings, "runs")
            assert listed.returncode == 0, listed.stderr
            line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(run_id))
            assert line.split()[1:3] == ["apollo", "done"]


@pytest.mark.fast
async def test_attaching_to_a_finished_run_from_its_start_shows_it_all_on_its_own_line(
    settings: TektonSettings,
) -> None:
    # The run ended before the attach began (a slow machine does this to the test above): the whole
    # answer, then the newline that ends it, exit 0. (aish printed no newline: having read to the
    # end, it took "nothing after the frame asked for" as true and said so instead.)
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        async with bus.stream("apollo", user(QUESTION)) as s:
            answer = await s.result()
        assert s.run_id is not None
        attached = await run_aish(settings, "attach", s.run_id)
        assert attached.returncode == 0, attached.stderr
        assert attached.stdout == answer.text + "\n"
        assert "nothing after" not in attached.stderr
        past = await run_aish(settings, "attach", s.run_id, "--after", str(s.last_seq))
        assert past.returncode == 0 and past.stdout == "" and "nothing after" in past.stderr


async def test_a_detached_run_can_be_cancelled(settings: TektonSettings) -> None:
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="5"):
        async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
            detached = await run_aish(settings, "--detach", "apollo", QUESTION)
            run_id = detached.stdout.strip()
            cancelled = await run_aish(settings, "cancel", run_id)
            assert cancelled.returncode == 0, cancelled.stderr
            await eventually(lambda: services["apollo"].counters.cancelled == 1, within=10)
            with pytest.raises(Cancelled):
                async with bus.attach(run_id) as a:
                    async for _ in a:
                        pass


async def test_run_commands_misused_are_usage_errors(settings: TektonSettings) -> None:
    for args in (("attach",), ("attach", "a.b"), ("runs", "x"), ("--detach", "runs")):
        done = await run_aish(settings, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    unknown = await run_aish(settings, "attach", "nosuchrun")
    assert unknown.returncode == 1 and "no run 'nosuchrun'" in unknown.stderr
    # Not "asked run nosuchrun to stop" (exit 0) for a run that is nowhere.
    cancelled = await run_aish(settings, "cancel", "nosuchrun")
    assert cancelled.returncode == 1 and "no run 'nosuchrun'" in cancelled.stderr


async def test_a_gateway_killed_mid_answer_stores_it_when_back(settings: TektonSettings) -> None:
    with SLOW:
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            gateway = await anyio.to_thread.run_sync(lambda: gateway_process(settings, **LEASE))
            try:
                session = await bus.gateway.create("apollo")
                async with bus.stream("apollo", user(QUESTION), session=session.id) as s:
                    got = []
                    async for chunk in s:
                        got.append(chunk)
                        if len(got) == 3:
                            break
                    gateway.stop(signal.SIGKILL)
                    s.leave()  # the asker goes too, without a cancel: nobody settles the turn
            finally:
                gateway.stop(signal.SIGKILL)
            # The answer goes on to its end in the runs stream meanwhile.
            await eventually(lambda: _run_done(bus, s.request.id), within=20)
            back = await anyio.to_thread.run_sync(lambda: gateway_process(settings, **LEASE))
            try:

                async def stored() -> bool:
                    turns = (await bus.gateway.get(session.id)).turns
                    return len(turns) == 2 and turns[0].status == "ok"

                await eventually(stored, within=20)
                turns = (await bus.gateway.get(session.id)).turns
            finally:
                back.stop()
    assert (turns[1].role, turns[1].status, turns[1].content) == ("assistant", "ok", "".join(TOKENS))


async def _run_done(bus: Bus, run_id: str) -> bool:
    return any(r.run_id == run_id and r.state == "done" for r in await bus.runs())


@pytest.mark.fast
async def test_a_run_nobody_follows_stops_after_its_resume_window(settings: TektonSettings) -> None:
    settings = settings.model_copy(update={"run_resume_window_s": 0.5})
    with env(TEKTON_SCRIPTED_TOKENS_PER_S="20", TEKTON_SCRIPTED_TOKENS="1000"):
        async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
            async with bus.stream("apollo", user("long")) as s:
                async for _ in s:
                    break
                s.leave()  # gone without a cancel, as a killed client
            await eventually(lambda: services["apollo"].counters.cancelled == 1, within=15)
            with pytest.raises(Cancelled):
                async with bus.attach(s.request.id) as a:
                    async for _ in a:
                        pass


@pytest.mark.fast
async def test_a_detached_run_goes_on_with_nobody_listening(settings: TektonSettings) -> None:
    settings = settings.model_copy(update={"run_resume_window_s": 0.0})
    with SLOW:
        async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
            async with bus.stream("apollo", user(QUESTION), detach=True) as s:
                await s.wait_started()
                run_id = s.detach()
            await eventually(lambda: _run_done(bus, run_id), within=20)
            assert services["apollo"].counters.cancelled == 0


@pytest.mark.fast
async def test_a_session_answer_is_a_run_listed_done(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        session = await bus.gateway.create("apollo")
        async with bus.stream("apollo", user("hi"), session=session.id) as s:
            text = "".join([c async for c in s])
        assert s.stored is not None  # the gateway's note follows the done frame in the run
        assert [(r.run_id, r.state) for r in await bus.runs()] == [(s.request.id, "done")]
        async with bus.attach(s.request.id) as a:
            assert "".join([c async for c in a]) == text


@pytest.mark.fast
async def test_a_resume_that_starts_too_late_starts_wider(settings: TektonSettings) -> None:
    """The narrowest resume reckons the stream sequence of the frame it needs from the run's last stored
    frame, which is too late when another run's frames were stored in between: the first frame read
    back is past the one needed, and the resume starts wider, losing nothing."""
    with SLOW:
        async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
            # The replica answers no replay request (one would serve the resume first): the stream's turn.
            replays, services["apollo"]._replay_sub = services["apollo"]._replay_sub, None
            await replays.unsubscribe()
            resumed: list[int] = []
            got: list[str] = []
            async with (
                bus.stream("apollo", user(QUESTION)) as other,
                bus.stream("apollo", user(QUESTION), idle_timeout=1.0) as s,
            ):
                s.on_resume = resumed.append
                async for chunk in s:
                    got.append(chunk)
                    if len(got) == 5:
                        assert s.run_subject is not None
                        await bus._run_subs[s.run_subject].unsubscribe()
                        # Frames of both runs are stored meanwhile, interleaved.
                        async for _ in other:
                            if other.last_seq >= 20:
                                break
    assert "".join(got) == ANSWER
    assert resumed == [6, 6]  # the narrow start missed frames; the wider one did not
