"""Token usage: every answer's record from the specialist, the gateway's per-user and per-session
totals (JetStream KV), `aish usage`, and a budget that stops a user's requests with a clear error."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest

from bus.client import Bus
from bus.errors import BadRequest, BudgetExceeded, BusError
from bus.settings import TektonSettings
from bus.subjects import ANONYMOUS
from bus.usage import Budget, Price, Totals, period_window, usage_query_subject, usage_subject
from bus.wire import ChatMessage, ChatOptions, encode
from gateway.usage import UsageBook, open_usage_bucket
from tests.helpers import child_env, eventually, in_process_gateway, in_process_specialists, run_aish
from tests.test_security import Raw, Team, bob, team  # noqa: F401  (fixtures)

pytestmark = pytest.mark.anyio
PROMPT = [ChatMessage(role="user", content="x")]


async def test_totals_per_user_and_per_session(settings: TektonSettings) -> None:
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        direct = await bus.ask("apollo", "one two")  # "apollo heard: one two": 4 chunks
        session = await bus.gateway.create(specialist="apollo", name="costs")
        async with bus.stream("apollo", [ChatMessage(role="user", content="three")], session="costs") as s:
            in_session = await s.result()  # 3 chunks
        # The book agrees with what the done frames said.
        p1, p2 = direct.done.usage.prompt_tokens or 0, in_session.done.usage.prompt_tokens or 0

        async def counted() -> bool:
            return (await bus.gateway.usage()).total.requests == 2

        await eventually(counted, within=10)
        usage = await bus.gateway.usage()
        assert (usage.total.requests, usage.total.completion_tokens) == (2, 7)
        assert {k: (v.requests, v.completion_tokens) for k, v in usage.sessions.items()} == {
            session.id: (1, 3)
        }
        assert usage.budget_tokens is None and usage.total.cost == 0.0  # the scripted roster is free
        assert direct.done.usage.cost is None  # and its done frame carries no cost

        shown = await run_aish(settings, "usage")
        assert shown.returncode == 0, shown.stderr
        first, header, row = shown.stdout.splitlines()
        assert first == f"{usage.user}: 2 requests, {p1 + p2} prompt + 7 completion = {p1 + p2 + 7} tokens"
        assert header.split() == ["SESSION", "REQUESTS", "PROMPT", "COMPLETION", "COST", "$"]
        assert row.split() == [session.id, "1", str(p2), "3", "-"]  # (no price: no cost, not $0)


async def test_a_lone_record_a_batch_and_a_bad_one_in_a_batch(settings: TektonSettings) -> None:
    """Specialists send records a batch at a time (a msgpack array); a lone record map (what they sent
    before) still counts, and a bad record in a batch costs only itself."""
    good = {"v": 1, "specialist": "apollo", "prompt_tokens": 1, "completion_tokens": 2, "cost": 0.0}
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        subject = usage_subject(ANONYMOUS, settings.prefix)
        await bus.nc.publish(subject, msgpack.packb({**good, "request_id": "r1"}))
        batch = [{**good, "request_id": "r2"}, {"request_id": 7}, {**good, "request_id": "r3"}]
        await bus.nc.publish(subject, msgpack.packb(batch))

        async def counted() -> bool:
            return (await bus.gateway.usage()).total.requests == 3

        await eventually(counted, within=10)
        assert (await bus.gateway.usage()).total.completion_tokens == 6


class _SlowBucket:
    """The real bucket, each write taking 5 ms (a replicated bucket on a busy cluster)."""

    def __init__(self, kv: Any):
        self.kv = kv

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)

    async def create(self, key: str, value: bytes) -> int:
        await anyio.sleep(0.005)
        return int(await self.kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        await anyio.sleep(0.005)
        return int(await self.kv.update(key, value, last=last))


async def test_a_usage_query_answers_while_records_keep_arriving(settings: TektonSettings) -> None:
    """On a busy bus records arrive all the time: a query waits for those that came before it, not
    until none is pending (which never came: the query waited for ever)."""
    good = {"v": 1, "specialist": "apollo", "prompt_tokens": 1, "completion_tokens": 1, "cost": 0.0}
    async with Bus.connect(settings) as bus, anyio.create_task_group() as tg:
        kv = _SlowBucket(await open_usage_bucket(bus.nc, settings.prefix))
        book = UsageBook(bus.nc, kv, settings.prefix)  # type: ignore[arg-type]
        await book.start(tg)
        subject = usage_subject(ANONYMOUS, settings.prefix)
        sent = 0

        async def busy() -> None:
            nonlocal sent
            while True:  # an answer ending every 2 ms
                sent += 1
                await bus.nc.publish(subject, msgpack.packb({**good, "request_id": f"r{sent}"}))
                await anyio.sleep(0.002)

        tg.start_soon(busy)
        await eventually(lambda: sent >= 100, within=10)  # the flood is on before the query
        before = sent
        with anyio.fail_after(10):
            total = (await book.totals(ANONYMOUS)).total
        tg.cancel_scope.cancel()
    assert total.requests >= before - 5  # what came before the query is counted (bar a few in flight)


async def test_a_budget_stops_the_user_with_a_clear_error(settings: TektonSettings) -> None:
    settings = settings.model_copy(update={"usage_budget_tokens": 10})
    async with (
        in_process_specialists(settings, "apollo") as services,
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        await bus.ask("apollo", "one two")  # the answer that crosses the line still completes

        async def refused() -> bool:
            try:
                await bus.ask("apollo", "one more")
            except BudgetExceeded:
                return True
            return False

        await eventually(refused, within=15)
        errors = services["apollo"].counters.errors
        with pytest.raises(BudgetExceeded, match="over their budget"):
            await bus.ask("apollo", "and again")
        # An operator sees it: the refusal ended in an error frame, and tekton_errors_total counts it.
        assert services["apollo"].counters.errors == errors + 1
        usage = await bus.gateway.usage()
        assert usage.budget_tokens == 10 and usage.total.tokens >= 10
        shown = await run_aish(settings, "apollo", "please")
        assert shown.returncode == 1
        assert shown.stderr.strip() == f"aish: user '{usage.user}' is over their budget (aish usage shows it)"


async def test_an_answer_stopped_part_way_is_charged_for_what_the_model_made(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "100")
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "500")
    async with (
        in_process_specialists(settings, "apollo") as services,
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        async with bus.stream("apollo", [ChatMessage(role="user", content="x")]) as s:
            received = 0
            async for _ in s:
                received += 1
                if received == 5:
                    break  # leaving the stream cancels the answer
        counters = services["apollo"].counters
        await eventually(lambda: counters.cancelled == 1 and counters.in_flight == 0)

        async def charged() -> bool:
            return (await bus.gateway.usage()).total.requests == 1

        await eventually(charged, within=10)
        total = (await bus.gateway.usage()).total
        # What the model had made when the cancel came, not the whole answer, and not nothing (a
        # budget would never see answers stopped just before their end).
        assert 5 <= total.completion_tokens < 500


async def test_an_answer_stopped_by_its_replica_shutting_down_is_charged(
    settings: TektonSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "100")
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "500")
    settings = settings.model_copy(update={"drain_grace_s": 0.2})
    received, stopping = 0, False
    async with in_process_gateway(settings), Bus.connect(settings) as bus:

        async def listen() -> None:
            nonlocal received
            try:
                async with bus.stream("apollo", [ChatMessage(role="user", content="x")]) as s:
                    async for _ in s:
                        received += 1
            except BusError:
                if not stopping:  # (only the replica's shutting down may end it)
                    raise

        async with anyio.create_task_group() as tg, in_process_specialists(settings, "apollo"):
            tg.start_soon(listen)
            await eventually(lambda: received >= 5)
            stopping = True
            # The replica has drained: its stopped answer's record went out with its last flush.

        async def charged() -> bool:
            return (await bus.gateway.usage()).total.requests == 1

        await eventually(charged, within=10)
        assert 5 <= (await bus.gateway.usage()).total.completion_tokens < 500


async def test_a_request_id_used_twice_does_not_move_a_charge_to_another_user(
    team: Team,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request id is the client's: alice's short answer ending first, under the id of her long one,
    once took the long one's owner with it, and the long one was charged to nobody's budget."""
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS_PER_S", "50")
    monkeypatch.setenv("TEKTON_SCRIPTED_TOKENS", "30")
    async with (
        in_process_gateway(team.services),
        in_process_specialists(team.services, "apollo") as services,
        # (runs off: with runs, one id is one run subject too, and the two answers would share it)
        Bus.connect(team.alice.model_copy(update={"runs": False}), name="alice") as alice,
    ):
        counters = services["apollo"].counters

        async def answer(options: ChatOptions | None) -> None:
            async with alice.stream("apollo", PROMPT, options, request_id="same-id") as s:
                await s.result()

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer, None)  # 30 tokens, 0.6 s
            await eventually(lambda: counters.in_flight == 1)  # the long one is being served
            tg.start_soon(answer, ChatOptions(max_tokens=2))  # done long before

        async def both_charged() -> bool:
            return (await alice.gateway.usage()).total.requests == 2

        await eventually(both_charged, within=10)


async def test_with_identities_each_user_has_their_own_totals_and_budget(team: Team, bob: Raw) -> None:  # noqa: F811
    services = team.services.model_copy(update={"usage_budget_tokens": 10})
    assert bob.nc is not None
    async with (
        in_process_gateway(services),
        in_process_specialists(services, "apollo"),
        Bus.connect(team.alice, name="alice") as alice,
        Bus.connect(team.bob, name="bob") as bobs,
    ):
        await alice.ask("apollo", "one two")  # over her 10 tokens with this one

        async def alice_refused() -> bool:
            try:
                await alice.ask("apollo", "more")
            except BudgetExceeded as err:
                return "user 'alice'" in err.message
            return False

        await eventually(alice_refused, within=15)
        assert (await bobs.ask("apollo", "fine")).text == "apollo heard: fine"  # bob is under his
        assert (await alice.gateway.usage()).user == "alice"
        mine = await bobs.gateway.usage()
        assert (mine.user, mine.total.requests, mine.total.completion_tokens) == ("bob", 1, 3)
        assert mine.total.prompt_tokens > 0  # the scripted provider reports its prompt's tokens too
        # Usage records come from specialists only: bob cannot spend alice's budget, nor refund his.
        await bob.nc.publish("tekton.usage.alice", b"")
        await bob.refused('Permissions Violation for Publish to "tekton.usage.alice"')
        await bob.nc.publish("tekton.budget", b"")
        await bob.refused('Permissions Violation for Publish to "tekton.budget"')


async def test_cost_where_the_roster_prices_the_specialist(settings: TektonSettings, tmp_path: Path) -> None:
    roster = tmp_path / "roster.toml"
    roster.write_text(
        """
[specialists.apollo]
description = "Priced"
primary = ["code-analysis"]
capabilities = { code-analysis = 0.9 }
system_prompt = "-"
provider = "scripted"
cost_per_1k_tokens = 250.0
"""
    )
    settings = settings.model_copy(update={"roster": roster})
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        answer = await bus.ask("apollo", "one two")
        tokens = (answer.done.usage.prompt_tokens or 0) + answer.done.usage.completion_tokens
        assert answer.done.usage.cost == pytest.approx(tokens * 0.25)

        async def counted() -> bool:
            return (await bus.gateway.usage()).total.requests == 1

        await eventually(counted, within=10)
        assert (await bus.gateway.usage()).total.cost == pytest.approx(tokens * 0.25)
        shown = await run_aish(settings, "usage")
        assert shown.stdout.splitlines()[0].endswith(f"= {tokens} tokens, ${tokens * 0.25:.6f}")


async def test_the_price_table_costs_each_answer_and_a_cost_budget_per_user_can_be_reset(
    settings: TektonSettings,
) -> None:
    """USD per 1M tokens by provider:model in the config: the done frame carries the cost; a per-user
    cost budget (over the default token budget, which is higher) refuses the user; `tekton usage
    reset USER` lets them in again."""
    settings = settings.model_copy(
        update={
            "prices": {"scripted:scripted": Price(input=3.0, output=15.0)},
            "usage_budget_tokens": 1_000_000,
            "usage_budgets": {ANONYMOUS: Budget(cost=0.00005)},
        }
    )
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        answer = await bus.ask("apollo", "one two")  # 4 completion tokens: 60 micro-dollars
        usage = answer.done.usage
        assert usage.prompt_tokens and usage.cost == pytest.approx(
            (usage.prompt_tokens * 3.0 + usage.completion_tokens * 15.0) / 1e6
        )

        async def refused() -> bool:
            try:
                await bus.ask("apollo", "one more")
            except BudgetExceeded:
                return True
            return False

        await eventually(refused, within=15)
        book = await bus.gateway.usage()
        assert (book.user, book.budget_tokens, book.budget_cost) == (ANONYMOUS, 1_000_000, 0.00005)
        assert book.total.cost >= 0.00005
        shown = await run_aish(settings, "usage")
        assert (
            f"(budget 1000000 tokens, {1_000_000 - book.total.tokens} left; budget $0.00005, $0.000000 left)"
            in (shown.stdout)
        )
        listed = await run_tekton(settings, "usage")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[1].split()[:2] == [ANONYMOUS, str(book.total.requests)]

        reset = await run_tekton(settings, "usage", "reset", ANONYMOUS)
        assert reset.returncode == 0, reset.stderr
        assert reset.stdout.strip() == f"reset {ANONYMOUS}'s usage (1 total removed)"

        async def served() -> bool:
            try:
                return (await bus.ask("apollo", "again")).text == "apollo heard: again"
            except BudgetExceeded:
                return False

        assert (await bus.gateway.usage()).total == Totals()  # (refused requests leave no record)
        await eventually(served, within=15)


@pytest.mark.fast
def test_budget_periods_are_utc_days_iso_weeks_and_months() -> None:
    late = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert period_window("day", late) == ("2026-12-31", datetime(2027, 1, 1, tzinfo=UTC))
    assert period_window("week", late) == ("2026-W53", datetime(2027, 1, 4, tzinfo=UTC))  # Monday
    assert period_window("month", late) == ("2026-12", datetime(2027, 1, 1, tzinfo=UTC))
    monday = datetime(2026, 11, 30, tzinfo=UTC)
    assert period_window("week", monday) == ("2026-W49", datetime(2026, 12, 7, tzinfo=UTC))
    assert period_window("month", monday) == ("2026-11", datetime(2026, 12, 1, tzinfo=UTC))
    # Another zone's time is the same instant in UTC.
    assert period_window("day", datetime.fromisoformat("2026-11-30T01:00:00+02:00"))[0] == "2026-11-29"


async def test_a_budget_per_day_counts_today_only_and_says_when_it_resets(settings: TektonSettings) -> None:
    """A user who spent far over their daily budget yesterday is served today (a new period starts
    from zero, the lifetime totals keep yesterday's); over today's, the refusal says when it resets,
    and `aish usage` shows the period; yesterday's period totals are purged."""
    settings = settings.model_copy(update={"usage_budgets": {ANONYMOUS: Budget(tokens=10, period="day")}})
    yesterday, _ = period_window("day", datetime.now(UTC) - timedelta(days=1))
    spent = Totals(requests=3, prompt_tokens=500, completion_tokens=500)
    async with Bus.connect(settings) as bus:
        kv = await open_usage_bucket(bus.nc, settings.prefix)
        await kv.put(f"u.{ANONYMOUS}", encode(spent))
        await kv.put(f"p.{yesterday}.{ANONYMOUS}", encode(spent))
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        assert (await bus.ask("apollo", "one two")).text == "apollo heard: one two"

        async def refused() -> bool:
            try:
                await bus.ask("apollo", "one more")
            except BudgetExceeded as err:
                refusal.append(err.message)
                return True
            return False

        refusal: list[str] = []
        await eventually(refused, within=15)
        today, resets = period_window("day", datetime.now(UTC))
        assert refusal == [
            f"user '{ANONYMOUS}' is over their budget until it resets at "
            f"{resets:%Y-%m-%d} 00:00 UTC (aish usage shows it)"
        ]
        book = await bus.gateway.usage()
        assert (book.budget_tokens, book.budget_period, book.period_resets) == (10, "day", resets.timestamp())
        assert book.period_total is not None and 10 <= book.period_total.tokens < spent.tokens
        assert book.total.tokens == spent.tokens + book.period_total.tokens  # the lifetime's
        shown = await run_aish(settings, "usage")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines()[0].endswith(
            f" = {book.total.tokens} tokens (budget 10 tokens a day, 0 left; "
            f"resets {resets:%Y-%m-%d} 00:00 UTC)"
        )
        kv = await open_usage_bucket(bus.nc, settings.prefix)

        async def purged() -> bool:
            return sorted(k for k in await kv.keys() if k.startswith("p.")) == [f"p.{today}.{ANONYMOUS}"]

        await eventually(purged, within=10)


async def run_tekton(settings: TektonSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(
        partial(
            subprocess.run,
            [sys.executable, "-m", "tekton", *args],
            env=child_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
    )


async def test_only_an_admin_reads_or_resets_the_book(team: Team) -> None:  # noqa: F811
    """The book is read and reset through the gateway as the ``_all`` user, which only admins may be:
    bob gets one line and exit 1 (no traceback), and cannot reset himself as himself either."""
    async with in_process_gateway(team.services), Bus.connect(team.bob, name="bob") as bobs:
        with pytest.raises(BadRequest, match="only an admin resets usage"):
            await bobs.gateway.usage(reset="bob")
        refused = await run_tekton(team.bob, "usage", "--creds", str(team.bob.creds), "reset", "alice")
        assert refused.returncode == 1, refused.stderr
        [said] = refused.stderr.strip().splitlines()  # one line, not the refusal logged as well
        assert said.startswith("tekton: the nats-server refused") and "only an admin" in said
        assert "Traceback" not in refused.stderr
        allowed = await run_tekton(team.admin, "usage", "reset", "alice")
        assert allowed.returncode == 0 and allowed.stdout.strip() == "alice has no usage", allowed.stderr


@pytest.mark.fast
async def test_a_usage_query_that_is_no_query_is_one_line_bad_request(settings: TektonSettings) -> None:
    """Unknown fields, or no msgpack at all: the asker's mistake, said in one line (before, pydantic's
    multi-line message under `internal`, or the client-side `malformed_frame`)."""
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        subject = usage_query_subject(settings.prefix, ANONYMOUS)
        for payload in (msgpack.packb({"zzz": 1}), b"", b"\xc1"):
            reply = msgpack.unpackb((await bus.nc.request(subject, payload, timeout=5)).data)
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
            assert reply["message"].startswith("not a usage query: ") and "\n" not in reply["message"]
            assert len(reply["message"]) < 300
