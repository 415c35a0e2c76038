"""Discovery and routing on a real nats-server: capability ranking, text routing, health, fallback."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import pytest

from aish_client.parser import AUTO, PipelineSyntaxError, Target, parse
from aish_client.questions import question_pipeline, unquoted_question
from aish_client.repl import COMMANDS
from bench.routing import HELD_OUT, decide, load, roster_views
from bus.client import Bus
from bus.errors import BadRequest
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from gateway.routing import K_NEAREST, CharClassifier, Method, matcher
from tests.helpers import (
    child_env,
    eventually,
    in_process_gateway,
    in_process_specialists,
    run_aish,
    spawn,
    specialist_process,
)
from tests.test_repl import Terminal, aish_command, needs_tmux
from tests.test_security import Team, team  # noqa: F401 (a fixture)

TEKTON = [sys.executable, "-m", "tekton"]

pytestmark = pytest.mark.anyio


def accuracy(method: Method, rows: list[dict[str, str]]) -> float:
    match = matcher(method, roster_views())
    return sum(decide(match, row["text"])[0] == row["specialist"] for row in rows) / len(rows)


@pytest.mark.fast
def test_the_examples_router_beats_the_keyword_one_on_requests_nobody_tuned_on() -> None:
    rows = load(HELD_OUT)
    assert len(rows) >= 150 and len({r["kind"] for r in rows}) == 6
    assert TektonSettings(_env_file=None).routing_method == "examples"  # type: ignore[call-arg]
    examples, lexical = accuracy("examples", rows), accuracy("lexical", rows)
    # Loose on purpose: bench/routing.py reports the figure (per specialist and phrasing kind).
    assert examples >= 0.75 and examples > lexical + 0.1, (examples, lexical)


@pytest.mark.fast
def test_plain_questions_match_and_gibberish_goes_to_the_generalist() -> None:
    match = matcher("examples", roster_views())
    assert decide(match, "what is a mutex?") == ("athena", False)
    assert decide(match, "what's the capital of France") == ("athena", False)
    assert decide(match, "translate hello to French") == ("rhetor", False)
    gibberish = match.judge("qwzx vbnmk plorf")
    assert not gibberish.matched
    assert decide(match, "qwzx vbnmk plorf", generalist="rhetor") == ("rhetor", True)
    why = match.judge("Find the bug in this loop, it skips the last element").why["apollo"]
    assert "nearest example" in why and f"of {K_NEAREST} nearest" in why


@pytest.mark.fast
def test_the_character_classifier_trains_when_no_n_gram_is_shared() -> None:
    """A tiny roster (one specialist, a line each) shares no character n-gram between two examples."""
    assert CharClassifier(["hello world"], [0], 1).probabilities("hello").tolist() == [1.0]
    two = CharClassifier(["write a poem", "fix my python code"], [0, 1], 2)
    assert two.probabilities("fix my code").shape == (2,)


def test_the_character_classifier_has_half_the_say_and_the_explanation_shows_it() -> None:
    match = matcher("examples", roster_views())
    text = "这段 Go 代码在高并发下会死锁吗"  # no spaces between words: few words to match on
    judgement = match.judge(text)
    assert decide(match, text) == ("apollo", False)
    why = judgement.why["apollo"]
    assert "classifier" in why and "characters" in why and "nearest example" in why, why


@pytest.mark.fast
def test_a_long_paste_is_routed_by_the_instruction_after_it() -> None:
    match = matcher("examples", roster_views())
    log = "\n".join(
        f"2026-03-0{i % 9 + 1} 12:{i % 60:02d}:07 INFO worker-{i % 7} processed batch {i} in {30 + i % 50} ms"
        for i in range(70)
    )
    for instruction, wanted in (
        ("Turn this into a plan for next quarter with milestones.", "prometheus"),
        ("Rewrite this log as a friendly status email to customers.", "rhetor"),
    ):
        text = f"{log}\n\n{instruction}"
        assert len(text) > 4000
        assert decide(match, text[:2000])[0] != wanted  # the paste alone says something else
        assert decide(match, text) == (wanted, False)


@pytest.mark.fast
def test_a_correction_routes_that_request_and_pulls_similar_ones() -> None:
    views = roster_views()
    text = "Take notes on this conversation and keep the action items"
    before = matcher("examples", views)
    assert decide(before, text)[0] != "rhetor"
    after = matcher("examples", views, learned=[(text, "rhetor")])
    assert decide(after, text) == ("rhetor", False)
    assert "you sent this request to it before" in after.judge(text.upper() + "!").why["rhetor"]
    assert decide(after, "take notes on this conversation and keep its action items")[0] == "rhetor"
    # A correction to a specialist that is not running is ignored, not an error.
    ignored = matcher("examples", views, learned=[(text, "nobody")])
    assert decide(ignored, text) == decide(before, text)


@pytest.mark.fast
def test_a_quoted_question_where_a_name_would_be_is_routed() -> None:
    (stage,) = parse('"what is a mutex?"').stages
    assert stage.targets == (Target(AUTO, 1, True),) and stage.message == "what is a mutex?"
    piped = parse('echo "notes" | "summarize these" | apollo').stages
    assert str(piped[0].targets[0]) == "@auto" and piped[0].message == "summarize these"
    assert str(piped[1].targets[0]) == "apollo"
    with pytest.raises(PipelineSyntaxError, match="not a valid specialist name"):
        parse("Apollo x")


def write_roster(tmp_path: Path, name: str, change: dict[str, str]) -> Path:
    text = (Path(__file__).parents[1] / "deploy" / "roster.toml").read_text()
    for old, new in change.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_capability_ranking_threshold_and_nearest(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "prometheus", "metis", "apollo"),
        Bus.connect(settings) as bus,
    ):
        reply = await bus.gateway.discover(capability="planning")
        assert [r.name for r in reply.ranked] == ["prometheus", "metis"]
        assert reply.chosen == "prometheus" and reply.alternatives == []
        assert "planning 0.95 x health" in reply.reason
        assert {v.name for v in reply.specialists} == {"prometheus", "metis"}
        low = await bus.gateway.discover(capability="prioritization")  # only metis, 0.7 x health < 0.7
        assert low.chosen is None and "no specialist scores 0.7 or more" in low.reason
        assert low.ranked[0].name == "metis"
        with pytest.raises(BadRequest, match="nearest: code-analysis"):
            await bus.gateway.discover(capability="code-analisys")
        refused = await run_aish(settings, "-c", '@prioritization << "sort these"')
        assert refused.returncode == 1 and "no specialist scores 0.7" in refused.stderr
        listed = await run_aish(settings, "list", "--capability", "planning")
        assert listed.stdout.splitlines()[0].startswith("* prometheus")


async def test_routed_requests_in_aish(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings):
        plain = await run_aish(settings, "how much will our GPU cluster cost per month?")
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.startswith("penia heard:") and "@auto -> penia" in plain.stderr
        cap = await run_aish(settings, "-c", 'echo "the stack trace" | @code-analysis | @writing')
        assert cap.stdout == "rhetor heard: apollo heard: the stack trace\n", cap.stderr
        assert "@code-analysis -> apollo" in cap.stderr and "@writing -> rhetor" in cap.stderr
        flag = await run_aish(settings, "--capability", "requirements", "what is done?")
        assert flag.stdout.startswith("telos heard:")
        fan = await run_aish(settings, "-c", '@planning,@cost-analysis << "the launch"')
        assert fan.stdout.splitlines() == [
            "── prometheus ──",
            "prometheus heard: the launch",
            "── penia ──",
            "penia heard: the launch",
        ]


async def test_a_failing_specialist_loses_rank_and_routing_falls_back(settings: TektonSettings) -> None:
    lenient = settings.model_copy(update={"routing_threshold": 0.5})
    # A real provider pointed at a port where nothing listens: every request fails before a token.
    broken = child_env(lenient, TEKTON_OPENAI_BASE_URL="http://127.0.0.1:9/v1", TEKTON_OPENAI_API_KEY="test")
    argv = [*TEKTON, "specialist", "prometheus", "--provider", "openai", "--log-level", "warning"]
    async with in_process_gateway(lenient), in_process_specialists(lenient, "metis"):
        child = spawn(argv, broken)
        try:
            child.wait_for(lambda line: line.startswith("ready "))
            async with Bus.connect(lenient) as bus:
                await _until_discovered(bus, "prometheus", "metis")
            first = await run_aish(lenient, "-c", '@planning << "plan it"')
            assert first.returncode == 0, first.stderr
            assert first.stdout == "metis heard: plan it\n"
            assert "@planning -> prometheus" in first.stderr
            assert "prometheus failed before answering" in first.stderr and "trying metis" in first.stderr
            async with Bus.connect(lenient) as bus:
                for _ in range(9):
                    with pytest.raises(Exception, match="cannot reach"):
                        await bus.ask("prometheus", "x")
                reply = await bus.gateway.discover(capability="planning", refresh=True)
            assert reply.chosen == "metis", reply.ranked
            prometheus = next(v for v in reply.specialists if v.name == "prometheus")
            assert prometheus.errors == 10 and prometheus.health < 0.7
        finally:
            child.stop()


async def _until_discovered(bus: Bus, *names: str) -> None:
    """Until the gateway's discovery lists every one of ``names`` (a child's "ready" says it
    subscribed; the gateway hears of it at its next survey, which a loaded machine can make miss one)."""
    with anyio.fail_after(30):
        for _ in iter(int, 1):  # polls the gateway: no event to wait on from here
            if set(names) <= {v.name for v in (await bus.gateway.discover(refresh=True)).specialists}:
                return
            await anyio.sleep(0.1)


async def test_replicas_with_different_metadata_are_reported(
    settings: TektonSettings, tmp_path: Path
) -> None:
    other = write_roster(tmp_path, "other.toml", {"code-analysis = 0.95": "code-analysis = 0.5"})
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_specialists(settings.model_copy(update={"roster": other}), "apollo"),
        Bus.connect(settings) as bus,
    ):
        views = await bus.survey()
    (apollo,) = views
    assert len(apollo.instances) == 2
    assert (
        len(apollo.conflicts) == 1
        and "differs" in apollo.conflicts[0]
        and "capabilities" in apollo.conflicts[0]
    )


async def test_a_specialist_that_stops_answering_does_not_stall_discovery(settings: TektonSettings) -> None:
    async with (
        in_process_gateway(settings),
        in_process_specialists(settings, "apollo"),
        Bus.connect(settings) as bus,
    ):
        with specialist_process(settings, "athena") as (child, _):
            assert {v.name for v in await bus.survey()} == {"apollo", "athena"}
            os.kill(child.process.pid, signal.SIGSTOP)  # alive, subscribed, silent
            try:
                with anyio.fail_after(5):  # a hang guard: the gather window bounds it, not the silent one
                    await bus.gateway.discover(refresh=True)

                async def only_apollo() -> bool:
                    with anyio.fail_after(5):
                        names = {v.name for v in (await bus.gateway.discover(refresh=True)).specialists}
                    return names == {"apollo"}

                # A quick look that misses one keeps it until the gateway's next thorough look (a busy
                # loop answers late): gone then, not at once.
                await eventually(only_apollo, within=20)
            finally:
                os.kill(child.process.pid, signal.SIGCONT)
        async with bus.stream("apollo", [ChatMessage(role="user", content="still here")]) as s:
            assert "".join([t async for t in s]) == "apollo heard: still here"


async def test_plain_questions_are_answered_never_refused(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings):
        mutex = await run_aish(settings, "what is a mutex?")
        assert mutex.returncode == 0, mutex.stderr
        assert mutex.stdout.startswith("athena heard: what is a mutex?"), mutex.stderr
        assert "@auto -> athena" in mutex.stderr
        french = await run_aish(settings, "translate hello to French")
        assert french.stdout.startswith("rhetor heard:"), french.stderr
        nothing = await run_aish(settings, "qwzx vbnmk plorf")
        assert nothing.returncode == 0 and nothing.stdout.startswith("athena heard:"), nothing.stderr
        assert "no specialist's profile matches this request" in nothing.stderr
        assert "the generalist answers" in nothing.stderr and "name one" not in nothing.stderr
    other = settings.model_copy(update={"routing_generalist": "rhetor"})
    async with in_process_gateway(other), in_process_specialists(other, "rhetor", "apollo"):
        nothing = await run_aish(other, "-c", '@auto << "qwzx vbnmk plorf"')
        assert nothing.returncode == 0 and nothing.stdout.startswith("rhetor heard:"), nothing.stderr
        assert "@auto -> rhetor" in nothing.stderr
    # The generalist is not running: the best-ranked specialist answers, and aish says so.
    async with in_process_gateway(settings), in_process_specialists(settings, "penia", "apollo"):
        nothing = await run_aish(settings, "qwzx vbnmk plorf")
        assert nothing.returncode == 0, nothing.stderr
        assert "the best-ranked specialist answers" in nothing.stderr


async def test_aish_route_shows_the_ranking_and_why(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings):
        shown = await run_aish(settings, "route", "my python function crashes with a KeyError, why?")
        assert shown.returncode == 0, shown.stderr
        first, *rest = shown.stdout.splitlines()
        assert first.startswith("* apollo") and "text match" in first and "nearest example" in first
        assert all(line.startswith("  ") for line in rest)
        vague = await run_aish(settings, "route", "qwzx vbnmk plorf")
        assert vague.returncode == 0 and "* athena" in vague.stdout
        assert "the generalist answers" in vague.stderr
        empty = await run_aish(settings, "route")
        assert empty.returncode == 2 and "route needs a request" in empty.stderr


async def test_a_rerun_with_another_name_is_learned_and_survives_a_gateway_restart(
    settings: TektonSettings,
) -> None:
    question = "what is a mutex?"
    async with in_process_specialists(settings):
        async with in_process_gateway(settings):
            routed = await run_aish(settings, question)
            assert "@auto -> athena" in routed.stderr, routed.stderr
            rerun = await run_aish(settings, "apollo", question)
            assert rerun.stdout.startswith("apollo heard:"), rerun.stderr
            assert "noted: requests like this go to apollo" in rerun.stderr
            again = await run_aish(settings, question)
            assert again.stdout.startswith("apollo heard:"), again.stderr
            assert "you sent this request to it before" in again.stderr
            # A named request that was not a rerun teaches nothing.
            plain = await run_aish(settings, "penia", "what is a semaphore?")
            assert "noted" not in plain.stderr
        async with in_process_gateway(settings), Bus.connect(settings) as bus:
            # A new gateway replica reads the corrections from JetStream.
            async def learned() -> bool:
                return (await bus.gateway.discover(text="What is a MUTEX")).chosen == "apollo"

            await eventually(learned)


@needs_tmux
@pytest.mark.terminal
async def test_a_quoted_question_at_the_repl_prompt_is_routed(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings, "athena", "apollo"):
        term = Terminal(aish_command(), child_env(settings))
        try:
            await _ask_quoted_questions(term)
        finally:
            term.close()


async def _ask_quoted_questions(term: Terminal) -> None:
    await term.wait_for("2 specialists")
    term.type('"what is a mutex?"')
    term.send("Enter")
    screen = await term.wait_for("athena heard: what is a mutex?")
    assert "syntax error" not in screen and "@auto -> athena" in screen
    await term.prompt()
    term.type('echo "a deadlock in my goroutines" | "find the bug"')
    term.send("Enter")
    await term.wait_for("apollo heard: find the bug")


async def test_corrections_are_per_user_and_can_be_listed_and_forgotten(team: Team) -> None:  # noqa: F811
    question = "what is a mutex?"
    alice_env = {"TEKTON_CREDS": str(team.alice.creds)}
    async with (
        in_process_gateway(team.services),
        in_process_specialists(team.services, "athena", "apollo"),
        Bus.connect(team.alice, name="alice") as alice,
        Bus.connect(team.bob, name="bob") as bob,
    ):
        assert (await alice.gateway.discover(text=question)).chosen == "athena"
        corrected = await alice.gateway.discover(text=question, correct="apollo")
        assert corrected.chosen == "apollo" and "you sent this request to it before" in corrected.reason
        # Hers steer her routing, also of requests like it, and nobody else's.
        assert (await alice.gateway.discover(text="What is a MUTEX")).chosen == "apollo"
        assert (await bob.gateway.discover(text=question)).chosen == "athena"
        assert (await bob.gateway.discover(corrections=True)).corrections == []
        (mine,) = (await alice.gateway.discover(corrections=True)).corrections or []
        assert (mine.text, mine.specialist) == (question, "apollo")
        with pytest.raises(BadRequest, match="you have no routing correction"):
            await bob.gateway.discover(forget=mine.id)
        listed = await run_aish(team.alice, "route", "--corrections", **alice_env)
        assert listed.returncode == 0, listed.stderr
        assert mine.id in listed.stdout and "apollo" in listed.stdout and question in listed.stdout
        theirs = await run_aish(team.bob, "route", "--corrections", TEKTON_CREDS=str(team.bob.creds))
        assert (
            theirs.returncode == 0
            and mine.id not in theirs.stdout
            and "no routing corrections" in theirs.stderr
        )
        wrong = await run_aish(team.alice, "route", "--forget", "zzzz", **alice_env)
        assert wrong.returncode == 1 and "you have no routing correction 'zzzz'" in wrong.stderr
        forgot = await run_aish(team.alice, "route", "--forget", mine.id[:6], **alice_env)
        assert forgot.returncode == 0 and f"forgot {mine.id}" in forgot.stderr, forgot.stderr
        assert (await alice.gateway.discover(text=question)).chosen == "athena"
        assert (await alice.gateway.discover(corrections=True)).corrections == []
    usage = await run_aish(team.alice, "route", "--corrections", "some text")
    assert usage.returncode == 2 and "take no request text" in usage.stderr
    helped = await run_aish(team.alice, "route", "-h")
    assert helped.returncode == 0 and "--forget ID" in helped.stdout and "--corrections" in helped.stdout


def with_routing_model(settings: TektonSettings, **scripted: object) -> TektonSettings:
    """A routing model that is the scripted provider (its answer given by ``scripted``, e.g. text)."""
    return settings.model_copy(
        update={
            "providers": {"judge": {"type": "scripted", **scripted}},
            "routing_model": "judge:router",
            "routing_model_timeout_s": 10.0,
        }
    )


async def test_a_routing_model_picks_and_the_embedding_router_stands_in_when_it_cannot(
    settings: TektonSettings,
) -> None:
    question = "what is a mutex?"
    judged = with_routing_model(settings, text="Hermes")
    async with in_process_gateway(judged), in_process_specialists(judged, "athena", "apollo", "hermes"):
        async with Bus.connect(judged) as bus:
            reply = await bus.gateway.discover(text=question)
            assert reply.chosen == "hermes" and reply.judged_by == "judge:router", reply.reason
            assert (
                "hermes: chosen by judge:router" in reply.reason
                and "embedding router's best: athena" in reply.reason
            )
            # The user's own correction is not asked about.
            mine = await bus.gateway.discover(text=question, correct="apollo")
            assert mine.chosen == "apollo" and mine.judged_by is None
            assert (await bus.gateway.discover(forget="all")).corrections == []
        shown = await run_aish(judged, "what does this stack trace mean")
        assert shown.stdout.startswith("hermes heard:"), shown.stderr
        assert "@auto -> hermes" in shown.stderr and "chosen by judge:router" in shown.stderr
    # An answer that names no running specialist: the embedding router chooses, and says why.
    chatty = with_routing_model(settings, text="Hard to say, maybe a knowledge person?")
    async with in_process_gateway(chatty), in_process_specialists(chatty, "athena", "apollo"):
        async with Bus.connect(chatty) as bus:
            reply = await bus.gateway.discover(text=question)
        assert reply.chosen == "athena" and reply.judged_by is None
        assert "named no running specialist" in reply.reason and "the embedding router chose" in reply.reason
    # Too slow: the same, after the timeout.
    slow = with_routing_model(settings, text="apollo", first_token_ms=30_000.0)
    slow = slow.model_copy(update={"routing_model_timeout_s": 0.5})
    async with in_process_gateway(slow), in_process_specialists(slow, "athena", "apollo"):
        async with Bus.connect(slow) as bus:
            reply = await bus.gateway.discover(text=question)
        assert reply.chosen == "athena" and "gave no answer within 0.5 s" in reply.reason, reply.reason


@pytest.mark.fast
def test_a_line_starting_with_no_specialist_or_command_is_a_question() -> None:
    running = ["apollo", "athena", "rhetor"]
    for question in ("what is a mutex?", "translate hello to French", "what's the capital of France"):
        assert unquoted_question(question, running, COMMANDS), question
        (stage,) = question_pipeline(question).stages
        assert stage.targets == (Target(AUTO, 1, True),) and stage.message == question
    for pipeline in (
        "apollo hi",
        "apolo hi",  # a typo of a name: the parser's error says "did you mean"
        '"quoted question"',
        "echo x | apollo",
        "@auto << x",
        "apollo,athena << x",
        "hermes << x",  # not running, but clearly meant as a name
        "{apollo|athena}",
        "session new",
        "help",
    ):
        assert not unquoted_question(pipeline, running, COMMANDS), pipeline
    assert not unquoted_question("what is a mutex?", [], COMMANDS)  # nothing known: a pipeline, as before
    first, second = question_pipeline("summarize this | apollo").stages
    assert first.message == "summarize this" and str(second.targets[0]) == "apollo"


@needs_tmux
@pytest.mark.terminal
async def test_an_unquoted_question_at_the_repl_prompt_is_routed(settings: TektonSettings) -> None:
    async with in_process_gateway(settings), in_process_specialists(settings, "athena", "rhetor"):
        term = Terminal(aish_command(), child_env(settings))
        try:
            await term.wait_for("2 specialists")
            term.type("what's a mutex?")
            term.send("Enter")
            screen = await term.wait_for("athena heard: what's a mutex?")
            assert "syntax error" not in screen and "no specialist named" not in screen
            assert "what's: no specialist or command of that name" in screen and "@auto -> athena" in screen
            await term.prompt()
            term.type("translate hello to French")
            term.send("Enter")
            await term.wait_for("rhetor heard: translate hello to French")
            await term.prompt()
            term.type("tell me about mutexes | rhetor")
            term.send("Enter")
            await term.wait_for("rhetor heard: athena heard: tell me about mutexes")
        finally:
            term.close()


async def test_unquoted_words_naming_no_specialist_are_a_question(settings: TektonSettings) -> None:
    """`aish what is a mutex?` as the shell splits it: the first word names nobody, so the words are a
    question, routed as the quoted form is; a typo of a running name keeps its "did you mean", and so
    does a name of the roster that is not running."""
    async with in_process_gateway(settings), in_process_specialists(settings, "athena", "apollo"):
        asked = await run_aish(settings, "what", "is", "a", "mutex?")
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.startswith("athena heard: what is a mutex?"), asked.stderr
        assert "what: no specialist or command of that name, so the words are a question" in asked.stderr
        typo = await run_aish(settings, "apolo", "fix", "this")
        assert typo.returncode == 1 and "did you mean 'apollo'?" in typo.stderr, typo.stderr
        # A specialist of the roster that is not running is meant as a name: its own error says so.
        stopped = await run_aish(settings, "hermes", "plan", "this")
        assert stopped.returncode == 1, stopped.stderr
        assert "no specialist named 'hermes' is running" in stopped.stderr, stopped.stderr
