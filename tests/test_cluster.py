"""Tekton on a real 3-node NATS cluster (three nats-server processes), a leaf node, and placement.

Every test here starts several nats-servers: ``-m cluster``.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.js.api import StreamInfo
from nats.js.errors import NoStreamResponseError

from bus.auth import NotAuthorized
from bus.client import Bus, client_tls, connect, connect_as
from bus.cluster import LocalCluster, NodeConfig, free_ports, wait_jetstream
from bus.errors import BusError, SpecialistUnavailable
from bus.runs import ensure_runs_stream, runs_stream_name
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from gateway.store import bucket_name
from specialists.runtime import serve_specialists
from tests.helpers import child_env, env, eventually, in_process_gateway, in_process_specialists, spawn

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster", 3) as c:
        yield c


def on(settings: TektonSettings, url: str, **more: Any) -> TektonSettings:
    return settings.model_copy(update={"nats_url": url, **more})


@pytest.fixture
def csettings(cluster: LocalCluster, tmp_path: Path) -> TektonSettings:
    return TektonSettings(
        nats_url=cluster.url,
        data_dir=tmp_path / "data",
        provider="scripted",
        heartbeat_s=0.2,
        idle_timeout_s=10.0,
        drain_grace_s=5.0,
    )


def consecutive_free_ports(n: int) -> list[int]:
    """``n`` consecutive ports free right now (`tekton cluster up` numbers its nodes' ports so), where
    free_ports picks them: out of the kernel's ephemeral range."""
    for _ in range(100):
        base = free_ports(1)[0]
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + n))
    raise AssertionError("no run of free ports found")


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def sessions_stream(bus: Bus) -> StreamInfo:
    return await bus.nc.jetstream().stream_info(f"KV_{bucket_name(bus.settings.prefix)}")


async def put_once_led(kv: Any, key: str, value: bytes) -> None:
    """``kv.put`` on a KV bucket just made with replicas: until its stream's own leader is elected,
    a put gets no responder."""

    async def stored() -> bool:
        try:
            await kv.put(key, value)
        except NoStreamResponseError:
            return False
        return True

    await eventually(stored, within=10)


async def test_cluster_up_command_runs_three_routed_nodes_with_users_and_tls(tmp_path: Path) -> None:
    """`tekton cluster up --tls`: users on every node (the same as `tekton up`'s), TLS on clients and
    routes, routes that need the cluster's secret; an R3 bucket spans the three nodes."""
    picked = consecutive_free_ports(6)
    ports, routes = picked[:3], picked[3:]
    settings = TektonSettings(nats_url=",".join(f"tls://127.0.0.1:{p}" for p in ports), data_dir=tmp_path)
    argv = [sys.executable, "-m", "tekton", "cluster", "up", "--nodes", "3", "--tls"]
    argv += ["--port", str(ports[0]), "--cluster-port", str(routes[0])]
    child = spawn(argv, child_env(settings))
    try:
        line = await anyio.to_thread.run_sync(lambda: child.wait_for(lambda s: s.startswith("ready cluster")))
        assert settings.nats_url in line
        for i in range(3):
            assert (tmp_path / "cluster" / f"n{i + 1}").is_dir()  # one store per node
        node3 = on(settings, f"tls://127.0.0.1:{ports[2]}")
        with pytest.raises(NotAuthorized):  # no credentials: not an open bus
            await connect(node3.nats_url, tls=client_tls(node3))
        conf = (tmp_path / "cluster" / "n1.conf").read_text()
        assert "authorization { user:" in conf and "tls {" in conf
        nc = await connect_as(node3, name="test", identity="gateway")
        try:
            assert nc._server_info["cluster"] == "tekton"
            assert nc._server_info["server_name"] == "n3"
            await put_once_led(await nc.jetstream().create_key_value(bucket="probe", replicas=3), "k", b"v")
            info = await nc.jetstream().stream_info("KV_probe")
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2
        finally:
            await nc.close()
    finally:
        assert child.stop() == 0


def test_a_node_whose_route_port_is_taken_is_one_clear_error(tmp_path: Path) -> None:
    """nats-server opens its route listener after it says ready, and dies when it cannot. Starting the
    cluster says so, rather than waiting out JetStream's placement for a node that is gone."""
    picked = free_ports(6)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", picked[4]))
        taken.listen()
        cluster = LocalCluster(tmp_path / "cluster", 3, ports=picked[:3], cluster_ports=picked[3:])
        with pytest.raises(BusError, match="exited before it was ready") as err:
            cluster.start(timeout=10)
    assert f"Error listening on router port: {picked[4]}" in str(err.value)


async def test_sessions_bucket_has_three_replicas_on_a_cluster(csettings: TektonSettings) -> None:
    async with in_process_gateway(csettings), Bus.connect(csettings) as bus:
        info = await sessions_stream(bus)
        assert info.config.num_replicas == 3


async def test_session_replicas_can_be_set(csettings: TektonSettings) -> None:
    async with (
        in_process_gateway(on(csettings, csettings.nats_url, session_replicas=2)),
        Bus.connect(csettings) as bus,
    ):
        assert (await sessions_stream(bus)).config.num_replicas == 2


async def test_specialist_gateway_and_client_on_three_different_nodes(
    cluster: LocalCluster, csettings: TektonSettings
) -> None:
    n1, n2, n3 = cluster.urls
    async with (
        in_process_specialists(on(csettings, n1), "apollo") as specialists,
        in_process_gateway(on(csettings, n2)),
        Bus.connect(on(csettings, n3)) as bus,
    ):
        assert bus.nc.connected_url.port == cluster.configs[2].port
        assert specialists["apollo"].nc.connected_url.port == cluster.configs[0].port
        result = await bus.ask("apollo", "across the cluster")
        assert result.text == "apollo heard: across the cluster"
        session = await bus.gateway.create("apollo", name="spread")
        async with bus.stream("", user("remember me"), session="spread") as s:
            assert "".join([t async for t in s]) == "apollo heard: remember me"
        assert s.stored is not None
        turns = (await bus.gateway.get(session.id)).turns
        assert [t.content for t in turns] == ["remember me", "apollo heard: remember me"]


async def _chat_until_accepted(bus: Bus, session: str, text: str, acked: list[str]) -> None:
    """One session turn; retried (as a user would) while the bus fails over. A turn the gateway
    accepted is recorded in ``acked``: it must be in the session afterwards."""
    with anyio.fail_after(60):
        while True:
            stream = bus.stream("apollo", user(text), session=session)
            try:
                async with stream as s:
                    if stream.accepted is not None:
                        acked.append(text)
                    async for _ in s:
                        pass
                return
            except BusError:
                if stream.accepted is not None:  # the answer failed; the stored user turn must survive
                    if text not in acked:
                        acked.append(text)
                    return
                await anyio.sleep(0.1)  # the connection is failing over: try again shortly


async def test_a_node_killed_mid_load_loses_nothing(cluster: LocalCluster, csettings: TektonSettings) -> None:
    """kill -9 one node while 50 streams run and 20 clients append to sessions."""
    n1, n2, n3 = cluster.urls
    slow = {"TEKTON_SCRIPTED_TOKENS": "40", "TEKTON_SCRIPTED_TOKENS_PER_S": "20"}  # ~2 s per stream
    with env(**slow):
        async with (
            in_process_specialists(on(csettings, n1, max_concurrency=64), "apollo"),
            in_process_specialists(on(csettings, n2, max_concurrency=64), "apollo"),
            in_process_gateway(on(csettings, n1)),
            in_process_gateway(on(csettings, n2)),
            Bus.connect(on(csettings, n1)) as b1,
            Bus.connect(on(csettings, n2)) as b2,
        ):
            # The sessions bucket's leader sits on the node about to die: the replicas must take over.
            await _move_leader(b1, "n3")
            clients = [await connect(url) for url in (n1, n2, n3) * 7][:20]
            buses = [Bus(nc, csettings) for nc in clients]
            names = []
            for i, bus in enumerate(buses):
                names.append((await bus.gateway.create("apollo", name=f"c{i}")).id)
            started = anyio.Event()
            done: list[int] = []
            acked: dict[int, list[str]] = {i: [] for i in range(20)}

            async def stream(bus: Bus, i: int) -> None:
                async with bus.stream("apollo", user(f"s{i}")) as s:
                    count = 0
                    async for _ in s:
                        count += 1
                        if count == 5 and i == 0:
                            started.set()
                    done.append(s.tokens or 0)

            async def appender(i: int) -> None:
                for turn in range(6):
                    await _chat_until_accepted(buses[i], names[i], f"c{i} t{turn}", acked[i])

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(stream, (b1, b2)[i % 2], i)
                for i in range(20):
                    tg.start_soon(appender, i)
                await started.wait()
                cluster.kill(2)  # SIGKILL node n3 mid-stream
            # Streams on surviving nodes all finished: 40 tokens each, by their done frames.
            assert len(done) == 50 and set(done) == {40}
            assert all(nc.is_connected for nc in clients)  # n3's clients reconnected elsewhere
            moved = [nc for nc in clients[2::3]]
            assert all(nc.connected_url.port != cluster.configs[2].port for nc in moved)

            for i, bus in enumerate(buses):
                stored = [t.content for t in (await bus.gateway.get(names[i])).turns if t.role == "user"]
                missing = [t for t in acked[i] if t not in stored]
                assert not missing, f"client {i} lost turns {missing}"
                assert len(acked[i]) == 6

            cluster.restart(2)  # n3 rejoins and JetStream catches it up
            await eventually(lambda: _caught_up(b1, "n3"), within=30)
            for nc in clients:
                await nc.close()


async def test_an_answer_whose_client_node_died_with_the_runs_stream_is_replayed_by_its_replica(
    cluster: LocalCluster, csettings: TektonSettings
) -> None:
    """kill -9 the node the client is on, which also holds the runs stream (one replica), and the client
    stalls a moment: the frames lost meanwhile come from the replica producing the answer (the stream
    is offline), each exactly once."""
    quick = on(csettings, cluster.url, idle_timeout_s=1.0)
    async with Bus.connect(quick) as setup:
        await ensure_runs_stream(setup.nc, quick)
        info = await setup.nc.jetstream().stream_info(runs_stream_name(quick.prefix))
        assert info.cluster is not None and info.cluster.leader is not None
        holder = [c.name for c in cluster.configs].index(info.cluster.leader)
    elsewhere = on(quick, cluster.urls[(holder + 1) % 3])
    slow = {"TEKTON_SCRIPTED_TOKENS": "60", "TEKTON_SCRIPTED_TOKENS_PER_S": "20"}  # ~3 s
    argv = [sys.executable, "-m", "tekton", "specialist", "apollo", "--provider", "scripted"]
    specialist = spawn([*argv, "--log-level", "warning"], child_env(elsewhere, **slow))
    try:
        await anyio.to_thread.run_sync(lambda: specialist.wait_for(lambda s: s.startswith("ready apollo")))
        nc = await connect(cluster.urls[holder])  # the client sits on the node about to die
        bus = Bus(nc, quick)
        resumed: list[int] = []
        got: list[str] = []
        try:
            async with bus.stream("apollo", user("go on")) as s:
                s.on_resume = resumed.append
                async for text in s:
                    got.append(text)
                    if len(got) == 5:
                        cluster.kill(holder)
                        time.sleep(0.5)  # noqa: ASYNC251 (the client stalls, waits for nothing): frames go by
                result = await s.result()
        finally:
            await nc.close()
    finally:
        specialist.stop()
    # Each token exactly once (a chunk frame may carry several): the scripted answer's 60 tokens.
    whole = "".join(itertools.islice(itertools.cycle(["apollo ", "heard: ", "go ", "on"]), 60))
    assert result.done.usage.completion_tokens == 60 and "".join(got) == whole
    assert resumed, "nothing was lost: the test did not test a resume"


async def _move_leader(bus: Bus, node: str) -> None:
    subject = f"$JS.API.STREAM.LEADER.STEPDOWN.KV_{bucket_name(bus.settings.prefix)}"
    with anyio.fail_after(30):
        while (await sessions_stream(bus)).cluster.leader != node:  # type: ignore[union-attr]
            request = json.dumps({"placement": {"preferred": node}}).encode()
            await bus.nc.request(subject, request, timeout=5)
            await anyio.sleep(0.2)


async def _has_leader(bus: Bus, but: str) -> bool:
    try:
        info = await sessions_stream(bus)
    except Exception:  # no leader to answer yet
        return False
    return info.cluster is not None and info.cluster.leader not in (None, but)


async def _caught_up(bus: Bus, node: str) -> bool:
    info = await sessions_stream(bus)
    if info.cluster is None:
        return False
    peers = {p.name: p for p in info.cluster.replicas or []}
    if info.cluster.leader == node:
        return all(p.current for p in peers.values())
    peer = peers.get(node)
    return peer is not None and bool(peer.current) and not peer.lag and not peer.offline


async def test_a_restarted_node_catches_up_and_keeps_the_quorum(
    cluster: LocalCluster, csettings: TektonSettings
) -> None:
    """n3 misses writes while down, rejoins and catches up; then n1 dies too, and n2 + n3 (a quorum of
    the R3 bucket only if n3 really caught up) still read and write the sessions."""
    n2 = cluster.urls[1]
    async with (
        in_process_specialists(on(csettings, n2), "apollo"),
        in_process_gateway(on(csettings, n2)),
        Bus.connect(on(csettings, n2)) as bus,
    ):
        cluster.kill(2)
        await eventually(lambda: _has_leader(bus, "n3"), within=30)  # if n3 led, another one does now
        session = await bus.gateway.create("apollo", name="while-n3-was-down")
        async with bus.stream("", user("written during the outage"), session=session.id) as s:
            async for _ in s:
                pass
        cluster.restart(2)
        await eventually(lambda: _caught_up(bus, "n3"), within=30)
        cluster.kill(0)
        # A session call waits 5 s, a JetStream election can take longer (see the bench): wait for it.
        await eventually(lambda: _has_leader(bus, "n1"), within=30)
        async with bus.stream("", user("after n1 died"), session=session.id) as s:
            async for _ in s:
                pass
        turns = [t.content for t in (await bus.gateway.get(session.id)).turns]
        assert turns == [
            "written during the outage",
            "apollo heard: written during the outage",
            "after n1 died",
            "apollo heard: after n1 died",
        ]


# Placement ---------------------------------------------------------------------------------------


async def _one_round(bus: Bus, k: int) -> list[str]:
    instances: list[str] = []

    async def one(i: int) -> None:
        result = await bus.ask("apollo", f"p{i}")
        instances.append(result.start.instance)

    async with anyio.create_task_group() as tg:
        for i in range(k):
            tg.start_soon(one, i)
    return instances


async def _placement_rounds(
    settings: TektonSettings, urls: list[str], k: int, rounds: int
) -> list[list[str]]:
    one_slot = {"max_concurrency": 1}
    with env(TEKTON_SCRIPTED_FIRST_TOKEN_MS="300", TEKTON_SCRIPTED_TOKENS="2"):
        async with anyio.create_task_group() as tg, Bus.connect(on(settings, urls[0])) as bus:
            stops = []
            for i in range(k):
                stop = anyio.Event()
                stops.append(stop)
                node = on(settings, urls[i % len(urls)], **one_slot)
                await tg.start(
                    lambda task_status, node=node, stop=stop: serve_specialists(
                        node, ["apollo"], stop=stop, task_status=task_status
                    )
                )
            await eventually(lambda: _all_know_each_other(bus, k), within=10)
            results = [await _one_round(bus, k) for _ in range(rounds)]
            for stop in stops:
                stop.set()
    return results


async def _all_know_each_other(bus: Bus, k: int) -> bool:
    return len(await bus.instances("apollo", window=0.2, thorough=True)) == k


async def test_placement_sends_k_requests_to_k_replicas_on_the_cluster(
    cluster: LocalCluster, csettings: TektonSettings
) -> None:
    rounds = await _placement_rounds(csettings, cluster.urls, k=3, rounds=5)
    for instances in rounds:
        assert len(set(instances)) == 3, f"two requests shared a replica while another idled: {rounds}"


# Leaf node -----------------------------------------------------------------------------------------


async def test_a_laptop_on_a_leaf_node_works_offline_and_reaches_the_team_when_connected(
    tmp_path: Path,
) -> None:
    """`tekton up --leaf`: local apollo, gateway and sessions on the laptop; athena only on the team's hub."""
    from tekton.cluster import LEAF_KEY, leaf_seed, public_key

    hub_port, hub_leaf_port, laptop_port = free_ports(3)
    seed = leaf_seed(tmp_path / "hub", create=True)  # what `tekton nats --leafnodes` makes
    assert seed is not None
    hub = NodeConfig(
        name="hub", store_dir=tmp_path / "hub" / "store", port=hub_port, leaf_port=hub_leaf_port,
        leaf_nkey=public_key(seed),
    )  # fmt: skip
    (tmp_path / "laptop" / "auth").mkdir(parents=True)  # the team handed the laptop its copy of the key
    (tmp_path / "laptop" / "auth" / LEAF_KEY).write_text(seed)
    hub_server = hub.server(log_file=tmp_path / "hub.log").start()
    team = TektonSettings(nats_url=hub_server.url, data_dir=tmp_path / "hub", provider="scripted")
    roster = tmp_path / "laptop-roster.toml"
    default = (Path(__file__).parent.parent / "deploy" / "roster.toml").read_text()
    roster.write_text(default.split("[specialists.athena]")[0])  # the laptop runs apollo only
    laptop = TektonSettings(
        nats_url=f"nats://127.0.0.1:{laptop_port}", data_dir=tmp_path / "laptop", provider="scripted"
    )
    argv = [sys.executable, "-m", "tekton", "up", "--leaf", f"nats://127.0.0.1:{hub_leaf_port}"]
    up = spawn([*argv, "--provider", "scripted"], child_env(laptop, TEKTON_ROSTER=str(roster)))
    try:
        await anyio.to_thread.run_sync(lambda: up.wait_for(lambda s: s.startswith("Tekton is up"), 60))
        assert any("a leaf node of" in line for line in up.seen)
        async with in_process_specialists(team, "athena"), Bus.connect(laptop) as bus:

            async def team_reachable() -> bool:
                try:
                    return (await bus.ask("athena", "hello team")).text == "athena heard: hello team"
                except SpecialistUnavailable:
                    return False

            await eventually(team_reachable, within=20)
            assert (await bus.ask("apollo", "local")).start.instance  # the laptop's own apollo

            hub_server.stop()  # offline: the hub is gone
            assert (await bus.ask("apollo", "still here")).text == "apollo heard: still here"
            session = await bus.gateway.create("apollo", name="offline")  # the laptop's own JetStream
            async with bus.stream("", user("noted offline"), session=session.id) as s:
                async for _ in s:
                    pass
            assert [t.content for t in (await bus.gateway.get("offline")).turns] == [
                "noted offline",
                "apollo heard: noted offline",
            ]
            with pytest.raises(SpecialistUnavailable):
                await bus.ask("athena", "anyone?")

            hub_server = hub.server(log_file=tmp_path / "hub.log").start()  # back online
            await eventually(team_reachable, within=20)
    finally:
        assert up.stop() == 0
        hub_server.stop()


async def test_three_tekton_nats_cluster_processes_form_one_cluster(tmp_path: Path) -> None:
    """`tekton nats --cluster` on three "machines" (here: ports and data dirs) routed to each other; the
    first machine's users and cluster secret copied to the others, as the README says."""
    import shutil

    from tekton.cluster import route_secret
    from tekton.users import Users

    Users(tmp_path / "m1", "tekton").ensure_local()
    route_secret(tmp_path / "m1")
    for i in (2, 3):
        shutil.copytree(tmp_path / "m1" / "auth", tmp_path / f"m{i}" / "auth")
    picked = free_ports(6)
    ports, routes = picked[:3], picked[3:]
    children = []
    try:
        for i in range(3):
            peers = ",".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
            argv = [sys.executable, "-m", "tekton", "nats", "--name", f"m{i + 1}"]
            argv += ["--cluster", f"127.0.0.1:{routes[i]}", "--routes", peers]
            settings = TektonSettings(
                nats_url=f"nats://127.0.0.1:{ports[i]}", data_dir=tmp_path / f"m{i + 1}"
            )
            children.append(spawn(argv, child_env(settings)))
        for child in children:
            line = await anyio.to_thread.run_sync(lambda c=child: c.wait_for(lambda s: s.startswith("ready")))
            assert "of cluster tekton" in line
        url = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        probe = TektonSettings(nats_url=url, data_dir=tmp_path / "m2")
        await anyio.to_thread.run_sync(lambda: wait_jetstream(url, replicas=3, probe=probe))
        with pytest.raises(NotAuthorized):  # users on every node
            await connect(url)
        nc = await connect_as(probe, name="test", identity="gateway")
        try:
            await put_once_led(await nc.jetstream().create_key_value(bucket="probe", replicas=3), "k", b"v")
            info = await nc.jetstream().stream_info("KV_probe")
            assert info.cluster is not None
            assert {info.cluster.leader, *(p.name for p in info.cluster.replicas or [])} == {"m1", "m2", "m3"}
        finally:
            await nc.close()
    finally:
        for child in children:
            assert child.stop() == 0


# Losing the sessions bucket's leader -----------------------------------------------------------------


async def _turn_until_answered(bus: Bus, session: str, text: str, request_id: str) -> str:
    """One session turn, retried with the same request id (as a client retries) while the bus fails
    over; the answer's text."""
    with anyio.fail_after(90):
        while True:
            try:
                async with bus.stream("apollo", user(text), session=session, request_id=request_id) as s:
                    return "".join([t async for t in s])
            except BusError:
                await anyio.sleep(0.1)


async def _stored_turns(bus: Bus, session_id: str) -> list[Any]:
    """The session as the bucket holds it (not as a gateway sees it), read from any replica."""
    from bus.sessions import Session
    from gateway.store import _decode

    kv = await bus.nc.jetstream().key_value(bucket_name(bus.settings.prefix))
    entry = await kv.get(f"s.{session_id}")
    session: Session = _decode(entry.value, entry.key)
    return session.turns


async def _until_answer_stored(bus: Bus, session_id: str, within: float) -> list[Any]:
    """The stored turns once the bucket holds an answer (settled) as the session's last turn."""

    async def stored() -> bool:
        try:
            turns = await _stored_turns(bus, session_id)
        except Exception:  # no replica answers yet
            return False
        return len(turns) >= 2 and turns[-1].status == "ok"

    await eventually(stored, within=within)
    return await _stored_turns(bus, session_id)


async def test_killing_the_sessions_leader_loses_no_turn_and_stores_each_once(
    cluster: LocalCluster, csettings: TektonSettings
) -> None:
    """kill -9 the node leading the sessions bucket while 10 clients take turns: every turn is answered
    (its write goes on behind it while the replicas elect a leader), and once stored, each is there
    exactly once (retries carry the same request id)."""
    n1, n2, _ = cluster.urls
    async with (
        in_process_specialists(on(csettings, n1), "apollo"),
        in_process_gateway(on(csettings, n1)),
        in_process_gateway(on(csettings, n2)),
        Bus.connect(on(csettings, n2)) as bus,
    ):
        await _move_leader(bus, "n3")
        sessions = [(await bus.gateway.create("apollo", name=f"k{i}")).id for i in range(10)]
        first_done = anyio.Event()
        answers: dict[str, list[str]] = {s: [] for s in sessions}

        async def client(session: str, i: int) -> None:
            for turn in range(4):
                text = f"k{i} t{turn}"
                answers[session].append(await _turn_until_answered(bus, session, text, f"k{i}-t{turn}"))
                first_done.set()

        async with anyio.create_task_group() as tg:
            for i, session in enumerate(sessions):
                tg.start_soon(client, session, i)
            await first_done.wait()
            cluster.kill(2)  # SIGKILL the leader's node

        for i, session in enumerate(sessions):
            assert answers[session] == [f"apollo heard: k{i} t{t}" for t in range(4)]

        async def all_stored() -> bool:
            try:
                turns = [await _stored_turns(bus, s) for s in sessions]
            except Exception:  # no replica answers yet
                return False
            return all(not any(t.status == "pending" for t in ts) and len(ts) >= 8 for ts in turns)

        await eventually(all_stored, within=60)
        for i, session in enumerate(sessions):
            turns = await _stored_turns(bus, session)
            asked = [f"k{i} t{t}" for t in range(4)]
            assert [t.content for t in turns if t.role == "user"] == asked, "a turn stored twice or lost"
            assert [t.content for t in turns if t.role == "assistant"] == [
                f"apollo heard: {a}" for a in asked
            ]
            assert {t.status for t in turns} == {"ok"}


async def test_a_turn_survives_its_gateway_dying_while_the_bucket_elects_a_leader(
    cluster: LocalCluster, csettings: TektonSettings
) -> None:
    """The sessions leader's node dies, then the gateway that took a turn is killed (-9) before the bucket
    has a new leader: the client, which saw the whole answer, hands question and answer to another
    gateway, and the turn is stored exactly once."""
    n1, n2, _ = cluster.urls
    slow = {"TEKTON_SCRIPTED_TOKENS": "20", "TEKTON_SCRIPTED_TOKENS_PER_S": "10"}  # ~2 s per answer
    with env(**slow):
        async with (
            in_process_specialists(on(csettings, n2), "apollo"),
            Bus.connect(on(csettings, n2)) as bus,
        ):
            argv = [sys.executable, "-m", "tekton", "gateway", "--log-level", "warning"]
            doomed = spawn(argv, child_env(on(csettings, n1)), stderr=subprocess.STDOUT)  # its log too
            await anyio.to_thread.run_sync(lambda: doomed.wait_for(lambda s: s.startswith("ready gateway")))
            done = anyio.Event()

            async def replacement() -> None:
                # It starts now but serves only once the bucket has a leader again: the turn goes to
                # the doomed gateway.
                async with in_process_gateway(on(csettings, n2)):
                    await done.wait()

            try:
                await _move_leader(bus, "n3")
                session = (await bus.gateway.create("apollo", name="orphan")).id
                async with anyio.create_task_group() as tg:
                    cluster.kill(2)  # the bucket has no leader for the next 4-9 s
                    tg.start_soon(replacement)
                    parts: list[str] = []
                    async with bus.stream("apollo", user("keep me"), session=session) as s:
                        async for text in s:
                            parts.append(text)
                            if doomed.process.poll() is None:
                                doomed.process.kill()  # the gateway that took the turn dies mid-answer
                    done.set()
                # It was the doomed gateway that took the turn, and it died with the write behind it.
                said = await anyio.to_thread.run_sync(lambda: doomed.wait_for(lambda s: "behind" in s, 10))
                assert "session write goes on behind" in said
            finally:
                doomed.stop()
            answer = "".join(parts)
            assert answer.startswith("apollo heard: keep me")  # it went on without its gateway
            assert s.stored is not None, "the client's copy was not stored"

            turns = await _until_answer_stored(bus, session, within=60)
            assert [(t.role, t.content) for t in turns] == [("user", "keep me"), ("assistant", answer)]


async def _leader_of(bus: Bus, stream: str) -> str | None:
    try:
        info = await bus.nc.jetstream(timeout=1).stream_info(stream)
    except Exception:  # electing
        return None
    return info.cluster.leader if info.cluster else None


async def _journaled_turns(bus: Bus, session_id: str) -> list[Any]:
    """The session as the turn journal holds it (empty when it holds nothing for it)."""
    from gateway.journal import TurnJournal

    journal = TurnJournal(bus.nc, bus.settings.prefix, bucket_name(bus.settings.prefix), 3)
    return [t for entry in await journal.entries(session_id) for t in entry[2].turns]


async def test_a_turn_whose_gateway_and_client_both_die_in_the_election_is_kept_by_the_journal(
    cluster: LocalCluster, csettings: TektonSettings
) -> None:
    """The sessions leader's node dies; before the bucket has a new leader, the gateway that took a turn
    and its client both die. The turn was durable before the bucket had a leader again all the same (the
    turn journal, R3, led from another node), and a surviving gateway stores question and answer once."""
    from gateway.journal import journal_stream_name
    from gateway.leases import work_bucket_name

    n1, n2, _ = cluster.urls
    prefix = csettings.prefix
    journal, work = journal_stream_name(bucket_name(prefix)), f"KV_{work_bucket_name(prefix)}"
    slow = {"TEKTON_SCRIPTED_TOKENS": "20", "TEKTON_SCRIPTED_TOKENS_PER_S": "10"}  # ~2 s per answer
    # The survivor reads the answer from its run: the runs stream (one replica) must not be on n3.
    setup = await connect(n2)
    try:
        js = setup.jetstream()
        while True:
            await ensure_runs_stream(setup, csettings)
            info = await js.stream_info(runs_stream_name(prefix))
            if info.cluster is not None and info.cluster.leader not in (None, "n3"):
                break
            await js.delete_stream(runs_stream_name(prefix))
    finally:
        await setup.close()
    with env(**slow):
        async with (
            in_process_specialists(on(csettings, n2), "apollo"),
            Bus.connect(on(csettings, n2)) as watcher,
        ):
            argv = [sys.executable, "-m", "tekton", "gateway", "--log-level", "warning"]
            doomed = spawn(argv, child_env(on(csettings, n1)), stderr=subprocess.STDOUT)
            await anyio.to_thread.run_sync(lambda: doomed.wait_for(lambda s: s.startswith("ready gateway")))
            try:
                await _move_leader(watcher, "n3")

                async def apart() -> bool:  # the gateway moves the journal's and the work bucket's leaders
                    return all([await _leader_of(watcher, s) not in (None, "n3") for s in (journal, work)])

                await eventually(apart, within=30)
                first = ""
                with suppress(Exception):  # the closed connection, on the way out
                    async with Bus.connect(on(csettings, n2)) as client:
                        session = (await client.gateway.create("apollo", name="both")).id
                        cluster.kill(2)  # the bucket has no leader for the next 4-9 s
                        async with client.stream("apollo", user("keep me too"), session=session) as s:
                            async for text in s:
                                first = text
                                doomed.process.kill()  # the gateway that took the turn dies mid-answer...
                                await client.nc.close()  # ...and so does its client: nobody settles it
                                break
                assert first, "the answer never began"

                async def journaled() -> bool:
                    turns = await _journaled_turns(watcher, session)
                    return any(t.content == "keep me too" for t in turns)

                await eventually(journaled, within=10)
                bucket = await _leader_of(watcher, f"KV_{bucket_name(prefix)}")
                assert bucket is None, "the bucket had its new leader first: this proved nothing"
            finally:
                doomed.stop()

            async with in_process_gateway(on(csettings, n2)):  # the survivor takes the turn over
                turns = await _until_answer_stored(watcher, session, within=90)
            assert [(t.role, t.status) for t in turns] == [("user", "ok"), ("assistant", "ok")]
            assert turns[0].content == "keep me too"
            assert turns[1].content.startswith("apollo heard: keep me too")

            async def cleared() -> bool:
                return await _journaled_turns(watcher, session) == []

            await eventually(cleared, within=30)


# Routes and leaf connections need credentials --------------------------------------------------------


async def _reaches(url_from: str, url_to: str) -> bool:
    """A request from a client on ``url_from`` is answered by a responder on ``url_to``."""
    server, client = await connect(url_to), await connect(url_from)
    try:

        async def here(msg: Any) -> None:
            await msg.respond(b"here")

        sub = await server.subscribe("probe.route", cb=here)
        await server.flush()
        try:
            with anyio.fail_after(3):
                while True:
                    try:
                        return (await client.request("probe.route", b"", timeout=0.5)).data == b"here"
                    except Exception:  # interest not propagated (yet): ask again
                        await anyio.sleep(0.1)
        except TimeoutError:
            return False
        finally:
            await sub.unsubscribe()
    finally:
        await server.close()
        await client.close()


def _refused(log: Path, kind: str) -> bool:
    return log.exists() and f"{kind} connection closed: Authentication Failure" in log.read_text()


async def test_a_route_or_leaf_without_the_credentials_is_refused(tmp_path: Path) -> None:
    """A node that does not know the cluster's route secret cannot join, one that does can; a leaf
    without the hub's leaf key is refused, one with it connects."""
    from tekton.cluster import new_leaf_seed, public_key

    p_a, p_rogue, p_peer, p_leaf, p_good_leaf, r_a, r_rogue, r_peer, l_a = free_ports(9)
    seed = new_leaf_seed()
    a = NodeConfig(
        name="a", store_dir=tmp_path / "a", port=p_a, cluster_port=r_a, route_secret="the-secret",
        routes=[f"nats-route://127.0.0.1:{r_peer}"], leaf_port=l_a, leaf_nkey=public_key(seed),
    )  # fmt: skip
    route_to_a = [f"nats-route://127.0.0.1:{r_a}"]
    rogue = NodeConfig(
        name="rogue", store_dir=tmp_path / "r", port=p_rogue, cluster_port=r_rogue, routes=route_to_a
    )
    peer = NodeConfig(
        name="peer", store_dir=tmp_path / "p", port=p_peer, cluster_port=r_peer, routes=route_to_a,
        route_secret="the-secret",
    )  # fmt: skip
    leaf_url = [f"nats://127.0.0.1:{l_a}"]
    leaf = NodeConfig(
        name="leaf", store_dir=tmp_path / "l", port=p_leaf, leaf_remotes=leaf_url, js_domain="l1"
    )
    good_leaf = NodeConfig(
        name="good-leaf", store_dir=tmp_path / "g", port=p_good_leaf, leaf_remotes=leaf_url, leaf_seed=seed,
        js_domain="l2",
    )  # fmt: skip
    servers = []
    try:
        for node in (a, rogue, peer, leaf, good_leaf):
            servers.append(node.server(log_file=tmp_path / f"{node.name}.log").start())
        a_log = tmp_path / "a.log"
        await eventually(lambda: _refused(a_log, "Router"), within=20)
        await eventually(lambda: _refused(a_log, "Leafnode"), within=20)
        assert await _reaches(servers[2].url, servers[0].url)  # the peer with the secret is routed
        assert await _reaches(servers[4].url, servers[0].url)  # the leaf with the key is connected
        assert not await _reaches(servers[1].url, servers[0].url)  # the rogue node is not
        assert not await _reaches(servers[3].url, servers[0].url)  # nor the leaf without the key
    finally:
        for server in servers:
            server.stop()
