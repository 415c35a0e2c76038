"""Sessions: create / get / append latency against a real nats-server, and a turn's cost over the bus.

    python -m bench.sessions [--quick]

- Through the gateway (a `tekton gateway` process): create and get round trips, sequential and with
  50 concurrent clients (each its own connection).
- The store itself (JetStream KV, compare-and-set): append one turn, sequential and with 50
  concurrent writers on 50 sessions, and how one append grows with the session's length.
- A whole turn in a session next to the same request sent directly (scripted specialist at 0 ms):
  first chunk, and done -> "stored" (when the next turn may see it).

Prints the figures and writes bench/results/sessions.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats

from bench.common import start_child, summary, timed, write_results
from bus.client import Bus
from bus.server import EmbeddedNats
from bus.sessions import Session, Turn
from bus.settings import TektonSettings
from bus.wire import ChatMessage
from gateway.store import SessionStore, StoreLimits, open_bucket

CLIENTS = 50


async def concurrently(make: Callable[[int], Callable[[], Awaitable[Any]]], n: int) -> list[float]:
    """``CLIENTS`` tasks, each running its own call ``n`` times; every latency."""
    took: list[float] = []

    async def one(i: int) -> None:
        took.extend(await timed(make(i), n))

    async with anyio.create_task_group() as tg:
        for i in range(CLIENTS):
            tg.start_soon(one, i)
    return took


def turn(i: int, size: int = 200) -> Turn:
    return Turn(role="user" if i % 2 == 0 else "assistant", content="x" * size, specialist="apollo")


async def measure(settings: TektonSettings, quick: bool) -> dict[str, Any]:
    n = 100 if quick else 1000
    per_client = 10 if quick else 40
    figures: dict[str, Any] = {}
    async with Bus.connect(settings) as bus:
        api = bus.gateway
        await api.create("apollo")  # warm up
        created = await api.create("apollo", name="bench")
        gateway: dict[str, Any] = {
            "create_sequential": summary(await timed(lambda: api.create("apollo"), n)),
            "get_sequential": summary(await timed(lambda: api.get(created.id), n)),
        }
        clients = [await nats.connect(settings.nats_url) for _ in range(CLIENTS)]
        try:
            buses = [Bus(nc, settings) for nc in clients]
            gateway[f"get_{CLIENTS}_concurrent"] = summary(
                await concurrently(lambda i: lambda: buses[i].gateway.get(created.id), per_client)
            )
            gateway[f"create_{CLIENTS}_concurrent"] = summary(
                await concurrently(lambda i: lambda: buses[i].gateway.create("apollo"), per_client)
            )
        finally:
            for nc in clients:
                await nc.close()
        figures["gateway"] = gateway

        # The defaults: a session that has reached the turn cap stays at 200 turns.
        limits = StoreLimits(
            ttl_s=settings.session_ttl_s, max_turns=settings.session_max_turns, max_bytes=bus.nc.max_payload
        )
        kv = await open_bucket(bus.nc.jetstream(), settings.prefix, limits)
        store = SessionStore(kv, limits)

        def append(session_id: str) -> Callable[[], Awaitable[Session]]:
            return lambda: store.update(
                session_id, lambda s: s.model_copy(update={"turns": [*s.turns, turn(1)]})
            )

        seq = await store.create(Session(specialist="apollo"))
        store_figs: dict[str, Any] = {"append_sequential": summary(await timed(append(seq.id), n))}
        sessions = [await store.create(Session(specialist="apollo")) for _ in range(CLIENTS)]
        store_figs[f"append_{CLIENTS}_concurrent_writers"] = summary(
            await concurrently(lambda i: append(sessions[i].id), per_client)
        )
        shared = await store.create(Session(specialist="apollo"))
        contended = await concurrently(lambda i: append(shared.id), 2)
        store_figs[f"append_{CLIENTS}_writers_one_session"] = summary(contended)
        final = (await store.resolve(shared.id))[0]
        store_figs["contended_turns_kept"] = f"{len(final.turns) + final.dropped} of {len(contended)}"
        # Two replicas (two stores, two connections) fighting over one session: compare-and-set.
        other_nc = await nats.connect(settings.nats_url)
        try:
            other = SessionStore(await open_bucket(other_nc.jetstream(), settings.prefix, limits), limits)
            duel = await store.create(Session(specialist="apollo"))
            stores = [store, other]
            fought = await concurrently(
                lambda i: (
                    lambda: stores[i % 2].update(
                        duel.id, lambda s: s.model_copy(update={"turns": [*s.turns, turn(1)]})
                    )
                ),
                2,
            )
        finally:
            await other_nc.close()
        store_figs[f"append_{CLIENTS}_writers_one_session_two_replicas"] = summary(fought)
        final = (await store.resolve(duel.id))[0]
        store_figs["two_replica_turns_kept"] = f"{len(final.turns) + final.dropped} of {len(fought)}"
        growth = {}
        store = SessionStore(kv, StoreLimits(ttl_s=3600, max_turns=100_000, max_bytes=bus.nc.max_payload))
        for length in (0, 50, 100, 200, 400):
            session = await store.create(Session(specialist="apollo", turns=[turn(i) for i in range(length)]))
            growth[f"{length}_turns"] = summary(await timed(append(session.id), 50 if quick else 200))
        store_figs["append_by_session_length_200B_turns"] = growth
        figures["store"] = store_figs

        turn_n = 50 if quick else 300
        direct_first: list[float] = []
        session_first: list[float] = []
        stored_after_done: list[float] = []
        talk = await api.create("apollo", context_window=4)
        for _ in range(turn_n):
            async with bus.stream("apollo", [ChatMessage(role="user", content="hi")]) as s:
                async for _ in s:
                    pass
            assert s.first_chunk_at is not None
            direct_first.append(s.first_chunk_at - s.sent_at)
            async with bus.stream("apollo", [ChatMessage(role="user", content="hi")], session=talk.id) as t:
                async for _ in t:
                    pass
                stored_at = time.perf_counter()
            assert t.first_chunk_at is not None and t.done_at is not None and t.stored is not None
            session_first.append(t.first_chunk_at - t.sent_at)
            stored_after_done.append(stored_at - t.done_at)
        figures["turn"] = {
            "first_chunk_direct": summary(direct_first),
            "first_chunk_in_session": summary(session_first),
            "stored_after_done": summary(stored_after_done),
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "store", port=0) as server:
        settings = TektonSettings(nats_url=server.url, data_dir=Path(tmp))
        env = {"TEKTON_NATS_URL": server.url, "TEKTON_CONFIG": "/nonexistent"}
        quiet = ["--log-level", "warning"]
        children = [
            start_child([py, "-m", "tekton", "gateway", *quiet], env, "ready"),
            start_child(
                [py, "-m", "tekton", "specialist", "apollo", "--provider", "scripted", *quiet], env, "ready"
            ),
        ]
        try:
            figures = anyio.run(measure, settings, args.quick)
        finally:
            for child in children:
                child.terminate()
                child.wait()
    figures["targets"] = {"get_and_append_p99_sequential_ms_lt": 2.0}
    path = write_results("sessions", figures)
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
