"""Runs belong to their user: with nats-server users (docs/security.md), alice resumes and lists her
runs; bob can neither listen to them, nor read them from the runs stream, nor see them in his list."""

from __future__ import annotations

import pytest

from bus.bulk import BulkOperation, BulkPlan
from bus.client import Bus
from bus.errors import BusError
from bus.runs import run_kind, run_subject
from tests.helpers import in_process_gateway, in_process_specialists
from tests.test_security import Raw, Team, bob, team  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.fast]


async def test_runs_belong_to_their_user(team: Team, bob: Raw) -> None:  # noqa: F811
    assert bob.nc is not None
    async with (
        in_process_gateway(team.services),  # creates the runs stream (specialists may not)
        in_process_specialists(team.services, "apollo"),
        Bus.connect(team.alice, name="alice") as alice,
        Bus.connect(team.bob, name="bob") as bob_bus,
    ):
        result = await alice.ask("apollo", "secret plans")
        runs = await alice.runs()
        assert [r.state for r in runs] == ["done"]
        run_id = runs[0].run_id
        async with alice.attach(run_id, after=1) as a:
            rest = "".join([t async for t in a])
        assert result.text.endswith(rest) and rest

        # Bob: not in his list, not readable through the stream under his name or hers.
        assert await bob_bus.runs() == []
        with pytest.raises(BusError):
            async with bob_bus.attach(run_id) as b:
                async for _ in b:
                    pass
        with pytest.raises(BusError):
            async with bob_bus.attach(run_id, user="alice") as b:
                async for _ in b:
                    pass
        await bob.nc.subscribe(f"tekton.run.alice.{run_id}.*")
        await bob.refused(f'Permissions Violation for Subscription to "tekton.run.alice.{run_id}.*"')
        await bob.nc.publish("$JS.API.STREAM.MSG.GET.TEKTON_RUNS", b'{"seq": 1}')
        await bob.refused('Permissions Violation for Publish to "$JS.API.STREAM.MSG.GET.TEKTON_RUNS"')


async def test_bulk_runs_belong_to_their_user(team: Team, bob: Raw) -> None:  # noqa: F811
    async with (
        in_process_gateway(team.services),
        in_process_specialists(team.services, "apollo"),
        Bus.connect(team.alice, name="alice") as alice,
        Bus.connect(team.bob, name="bob") as bob_bus,
    ):
        plan = BulkPlan(operations=[BulkOperation(id="one", ai="apollo", message="secret plans")])
        async with alice.bulk(plan) as b:
            done = await b.result()
        assert done.status == "ok"
        assert await alice.run_kind(b.id) == "bulk"
        async with alice.attach_bulk(b.id, after=0) as a:
            assert (await a.result()).status == "ok"
        assert [r.specialist for r in await alice.runs()] == ["bulk"]

        assert await bob_bus.runs() == []
        assert await bob_bus.run_kind(b.id) is None
        # Not through the stream under her name either: the direct get is refused.
        assert await run_kind(bob_bus.nc, bob_bus.settings, run_subject("alice", b.id, "tekton")) is None
        with pytest.raises(BusError):
            async with bob_bus.attach_bulk(b.id) as stolen:
                await stolen.result()
