"""Two users, alice and bob, on one real nats-server with auth: every attack from issue 15 is tried by
bob and refused by the server (or, where the server pins who asks, by the gateway/specialist that
reads the pinned name); alice is unaffected. Revocation cuts a user off; a wrong CA fails the TLS
handshake; an exposed listener without auth and TLS is refused."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.auth import load_credentials
from bus.bulk import BulkOperation, BulkPlan
from bus.client import Bus, connect, connect_as
from bus.errors import BadRequest, BusError, NatsUnavailable, RunNotFound, SessionNotFound, Unauthorized
from bus.refusals import Refusals
from bus.server import EmbeddedNats
from bus.sessions import Session, SessionChat
from bus.settings import TektonSettings
from bus.subjects import ALL_USERS
from bus.tls import TlsSocketTransport
from bus.wire import ChatMessage, ChatRequest, DoneFrame, encode, unpack_frame
from gateway.runtime import serve_gateway
from tekton import certs
from tekton.users import Users
from tests.helpers import (
    AISH,
    aish,
    child_env,
    env,
    eventually,
    in_process_gateway,
    in_process_specialists,
    spawn,
)

# Quick ones are in the fast tier; `tekton up --tls` starts ten specialists and is not.
pytestmark = pytest.mark.anyio


@dataclass
class Team:
    server: EmbeddedNats
    users: Users
    services: TektonSettings  # the gateway's and specialists' (their creds are the data dir's)
    alice: TektonSettings
    bob: TektonSettings
    admin: TektonSettings


@pytest.fixture
def team(tmp_path: Path) -> Iterator[Team]:
    data = tmp_path / "data"
    users = Users(data, "tekton")
    users.ensure_local()
    users.add("alice")
    users.add("bob")
    server = EmbeddedNats(data / "nats", port=0, auth_file=users.auth_file, log_file=tmp_path / "nats.log")
    server.start()
    base = TektonSettings(
        nats_url=server.url, data_dir=data, provider="scripted", heartbeat_s=0.2, idle_timeout_s=5.0
    )
    try:
        yield Team(
            server=server,
            users=users,
            services=base,
            alice=base.model_copy(update={"creds": users.user_creds_path("alice")}),
            bob=base.model_copy(update={"creds": users.user_creds_path("bob")}),
            admin=base,  # the local user tekton made on first run is an admin
        )
    finally:
        server.stop()


class Raw:
    """Bob's own nats-py connection (his credentials, any subject he likes) and what the server said."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, settings: TektonSettings) -> NATS:
        creds = load_credentials(Path(str(settings.creds)))

        async def on_error(err: Exception) -> None:
            self.errors.append(str(err))

        self.nc = await nats.connect(
            settings.nats_url,
            nkeys_seed_str=creds.seed,
            inbox_prefix=f"_INBOX.{creds.user}",
            error_cb=on_error,
            max_reconnect_attempts=0,
        )
        return self.nc

    async def refused(self, what: str) -> None:
        # nats-py passes the server's -ERR on lowercased.
        await eventually(lambda: any(what.lower() in e.lower() for e in self.errors), within=10)


@pytest.fixture
async def bob(team: Team) -> AsyncIterator[Raw]:
    raw = Raw()
    await raw.connect(team.bob)
    yield raw
    assert raw.nc is not None
    await raw.nc.close()


async def ask(settings: TektonSettings, specialist: str, text: str, session: str | None = None) -> str:
    message = [ChatMessage(role="user", content=text)]
    async with (
        Bus.connect(settings, name="test") as bus,
        bus.stream(specialist, message, session=session) as s,
    ):
        return "".join([t async for t in s])


@pytest.mark.fast
def test_credentials_files_are_private(team: Team) -> None:
    for path in [team.users.user_creds_path("alice"), *team.users.dir.glob("*.creds")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(team.users.dir.stat().st_mode) == 0o700
    assert load_credentials(team.users.user_creds_path("alice")).user == "alice"


@pytest.mark.fast
async def test_a_client_without_credentials_is_refused(team: Team) -> None:
    with pytest.raises(NatsUnavailable) as refused:
        await connect(team.server.url)
    assert "requires credentials" in str(refused.value)


@pytest.mark.fast
async def test_bob_cannot_read_other_replies_or_requests(team: Team, bob: Raw) -> None:
    assert bob.nc is not None
    heard: list[bytes] = []

    async def keep(msg: nats.aio.msg.Msg) -> None:
        heard.append(msg.data)

    for subject in ["_INBOX.>", "_INBOX.alice.>", "tekton.ai.*.chat", "tekton.cancel.>", ">"]:
        await bob.nc.subscribe(subject, cb=keep)
        await bob.refused(f'Permissions Violation for Subscription to "{subject}"')
    async with in_process_specialists(team.services, "apollo"):
        assert await ask(team.alice, "apollo", "secret plans") == "apollo heard: secret plans"
        # Bob's own requests still work: the refusals were about others' subjects.
        assert await ask(team.bob, "apollo", "mine") == "apollo heard: mine"
    await bob.nc.flush()
    assert heard == []


@pytest.mark.fast
async def test_bob_cannot_answer_for_a_specialist_or_fake_a_service(team: Team, bob: Raw) -> None:
    assert bob.nc is not None
    await bob.nc.subscribe("tekton.ai.apollo.chat", queue="tekton.ai.apollo")
    await bob.refused('Permissions Violation for Subscription to "tekton.ai.apollo.chat"')
    await bob.nc.subscribe("$SRV.PING")
    await bob.refused('Permissions Violation for Subscription to "$SRV.PING"')
    async with in_process_specialists(team.services, "apollo"):
        answers = [await ask(team.alice, "apollo", f"q{i}") for i in range(10)]
        assert answers == [f"apollo heard: q{i}" for i in range(10)]
        async with Bus.connect(team.alice, name="test") as bus:
            assert {i.name for i in await bus.instances(window=0.5)} == {"apollo"}


@pytest.mark.fast
async def test_bob_cannot_touch_the_sessions_bucket_or_its_journal(team: Team, bob: Raw) -> None:
    assert bob.nc is not None
    async with in_process_gateway(team.services):
        await bob.nc.publish("$JS.API.STREAM.INFO.KV_tekton_sessions", b"")
        await bob.refused('Permissions Violation for Publish to "$JS.API.STREAM.INFO.KV_tekton_sessions"')
        await bob.nc.publish("$KV.tekton_sessions.s.x", b"overwrite")
        await bob.refused('Permissions Violation for Publish to "$KV.tekton_sessions.s.x"')
        # Nor the turn journal, whose entries a gateway replays into the bucket (gateway/journal.py).
        await bob.nc.publish(f"tekton.journal.{'0' * 32}.x", b"a forged session")
        await bob.refused(f'Permissions Violation for Publish to "tekton.journal.{"0" * 32}.x"')


@pytest.mark.fast
async def test_bob_cannot_have_any_responder_write_into_the_sessions_bucket_or_its_journal(
    team: Team, bob: Raw
) -> None:
    """A request's reply subject is the asker's to choose, and a responder may publish to it: a
    specialist (``allow_responses``), and the gateway, whose connection may publish to ``$KV.>``. Frames
    or replies sent to ``$KV.<sessions>.s.<id>`` would be stored as alice's session (unreadable from then
    on), and to the journal as an entry a gateway replays. Nobody answers there: not a chat, not a
    ``$SRV`` ping, info or stats, not the gateway's API."""
    assert bob.nc is not None
    async with (
        in_process_gateway(team.services),
        in_process_specialists(team.services, "apollo"),
        Bus.connect(team.alice, name="alice") as alice,
    ):
        work = await alice.gateway.create("apollo", name="work")
        gateway = await connect_as(team.services, name="test", identity="gateway")  # reads the bucket
        kv = await gateway.jetstream().key_value("tekton_sessions")
        before = (await kv.get(f"s.{work.id}")).revision
        into = f"$KV.tekton_sessions.s.{work.id}"
        request = encode(ChatRequest(messages=[ChatMessage(role="user", content="x")]))
        targets = [into, f"tekton.journal.{work.id}.x"]
        for reply in targets:
            await bob.nc.publish("tekton.ai.apollo.chat", request, reply=reply)

        async def dropped_or_written() -> bool:
            errors = sum(
                int((a.get("endpoints") or [{}])[0].get("data", {}).get("errors", 0))
                for a in await alice.stats("apollo", window=0.5)
            )
            return errors >= len(targets) or (await kv.get(f"s.{work.id}")).revision != before

        await eventually(dropped_or_written, within=10)
        for subject in ("$SRV.PING", "$SRV.INFO", "$SRV.STATS", "tekton.gateway.bob.session.list"):
            await bob.nc.publish(subject, b"", reply=into)
            # Then the same asked properly on the same subject: each responder handles one subscription's
            # messages in order, so its answer to this comes after whatever it did with the first.
            inbox = bob.nc.new_inbox()
            sub = await bob.nc.subscribe(inbox)
            await bob.nc.publish(subject, b"" if subject.startswith("$") else b"\x80", reply=inbox)
            await sub.next_msg(timeout=10)
            await sub.unsubscribe()
        await gateway.jetstream().stream_info("KV_tekton_sessions")  # after any stored write
        assert (await kv.get(f"s.{work.id}")).revision == before, "a reply overwrote the session"
        assert (await alice.gateway.get("work")).id == work.id
        await gateway.close()


@pytest.mark.fast
async def test_sessions_belong_to_who_made_them(team: Team, bob: Raw) -> None:
    assert bob.nc is not None
    async with (
        in_process_gateway(team.services),
        in_process_specialists(team.services, "apollo"),
        Bus.connect(team.alice, name="alice") as alice,
        Bus.connect(team.bob, name="bob") as bobs,
        Bus.connect(team.admin, name="admin") as admin,
    ):
        work = await alice.gateway.create("apollo", name="work")
        assert await ask(team.alice, "apollo", "remember", session="work") == "apollo heard: remember"
        # Through the gateway as himself: alice's session does not exist for bob.
        assert await bobs.gateway.list() == []
        for attempt in (
            lambda: bobs.gateway.get(work.id),
            lambda: bobs.gateway.get("work"),
            lambda: bobs.gateway.delete(work.id),
            lambda: bobs.gateway.fork(work.id),
            lambda: bobs.gateway.rename(work.id, "mine"),
        ):
            with pytest.raises(SessionNotFound):
                await attempt()
        with pytest.raises(SessionNotFound):
            await ask(team.bob, "apollo", "overwrite", session=work.id)
        # As alice: the server will not let him put her name in the subject.
        await bob.nc.publish("tekton.gateway.alice.session.list", b"")
        await bob.refused('Permissions Violation for Publish to "tekton.gateway.alice.session.list"')
        await bob.nc.publish(f"tekton.gateway.{ALL_USERS}.session.list", b"")
        await bob.refused(f'Permissions Violation for Publish to "tekton.gateway.{ALL_USERS}.session.list"')
        # His own session may share her session's name.
        mine = await bobs.gateway.create("apollo", name="work")
        # ...but its answers go to his inbox only: the gateway will not listen on (record) hers.
        request = ChatRequest(messages=[ChatMessage(role="user", content="x")])
        into_hers = SessionChat(session=mine.id, inbox="_INBOX.alice.abc.1", request=request)
        with pytest.raises(BadRequest, match="is not yours"):
            await bobs.gateway.call("chat", into_hers)
        assert [s.id for s in await bobs.gateway.list()] == [mine.id]
        # Alice is unaffected.
        kept = await alice.gateway.get("work")
        assert kept.id == work.id and kept.owner == "alice" and len(kept.turns) == 2
        # An admin sees everyone's.
        everyone = Bus(admin.nc, team.admin, acting_for=ALL_USERS).gateway
        assert {(s.owner, s.id) for s in await everyone.list()} == {("alice", work.id), ("bob", mine.id)}


async def test_an_admin_sees_every_users_sessions_in_aish_and_a_user_is_refused(
    team: Team, tmp_path: Path
) -> None:
    def sessions(who: TektonSettings, *args: str) -> subprocess.CompletedProcess[str]:
        creds = {"TEKTON_CREDS": str(who.creds)} if who.creds else {}
        return subprocess.run(
            [*AISH, "sessions", *args],
            env=child_env(team.services, **creds),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    async def run(who: TektonSettings, *args: str) -> subprocess.CompletedProcess[str]:
        return await anyio.to_thread.run_sync(lambda: sessions(who, *args))

    # Bob's credentials with "admin" written into the file: aish believes it, nats-server does not.
    forged = tmp_path / "forged.creds"
    text = await anyio.Path(str(team.bob.creds)).read_text()
    await anyio.Path(forged).write_text(text.replace('role = "user"', 'role = "admin"'))
    async with (
        in_process_gateway(team.services) as gateway,
        Bus.connect(team.alice, name="alice") as alice,
        Bus.connect(team.bob, name="bob") as bob,
    ):
        work = await alice.gateway.create(name="work")
        bobs = await bob.gateway.create(name="plans")
        # A session kept before sessions had owners (its owner is empty), as an older gateway stored it.
        legacy = await gateway.store.create(Session(name="legacy"))
        everyone = await run(team.admin, "--all")
        shown = await run(team.admin, "show", "--all", "legacy")
        listed = await run(team.admin, "list", "--all")
        own = await run(team.alice)
        refused = await run(team.bob, "--all")
        refused_show = await run(team.bob, "show", "--all", "work")
        misused = await run(team.admin, "--all", "rename", "work", "x")
        by_server = await run(team.bob.model_copy(update={"creds": forged}), "--all")
        removed = await run(team.admin, "rm", "--all", legacy.id)
        assert await alice.gateway.find("work") is not None  # alice is unaffected
    assert everyone.returncode == 0, everyone.stderr
    header, *rows = everyone.stdout.splitlines()
    assert header.split()[:3] == ["ID", "OWNER", "NAME"]
    assert {tuple(row.split()[:3]) for row in rows} == {
        (work.id, "alice", "work"),
        (bobs.id, "bob", "plans"),
        (legacy.id, "?", "legacy"),
    }
    assert listed.stdout == everyone.stdout
    assert shown.returncode == 0 and shown.stdout.startswith(f"owner ?  session 'legacy' ({legacy.id})")
    assert own.returncode == 0 and work.id in own.stdout and "OWNER" not in own.stdout
    assert legacy.id not in own.stdout and bobs.id not in own.stdout
    for no in (refused, refused_show):
        assert no.returncode == 1 and no.stdout == ""
        assert no.stderr.strip().splitlines() == [
            "aish: --all lists every user's sessions, which only an admin may see; you are 'bob' (role user)"
        ]
    assert misused.returncode == 2 and "--all is for list, show and rm" in misused.stderr
    # The server is what refuses: forged credentials get its refusal, not the sessions.
    assert by_server.returncode == 1 and by_server.stdout == ""
    assert by_server.stderr.strip().splitlines()[-1] == (
        f"aish: the nats-server refused: your credentials may not publish to tekton.gateway.{ALL_USERS}"
        ".session.list; only an admin may (every user's data)"
    )
    assert removed.returncode == 0 and f"deleted {legacy.id}" in removed.stdout


@pytest.mark.fast
async def test_bob_cannot_cancel_alices_request(team: Team, bob: Raw) -> None:
    assert bob.nc is not None
    with env(TEKTON_SCRIPTED_TOKENS="30", TEKTON_SCRIPTED_TOKENS_PER_S="30"):
        async with in_process_specialists(team.services, "apollo") as services:
            async with Bus.connect(team.alice, name="alice") as alice:
                async with alice.stream("apollo", [ChatMessage(role="user", content="long")]) as s:
                    await s.wait_started()
                    rid = s.request.id  # suppose bob learnt it
                    await bob.nc.publish(f"tekton.cancel.alice.{rid}", b"")
                    await bob.refused(f'Permissions Violation for Publish to "tekton.cancel.alice.{rid}"')
                    await bob.nc.publish(f"tekton.cancel.bob.{rid}", b"")  # allowed subject, not his request
                    await bob.nc.flush()
                    text = "".join([t async for t in s])
                result = await s.result()
            assert isinstance(result.done, DoneFrame) and result.done.usage.completion_tokens == 30
            assert text.startswith("apollo heard: long")
            assert services["apollo"].counters.cancelled == 0


async def test_a_refused_request_fails_at_once_not_after_its_timeout(team: Team) -> None:
    """nats-server refuses a publish only in an async -ERR, never as a reply: a gateway call or a run
    read bob may not make waited out its whole timeout (5 s a call) before saying it was refused."""
    async with in_process_gateway(team.services), Bus.connect(team.bob, name="bob") as bob:
        everyone = Bus(bob.nc, team.bob, acting_for=ALL_USERS).gateway
        everyone.timeout = 60.0
        # Under the run read's own timeout (nats-py's 5 s for JetStream requests).
        with anyio.fail_after(4):
            with pytest.raises(Unauthorized, match=r"may not publish to tekton\.gateway\._all\.session"):
                await everyone.list()
            with pytest.raises(RunNotFound):
                async with bob.attach("0123456789abcdef0123456789abcdef", user="alice"):
                    pass


@pytest.mark.fast
async def test_credentials_for_another_prefix_are_a_refusal_not_a_dead_specialist(team: Team) -> None:
    """A client set to another prefix (TEKTON_PREFIX=foo) is refused by the server: said so as soon
    as the server says it (not after the idle timeout), instead of "the specialist sent nothing ...
    it probably died"."""
    elsewhere = team.bob.model_copy(update={"prefix": "foo", "idle_timeout_s": 60.0})
    with anyio.fail_after(5):
        with pytest.raises(Unauthorized, match=r"the nats-server refused: .*foo\."):
            await ask(elsewhere, "apollo", "hi")
    # The same with runs off: the request's publish is what is refused.
    plain = elsewhere.model_copy(update={"runs": False})
    with anyio.fail_after(5):
        with pytest.raises(Unauthorized, match=r"the nats-server refused: .*publish to \"foo\.ai\.apollo"):
            await ask(plain, "apollo", "hi")


@pytest.mark.fast
def test_a_refusal_listener_that_fails_or_is_gone_leaves_the_others_and_the_read_loop_alone() -> None:
    """Refusals are heard in nats-py's read loop, where an exception would stop the connection."""
    refusals = Refusals()
    heard: list[str] = []

    class Listener:
        def __init__(self, fails: bool):
            self.fails = fails

        def refused(self, subject: str, said: str) -> None:
            if self.fails:
                raise ValueError("a listener's bug")
            heard.append(subject)

    failing, working, gone = Listener(True), Listener(False), Listener(False)
    for listener in (failing, working, gone):
        refusals.listen(listener.refused)
    del listener, gone  # (the loop variable held it too)
    refusals.heard('nats: permissions violation for subscription to "tekton.run.bob.x.*"')
    assert heard == ["tekton.run.bob.x.*"]


@pytest.mark.fast
async def test_bob_cannot_have_alices_run_replayed_to_him(team: Team, bob: Raw) -> None:
    """Replay requests (a replica re-sends a run's frames): only under one's own name (the server),
    and only for one's own runs (the specialist); alice's own replay works."""
    assert bob.nc is not None
    heard: list[bytes] = []

    async def keep(msg: Msg) -> None:
        heard.append(msg.data)

    await bob.nc.subscribe("_INBOX.bob.replayed", cb=keep)
    secret = [ChatMessage(role="user", content="secret")]
    with env(TEKTON_SCRIPTED_TOKENS="30", TEKTON_SCRIPTED_TOKENS_PER_S="30"):
        async with (
            in_process_specialists(team.services, "apollo"),
            Bus.connect(team.alice, name="alice") as alice,
            alice.stream("apollo", secret) as s,
        ):
            await s.wait_started()
            rid = s.request.id  # suppose bob learnt it
            await bob.nc.publish(f"tekton.replay.alice.{rid}", b"-1", reply="_INBOX.bob.replayed")
            await bob.refused(f'Permissions Violation for Publish to "tekton.replay.alice.{rid}"')
            # An allowed subject, but not his run: the specialist says nothing.
            await bob.nc.publish(f"tekton.replay.bob.{rid}", b"-1", reply="_INBOX.bob.replayed")
            await bob.nc.flush()
            reply, inbox = await alice.open_inbox()
            await alice.nc.publish(f"tekton.replay.alice.{rid}", b"-1", reply=reply)
            frames = []
            while (msg := await inbox.get(10)) is not None and msg.data:
                frames.append(unpack_frame(msg.data))
            assert msg is not None  # the replay's end
            text = "".join([t async for t in s])
    assert frames[0]["type"] == "start" and [f["seq"] for f in frames] == list(range(len(frames)))
    assert text.startswith("apollo heard: secret")
    await bob.nc.flush()
    assert heard == []


async def test_a_replay_goes_only_to_its_users_own_inbox(team: Team) -> None:
    """The reply subject of a replay request is the asker's to choose: bob's own run replayed into
    alice's inbox (or any subject not bob's) is refused by the specialist; into his own it works."""
    stolen: list[bytes] = []

    async def keep(msg: Msg) -> None:
        stolen.append(msg.data)

    long = [ChatMessage(role="user", content="mine")]
    with env(TEKTON_SCRIPTED_TOKENS="30", TEKTON_SCRIPTED_TOKENS_PER_S="30"):
        async with (
            in_process_specialists(team.services, "apollo"),
            Bus.connect(team.alice, name="alice") as alice,
            Bus.connect(team.bob, name="bob") as bob,
            bob.stream("apollo", long) as s,
        ):
            await alice.nc.subscribe("_INBOX.alice.stolen", cb=keep)
            await alice.nc.flush()
            await s.wait_started()
            subject = f"tekton.replay.bob.{s.request.id}"
            await bob.nc.publish(subject, b"-1", reply="_INBOX.alice.stolen")
            reply, inbox = await bob.open_inbox()
            await bob.nc.publish(subject, b"-1", reply=reply)
            frames = []
            while (msg := await inbox.get(10)) is not None and msg.data:
                frames.append(unpack_frame(msg.data))
            assert msg is not None and frames[0]["type"] == "start"
            await alice.nc.flush()
    assert stolen == []


@pytest.mark.fast
async def test_alice_can_cancel_her_own_request(team: Team) -> None:
    with env(TEKTON_SCRIPTED_TOKENS="300", TEKTON_SCRIPTED_TOKENS_PER_S="30"):
        async with in_process_specialists(team.services, "apollo") as services:
            long = [ChatMessage(role="user", content="long")]
            async with Bus.connect(team.alice, name="alice") as alice, alice.stream("apollo", long) as s:
                await s.wait_started()
                await s.cancel()
            await eventually(lambda: services["apollo"].counters.cancelled == 1, within=10)


@pytest.mark.fast
async def test_a_revoked_user_is_cut_off(team: Team) -> None:
    closed = anyio.Event()

    async def on_closed() -> None:
        closed.set()

    creds = load_credentials(team.users.user_creds_path("alice"))
    nc = await nats.connect(
        team.server.url,
        nkeys_seed_str=creds.seed,
        inbox_prefix="_INBOX.alice",
        closed_cb=on_closed,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
    )
    try:
        team.users.remove("alice")
        team.server.reload()
        with anyio.fail_after(20):
            await closed.wait()
    finally:
        await nc.close()
    with pytest.raises(NatsUnavailable) as refused:
        await connect(team.server.url, creds=creds)
    assert "refused the credentials of 'alice'" in str(refused.value)
    async with Bus.connect(team.bob, name="bob") as bobs:  # bob is unaffected
        assert bobs.user == "bob"


@pytest.mark.fast
async def test_tekton_users_add_and_rm_reload_the_running_server(team: Team) -> None:
    def tekton_users(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tekton", "users", *args]
        return subprocess.run(argv, env=child_env(team.services), capture_output=True, text=True, timeout=60)

    bob = load_credentials(Path(str(team.bob.creds)))
    done = await anyio.to_thread.run_sync(tekton_users, "rm", "bob")
    assert done.returncode == 0, done.stderr
    assert "removed bob" in done.stdout and "reloaded" in done.stdout
    assert not await anyio.to_thread.run_sync(Path(str(team.bob.creds)).exists)  # his file is gone too

    async def bob_refused() -> bool:
        try:
            nc = await connect(team.server.url, creds=bob)
        except NatsUnavailable:
            return True
        await nc.close()
        return False

    await eventually(bob_refused, within=20)

    added = await anyio.to_thread.run_sync(
        tekton_users, "add", "carol", "--out", str(team.users.dir / "c.creds")
    )
    assert added.returncode == 0 and "added carol (user)" in added.stdout, added.stderr
    carol = team.services.model_copy(update={"creds": team.users.dir / "c.creds"})

    async def carol_in() -> bool:
        try:
            async with Bus.connect(carol, name="carol") as bus:
                return bus.user == "carol"
        except NatsUnavailable:
            return False

    await eventually(carol_in, within=20)

    bad = await anyio.to_thread.run_sync(tekton_users, "add", "Bad Name")
    assert bad.returncode == 2 and "invalid user name" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.fast
def test_listening_beyond_loopback_needs_auth_and_tls(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "store", host="0.0.0.0", port=0)
    with pytest.raises(BusError) as refused:
        server.start()
    assert "refusing to listen on 0.0.0.0 without auth and TLS" in str(refused.value)
    assert server.process is None


@pytest.mark.fast
async def test_tls_is_verified_and_a_wrong_ca_is_refused(tmp_path: Path) -> None:
    good = certs.generate(tmp_path / "good")
    other = certs.generate(tmp_path / "other")
    assert stat.S_IMODE(good.key.stat().st_mode) == 0o600
    server = EmbeddedNats(tmp_path / "store", port=0, tls=good)
    server.start()
    try:
        assert server.url.startswith("tls://")
        settings = TektonSettings(nats_url=server.url, data_dir=tmp_path / "none", tls_ca=good.ca)
        async with Bus.connect(settings, name="test") as bus:
            assert bus.nc.is_connected
        wrong = settings.model_copy(update={"tls_ca": other.ca})
        with pytest.raises(NatsUnavailable) as refused:
            async with Bus.connect(wrong, name="test"):
                pass
        assert "TLS handshake failed" in str(refused.value)
    finally:
        server.stop()


async def _tls_records_of_one_flush(bus: Bus, subject: str) -> list[int]:
    """Publish 50 messages without a pause (nats-py's flusher then takes them all at once) and return
    the size of each TLS record that carried them, once all 50 came back to our subscription."""
    got: list[bytes] = []
    all_there = anyio.Event()

    async def heard(msg: nats.aio.msg.Msg) -> None:
        got.append(msg.data)
        if len(got) == 50:
            all_there.set()

    sub = await bus.nc.subscribe(subject, cb=heard)
    await bus.nc.flush()
    transport = bus.nc._transport
    assert isinstance(transport, TlsSocketTransport)  # not nats-py's (asyncio's TLS): see bus/tls.py
    ssl_object = transport._tls
    assert ssl_object is not None
    records: list[int] = []
    write = ssl_object.write

    def counted(data: bytes) -> int:
        records.append(len(data))
        return int(write(data))

    ssl_object.write = counted
    try:
        for i in range(50):
            await bus.nc.publish(subject, f"{i:02d}".encode())
        await bus.nc.flush()
        with anyio.fail_after(10):
            await all_there.wait()
    finally:
        ssl_object.write = write
        await sub.unsubscribe()
    assert got == [f"{i:02d}".encode() for i in range(50)]
    return records


@pytest.mark.fast
async def test_over_tls_one_flush_of_many_publishes_is_one_tls_record(tmp_path: Path) -> None:
    """asyncio makes a TLS record (an SSL_write) of every piece nats-py hands it, and each publish is a
    piece: ours (bus/tls.py) go out as one record per flush, also after a reconnect (bench/security.py:
    the CPU)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tls = certs.generate(tmp_path / "tls")
    server = EmbeddedNats(tmp_path / "store", port=port, tls=tls)
    server.start()
    try:
        settings = TektonSettings(nats_url=server.url, data_dir=tmp_path / "none", tls_ca=tls.ca)
        one = len(b"PUB records.a 2\r\n00\r\n")
        async with Bus.connect(settings, name="test") as bus:
            records = await _tls_records_of_one_flush(bus, "records.a")
            # The 50 publishes in one record (and the flush's PING in one more); before, 51 records.
            assert len(records) <= 2 and sum(records) >= 50 * one
            server.stop()
            server.start()
            await eventually(lambda: bus.nc.stats["reconnects"] == 1 and bus.nc.is_connected, within=20)
            records = await _tls_records_of_one_flush(bus, "records.a")
            assert len(records) <= 2 and sum(records) >= 50 * one
    finally:
        server.stop()


def test_tekton_up_tls_serves_nats_and_websocket_over_tls(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = TektonSettings(nats_url=f"nats://127.0.0.1:{port}", data_dir=tmp_path / "data")
    argv = [sys.executable, "-m", "tekton", "up", "--tls", "--websocket", "0", "--provider", "scripted"]
    up = spawn([*argv, "--log-level", "warning"], child_env(settings))
    try:
        line = up.wait_for(lambda s: s.startswith("NATS WebSocket on wss://"), timeout=60)
        wss_url = line.split()[3]
        up.wait_for(lambda s: s.startswith("Tekton is up"), timeout=60)
        tls_url = f"tls://127.0.0.1:{port}"
        for url in (tls_url, wss_url):  # aish finds the local user's credentials and tekton's CA
            done = aish(settings.model_copy(update={"nats_url": url}), "athena", "sealed")
            assert done.stdout == "athena heard: sealed\n", done.stderr
        # A plain connection to the TLS port is refused.
        plain = aish(settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"}), "athena", "x")
        assert plain.returncode != 0 and "Traceback" not in plain.stderr
    finally:
        up.stop()


@asynccontextmanager
async def bridge(settings: TektonSettings) -> AsyncIterator[str]:
    """A gateway with its HTTP bridge on a free port, in this event loop; yields the base URL."""
    stop = anyio.Event()
    urls: list[str] = []
    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: serve_gateway(
                settings, stop=stop, task_status=task_status, http=("127.0.0.1", 0), on_http=urls.append
            )
        )
        try:
            yield urls[0]
        finally:
            stop.set()


@pytest.mark.fast
async def test_http_tokens_act_as_their_users_over_https(team: Team, tmp_path: Path) -> None:
    tls = certs.generate(tmp_path / "tls")
    settings = team.services.model_copy(
        update={
            "http_tokens": ["alice=alice-token", "bob=bob-token"],
            "http_tls_cert": tls.cert,
            "http_tls_key": tls.key,
        }
    )
    verify = ssl.create_default_context(cafile=str(tls.ca))
    async with bridge(settings) as url, in_process_specialists(team.services, "apollo"):
        assert url.startswith("https://")
        as_alice = httpx.AsyncClient(
            base_url=url, verify=verify, headers={"Authorization": "Bearer alice-token"}
        )
        as_bob = httpx.AsyncClient(base_url=url, verify=verify, headers={"Authorization": "Bearer bob-token"})
        async with as_alice, as_bob:
            created = await as_alice.post("/api/sessions", json={"name": "web", "specialist": "apollo"})
            assert created.status_code == 200 and created.json()["owner"] == "alice"
            said = await as_alice.post(
                "/api/chat", json={"specialist": "apollo", "message": "mine", "session": "web"}
            )
            assert said.json().get("text") == "apollo heard: mine", said.text
            assert (await as_bob.get("/api/sessions")).json()["sessions"] == []
            assert (await as_bob.get("/api/sessions/web")).status_code == 404
            assert (await as_bob.delete(f"/api/sessions/{created.json()['id']}")).status_code == 404
            assert [s["name"] for s in (await as_alice.get("/api/sessions")).json()["sessions"]] == ["web"]
            # ?token= is for /ws only (a browser's WebSocket cannot send a header).
            async with httpx.AsyncClient(base_url=url, verify=verify) as anonymous:
                assert (await anonymous.get("/api/sessions?token=alice-token")).status_code == 401
                # Guessing tokens: a few tries, then the address is slowed down.
                codes = [(await anonymous.get("/api/sessions")).status_code for _ in range(8)]
                assert 429 in codes and codes[0] == 401
        # An HTTPS client that does not know tekton's CA refuses the bridge.
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(base_url=url) as unverified:
                await unverified.get("/api/sessions")


@pytest.mark.fast
async def test_bulk_runs_as_its_user(team: Team, bob: Raw) -> None:
    assert bob.nc is not None
    async with (
        in_process_gateway(team.services),
        in_process_specialists(team.services, "apollo"),
        Bus.connect(team.alice, name="alice") as alice,
        Bus.connect(team.bob, name="bob") as bobs,
    ):
        await alice.gateway.create("apollo", name="plans")
        # Bob's bulk operation naming alice's session does not find it; alice's own does.
        into_hers = BulkPlan(operations=[BulkOperation(id="a", ai="apollo", message="x", session="plans")])
        async with bobs.bulk(into_hers) as run:
            async for _ in run:
                pass
        assert (await run.result()).operations[0].status == "failed"
        async with alice.bulk(into_hers) as run:
            async for _ in run:
                pass
        assert (await run.result()).status == "ok"
        assert len((await alice.gateway.get("plans")).turns) == 2
        # Discovery and routing work for a user.
        found = await alice.gateway.discover(capability="code-analysis")
        assert [v.name for v in found.specialists] == ["apollo"]
        # Bob cannot stop alice's bulk request by its id under her name.
        await bob.nc.publish("tekton.cancel.alice.some-bulk-id", b"")
        await bob.refused('Permissions Violation for Publish to "tekton.cancel.alice.some-bulk-id"')


@pytest.mark.fast
async def test_a_specialist_may_answer_only_what_it_was_asked(team: Team) -> None:
    rogue = Raw()
    nc = await rogue.connect(team.services.model_copy(update={"creds": team.users.dir / "specialist.creds"}))
    try:
        await nc.publish("_INBOX.alice.abc.1", b"injected")
        await rogue.refused('Permissions Violation for Publish to "_INBOX.alice.abc.1"')
    finally:
        await nc.close()
    async with in_process_specialists(team.services, "apollo"):  # answering a real request is allowed
        assert await ask(team.alice, "apollo", "still fine") == "apollo heard: still fine"


@pytest.mark.fast
def test_tekton_nats_refuses_an_open_listener_in_one_line(tmp_path: Path) -> None:
    settings = TektonSettings(nats_url="nats://0.0.0.0:4999", data_dir=tmp_path / "data")
    argv = [sys.executable, "-m", "tekton", "nats", "--no-auth", "--log-level", "warning"]
    done = subprocess.run(argv, env=child_env(settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("tekton: refusing to listen on 0.0.0.0 without auth and TLS")
    assert done.stderr.count("\n") == 1


@pytest.mark.fast
async def test_a_specialist_with_its_role_asks_for_nothing_its_role_forbids(
    team: Team, tmp_path: Path
) -> None:
    """A specialist signed in as one may not create the runs stream (the gateway does): it does not
    try, so nats-server logs no violation for it at every start."""
    async with in_process_specialists(team.services, "apollo"), Bus.connect(team.alice) as alice:
        assert (await alice.ask("apollo", "hello")).text == "apollo heard: hello"
    log = (tmp_path / "nats.log").read_text()
    assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line]
