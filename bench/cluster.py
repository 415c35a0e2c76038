"""Cluster benchmark: a 3-node NATS cluster against one nats-server, in the same run.

    python -m bench.cluster [--quick]

- first chunk p50/p99: client and specialist on one server vs client on n1 and specialist on n3;
- recovery after kill -9 of the client's node (the one holding the runs stream): time until its next
  answer (and, with the sessions bucket's leader killed, until the next session write), p50/p99 over
  several kills;
- aggregate tokens/s with specialist replicas (processes) on 1, 2 and 3 nodes;
- placement: k concurrent requests on k one-slot replicas with a fixed per-request cost (scripted
  provider): speedup = k x (one request alone) / (the k together); slots placement vs the queue group
  alone ("random"), same run; and with the local model (SmolLM2, k = 2 on 2 replicas, each model
  with its share of the cores, then with every core each: the speedups and one request alone);
- recovery after kill -9 of the sessions bucket leader's node: time until the next session turn is
  answered; until it is durable (in the turn journal, R3 and led from another node, or the bucket:
  gateway/journal.py); and until the bucket holds it, once its replicas have elected a new leader.

Writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgpack

from bench.common import cpu_s, pct, start_child, summary, write_results
from bus.client import Bus, connect
from bus.cluster import LocalCluster
from bus.errors import BusError
from bus.runs import ensure_runs_stream, runs_stream_name
from bus.server import EmbeddedNats
from bus.sessions import Session
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions
from gateway.journal import TurnJournal, journal_stream_name
from gateway.runtime import serve_gateway
from gateway.store import bucket_name
from specialists.providers.local import cores_share
from specialists.runtime import serve_specialists

PROMPT = [ChatMessage(role="user", content="hello")]
# The fixed per-request cost of the placement rounds (the scripted provider's first-token delay).
COST_MS = 500
# Tokens per request in the local-model placement rounds.
LOCAL_TOKENS = 48
LOCAL_PROMPT = "Write a long story about a lighthouse keeper."


def specialist(url: str, *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tekton", "specialist", "apollo", "--provider", "scripted"]
    argv += ["--nats", url, "--log-level", "warning"]
    return start_child(argv, {"TEKTON_CONFIG": "/nonexistent", **(env or {})}, "ready ")


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


async def first_chunks(url: str, n: int) -> list[float]:
    settings = TektonSettings(nats_url=url)
    took = []
    async with Bus.connect(settings) as bus:
        await bus.ask("apollo", "warm up")
        for _ in range(n):
            async with bus.stream("apollo", PROMPT) as s:
                async for _ in s:
                    pass
            assert s.first_chunk_at is not None
            took.append(s.first_chunk_at - s.sent_at)
    return took


async def bench_first_chunk(single: EmbeddedNats, cluster: LocalCluster, n: int) -> dict[str, Any]:
    procs = [specialist(single.url)]
    try:
        one = await first_chunks(single.url, n)
    finally:
        stop(procs)
    procs = [specialist(cluster.urls[2])]
    try:
        across = await first_chunks(cluster.urls[0], n)
    finally:
        stop(procs)
    a, b = summary(one), summary(across)
    return {
        "one_node": a,
        "across_nodes": b,
        "p50_ratio": round(b["p50_ms"] / a["p50_ms"], 2),
        "p99_ratio": round(b["p99_ms"] / a["p99_ms"], 2),
    }


async def _runs_holder(cluster: LocalCluster) -> int:
    """The node holding the runs stream (one replica), which is made now if it is not yet."""
    async with Bus.connect(TektonSettings(nats_url=cluster.url)) as bus:
        await ensure_runs_stream(bus.nc, bus.settings)
        info = await bus.nc.jetstream().stream_info(runs_stream_name(bus.settings.prefix))
    assert info.cluster is not None and info.cluster.leader is not None
    return [c.name for c in cluster.configs].index(info.cluster.leader)


async def bench_recovery(cluster: LocalCluster, kills: int) -> dict[str, Any]:
    """Kill the client's node; how long until its next answer arrives (reconnect + request). The
    client's node is the one holding the runs stream (the worst case: a resume cannot read the stream)."""
    holder = await _runs_holder(cluster)
    n3, n1 = cluster.urls[holder], cluster.urls[(holder + 1) % 3]
    procs = [specialist(n1)]
    stream_s: list[float] = []
    session_s: list[float] = []
    durable_s: list[float] = []
    bucket_s: list[float] = []
    # A request written into the dying node's socket is lost with it: the client retries after 1 s of
    # silence, as a user (or aish's fallback) would.
    settings = TektonSettings(nats_url=f"{n3},{n1}", idle_timeout_s=1)
    try:
        async with anyio.create_task_group() as tg:
            stop_gateway = anyio.Event()
            await tg.start(
                lambda task_status: serve_gateway(
                    settings.model_copy(update={"nats_url": cluster.url}),
                    stop=stop_gateway,
                    task_status=task_status,
                )
            )
            for _ in range(kills):
                nc = await connect(n3)  # the client sits on the node about to die
                bus = Bus(nc, settings)
                await _until_answered(partial(bus.ask, "apollo", "before"))  # interest has spread
                session = await bus.gateway.create("apollo")
                killed = time.perf_counter()
                await anyio.to_thread.run_sync(cluster.kill, holder)
                await _until_answered(partial(bus.ask, "apollo", "after"))
                stream_s.append(time.perf_counter() - killed)
                await nc.close()
                await anyio.to_thread.run_sync(cluster.restart, holder)
                # Now the sessions bucket's leader: kill it, time the next session write from elsewhere.
                s_nc = await connect(cluster.url)  # gateway and client fail over between all nodes
                s_bus = Bus(s_nc, settings)
                leader = await _bucket_leader(s_bus)
                index = [c.name for c in cluster.configs].index(leader)
                killed = time.perf_counter()
                await anyio.to_thread.run_sync(cluster.kill, index)
                turn = _Turn(s_bus, session.id, f"after kill {len(session_s)}")

                async with anyio.create_task_group() as watching:  # from the kill on, beside the turn
                    for wait, into in ((_until_durable, durable_s), (_until_stored, bucket_s)):
                        watching.start_soon(_timed, wait(s_bus, session.id, turn.request_id), killed, into)
                    await _until_answered(turn)
                assert turn.answered_at is not None
                session_s.append(turn.answered_at - killed)
                await s_nc.close()
                await anyio.to_thread.run_sync(cluster.restart, index)
            stop_gateway.set()
    finally:
        stop(procs)
    figures: dict[str, Any] = {"stream_after_client_node_kill": summary(stream_s)}
    if session_s:
        # What the user waits for: the turn's answer (its store write goes on behind it while the
        # bucket elects a leader), then, apart, until the turn is in the bucket for good.
        figures["session_turn_answered_after_leader_kill"] = summary(session_s)
        # Durable: in the turn journal (R3, led from another node) or the bucket, whichever first.
        figures["session_turn_durable_after_leader_kill"] = summary(durable_s)
        figures["session_turn_in_bucket_after_leader_kill"] = summary(bucket_s)
    figures["p99_under_2s"] = max(stream_s + session_s + durable_s) < 2.0
    return figures


class _Turn:
    """One session turn, retried with the same request id (a retry stores it once); notes when its
    answer's last chunk arrived."""

    def __init__(self, bus: Bus, session: str, text: str):
        self.bus, self.session, self.text = bus, session, text
        self.request_id = f"bench-{time.monotonic_ns()}"
        self.answered_at: float | None = None

    async def __call__(self) -> None:
        said = [ChatMessage(role="user", content=self.text)]
        async with self.bus.stream("", said, session=self.session, request_id=self.request_id) as s:
            async for _ in s:
                self.answered_at = time.perf_counter()


def _settled(data: bytes | None, request_id: str) -> bool:
    stored = Session.model_validate(msgpack.unpackb(data or b"", raw=False))
    return any(t.request_id == request_id and t.status == "ok" for t in stored.turns)


async def _until_stored(bus: Bus, session: str, request_id: str) -> None:
    """Until the bucket (any replica) holds the turn's answer."""
    bucket = bucket_name(bus.settings.prefix)
    js = bus.nc.jetstream(timeout=1.0)
    with anyio.fail_after(60):
        while True:
            try:  # a direct get, which any replica answers (no leader needed)
                entry = await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.s.{session}", direct=True)
                if _settled(entry.data, request_id):
                    return
            except Exception:  # the bucket is electing its leader, or a node restarts
                pass
            await anyio.sleep(0.02)


async def _until_journaled(bus: Bus, session: str, request_id: str) -> None:
    """Until the turn journal (gateway/journal.py, a quorum of its replicas) holds the turn's answer."""
    prefix = bus.settings.prefix
    journal = TurnJournal(bus.nc, prefix, bucket_name(prefix), 3)
    with anyio.fail_after(60):
        while True:
            try:
                for _, _, journaled in await journal.entries(session):
                    if any(t.request_id == request_id and t.status == "ok" for t in journaled.turns):
                        return
            except Exception:  # a node restarts
                pass
            await anyio.sleep(0.02)


# Waits until a session (id) holds a turn's answer (request id) somewhere.
Waiter = Callable[[Bus, str, str], Awaitable[None]]


async def _timed(wait: Awaitable[None], since: float, into: list[float]) -> None:
    await wait
    into.append(time.perf_counter() - since)


async def _until_durable(bus: Bus, session: str, request_id: str) -> None:
    """Until the turn's answer is durable: in the bucket, or in the journal, whichever comes first."""
    async with anyio.create_task_group() as tg:

        async def first(wait: Waiter) -> None:
            await wait(bus, session, request_id)
            tg.cancel_scope.cancel()

        tg.start_soon(first, _until_stored)
        tg.start_soon(first, _until_journaled)


async def _until_answered(call: Callable[[], Awaitable[Any]]) -> None:
    """``call`` until it succeeds (a retryable failure: the bus is failing over), for at most 30 s."""
    with anyio.fail_after(30):
        while True:
            try:
                await call()
                return
            except BusError:
                await anyio.sleep(0.05)


async def _bucket_leader(bus: Bus) -> str:
    """The sessions bucket's leader once every replica is current and the gateway has moved the turn
    journal's leader off its node (gateway/journal.py): the steady state a node is lost from."""
    js = bus.nc.jetstream(timeout=1.0)
    with anyio.fail_after(30):
        while True:
            try:
                info = await js.stream_info(f"KV_{bucket_name(bus.settings.prefix)}")
                journal = await js.stream_info(journal_stream_name(bucket_name(bus.settings.prefix)))
            except Exception:  # a node just restarted: JetStream there is still starting
                await anyio.sleep(0.1)
                continue
            leader = info.cluster.leader if info.cluster else None
            current = info.cluster is not None and all(p.current for p in info.cluster.replicas or [])
            if leader and current and journal.cluster and journal.cluster.leader not in (None, leader):
                return str(leader)
            await anyio.sleep(0.1)


async def aggregate(urls: list[str], streams: int, tokens: int) -> float:
    """``streams`` concurrent streams of ``tokens`` tokens from clients on every node: tokens/s (from
    each stream's done frame: a chunk may carry a burst of tokens)."""
    buses = [Bus(await connect(u), TektonSettings(nats_url=u)) for u in urls]
    total = 0
    options = ChatOptions(max_tokens=tokens)

    async def one(bus: Bus) -> None:
        nonlocal total
        async with bus.stream("apollo", PROMPT, options) as s:
            async for _ in s:
                pass
        total += s.tokens or 0

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(streams):
            tg.start_soon(one, buses[i % len(buses)])
    took = time.perf_counter() - start
    for bus in buses:
        await bus.nc.close()
    return total / took


async def bench_aggregate(cluster: LocalCluster, streams: int, tokens: int) -> dict[str, Any]:
    env = {"TEKTON_SCRIPTED_TOKENS": str(tokens)}
    figures: dict[str, Any] = {}
    for nodes in (1, 2, 3):
        procs = [specialist(cluster.urls[i], env=env) for i in range(nodes)]
        try:
            await aggregate(cluster.urls, 3, 100)  # warm up
            figures[f"replicas_on_{nodes}_nodes_tokens_per_s"] = round(
                await aggregate(cluster.urls, streams, tokens)
            )
        finally:
            stop(procs)
    return figures


async def placement_rounds(
    url: str,
    mode: str,
    k: int,
    rounds: int,
    cost_ms: int,
    provider: str = "scripted",
    threads: int | None = None,
) -> dict[str, Any]:
    """``provider="local"``: the local model (SmolLM2), a fixed number of tokens per request (the cost
    is the model's, on this machine's cores). Each replica's model takes its share of the cores (the k
    replicas are the local-model processes on this machine, as `tekton specialist --replicas k` tells
    them), or ``threads`` threads."""
    os.environ["TEKTON_SCRIPTED_FIRST_TOKEN_MS"] = str(cost_ms)
    os.environ["TEKTON_SCRIPTED_TOKENS"] = "2"
    os.environ.pop("TEKTON_LOCAL_THREADS", None)
    os.environ["TEKTON_LOCAL_PROCESSES"] = str(k)
    if threads is not None:
        os.environ["TEKTON_LOCAL_THREADS"] = str(threads)
    options = ChatOptions(max_tokens=LOCAL_TOKENS, temperature=0.0) if provider == "local" else None
    same = LOCAL_PROMPT if provider == "local" else None  # one prompt: every request costs the same
    settings = TektonSettings(
        nats_url=url, provider=provider, max_concurrency=1, placement=mode, heartbeat_s=0.5
    )
    speedups = []
    # The model processes' CPU seconds while requests run alone and k at a time: threads that wait
    # for a core they share (oversubscription) show as more CPU per request together than alone.
    cpu = {"alone": 0.0, "together": 0.0}
    workers: list[int] = []

    def model_cpu() -> float:
        return sum(cpu_s(pid) for pid in workers)

    async with anyio.create_task_group() as tg:
        stops = [anyio.Event() for _ in range(k)]
        for ev in stops:
            services = await tg.start(
                lambda task_status, ev=ev: serve_specialists(
                    settings, ["apollo"], stop=ev, task_status=task_status
                )
            )
            pid = getattr(getattr(services[0].provider, "worker", None), "pid", None)
            workers += [pid] if pid else []
        async with Bus.connect(settings) as bus:
            await anyio.sleep(3 * settings.heartbeat_s)  # let the replicas hear each other (setup only)

            async def by_itself() -> float:
                start, used = time.perf_counter(), model_cpu()
                await bus.ask("apollo", same or "alone", options)
                cpu["alone"] += model_cpu() - used
                return time.perf_counter() - start

            alones = [await by_itself() for _ in range(3)]
            alone = pct(alones, 50)
            distinct = []
            for _ in range(rounds):
                served: list[str] = []
                if provider == "local":
                    # The model's speed drifts with what else runs on the machine: each round's
                    # baseline is one request alone just before it.
                    alone = await by_itself()
                    alones.append(alone)

                async def one(i: int, served: list[str] = served) -> None:
                    served.append((await bus.ask("apollo", same or f"r{i}", options)).start.instance)

                start, used = time.perf_counter(), model_cpu()
                async with anyio.create_task_group() as round_tg:
                    for i in range(k):
                        round_tg.start_soon(one, i)
                speedups.append(k * alone / (time.perf_counter() - start))
                cpu["together"] += model_cpu() - used
                distinct.append(len(set(served)))
        for ev in stops:
            ev.set()
    return {
        "k": k,
        "one_request_s": round(pct(alones, 50), 3),
        "speedups": [round(s, 2) for s in speedups],
        "min_speedup": round(min(speedups), 2),
        "p50_speedup": round(pct(speedups, 50), 2),
        "rounds_at_least_0.9k": sum(s >= 0.9 * k for s in speedups),
        # How many replicas each round's k requests went to (k: none waited behind a busy one).
        "rounds_on_k_replicas": sum(d == k for d in distinct),
        "rounds": rounds,
        "provider": provider,
        "threads_per_replica": threads or cores_share(k),
        **(
            {
                "model_cpu_s_per_request_alone": round(cpu["alone"] / len(alones), 3),
                "model_cpu_s_per_request_together": round(cpu["together"] / (k * rounds), 3),
            }
            if workers
            else {}
        ),
    }


PARTS = ("first_chunk", "placement", "placement_local", "aggregate", "recovery")


async def main(quick: bool, parts: list[str]) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="tekton-bench-cluster-"))
    n = 50 if quick else 300
    figures: dict[str, Any] = {}
    single = EmbeddedNats(base / "single", port=0).start()
    cluster = LocalCluster(base / "cluster", 3)
    await anyio.to_thread.run_sync(cluster.start)
    try:
        if "first_chunk" in parts:
            figures["first_chunk"] = await bench_first_chunk(single, cluster, n)
            print("first chunk", figures["first_chunk"], flush=True)
        if "placement" in parts:
            figures["placement"] = {}
            for k in (2, 3):
                for mode in ("slots", "random"):
                    figures["placement"][f"{mode}_k{k}"] = await placement_rounds(
                        single.url, mode, k, 20, cost_ms=COST_MS
                    )
                    print("placement", mode, k, figures["placement"][f"{mode}_k{k}"], flush=True)
            figures["placement"]["on_cluster_slots_k3"] = await placement_rounds(
                cluster.url, "slots", 3, 20, COST_MS
            )
            print("placement on cluster", figures["placement"]["on_cluster_slots_k3"], flush=True)
        if "placement_local" in parts:
            # k = 2 on 2 replicas, each replica's model with its share of the cores; then with every
            # core each (the default before shares): what a lone request gains, what k together lose.
            local = figures.setdefault("placement_local", {"cores": os.cpu_count()})
            for mode in ("slots", "random"):
                local[f"{mode}_k2"] = await placement_rounds(single.url, mode, 2, 20, 0, provider="local")
                print("placement, local model", mode, local[f"{mode}_k2"], flush=True)
            every = os.cpu_count() or 2
            local["slots_k2_all_threads"] = await placement_rounds(
                single.url, "slots", 2, 20, 0, provider="local", threads=every
            )
            print("placement, local model, every core each", local["slots_k2_all_threads"], flush=True)
            share, alone = local["slots_k2"]["one_request_s"], local["slots_k2_all_threads"]["one_request_s"]
            local["one_request_share_vs_all_threads"] = round(share / alone, 2)
        if "aggregate" in parts:
            figures["aggregate"] = await bench_aggregate(
                cluster, 6 if quick else 12, 2000 if quick else 10000
            )
            print("aggregate", figures["aggregate"], flush=True)
        if "recovery" in parts:
            figures["recovery"] = await bench_recovery(cluster, 3 if quick else 10)
            print("recovery", figures["recovery"], flush=True)
    finally:
        cluster.stop()
        single.stop()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {', '.join(PARTS)}")
    args = parser.parse_args()
    chosen = [p for p in args.parts.split(",") if p]
    if unknown := set(chosen) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    result = anyio.run(main, args.quick, chosen)
    name = "cluster" + ("-quick" if args.quick else "") + ("" if set(chosen) == set(PARTS) else "-partial")
    print(write_results(name, result))
