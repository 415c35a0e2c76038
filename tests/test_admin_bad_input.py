"""`tekton users`, `tekton nats` and `tekton top` given bad input or no terminal: one line on stderr,
nothing overwritten or left behind, no hang (run as a user runs them)."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import nkeys  # type: ignore[import-untyped]
import pytest

from bus.auth import NotAuthorized, find_credentials
from bus.client import connect
from bus.cluster import free_ports
from bus.errors import BusError, NatsUnavailable
from bus.server import nats_server_binary
from bus.settings import TektonSettings
from tekton.cluster import UsageError, check_config, leaf_seed
from tekton.users import Users
from tests.helpers import child_env, spawn, specialist_process
from tests.test_one_line_errors import one_line, run

TEKTON = [sys.executable, "-m", "tekton"]


def offline(tmp_path: Path) -> TektonSettings:
    return TektonSettings(nats_url="nats://127.0.0.1:9", data_dir=tmp_path / "data")


def listed_users(settings: TektonSettings) -> str:
    return " ".join(Users(settings.data_dir, settings.prefix).load())


@pytest.mark.fast
def test_users_add_out_a_directory_is_one_line_and_leaves_no_secret(tmp_path: Path) -> None:
    settings = offline(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    done = run([*TEKTON, "users", "add", "bob", "--out", str(target)], settings)
    assert done.returncode in (1, 2)
    assert str(target) in one_line(done.stderr) and "directory" in done.stderr
    assert list(target.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name != "data"] == ["out"]  # no out.tmp with bob's seed
    assert "bob" not in listed_users(settings)


@pytest.mark.fast
def test_users_add_never_overwrites_a_file_that_is_not_the_users_credentials(tmp_path: Path) -> None:
    settings = offline(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    done = run([*TEKTON, "users", "add", "bob", "--out", str(notes)], settings)
    assert done.returncode in (1, 2)
    assert str(notes) in one_line(done.stderr)
    assert notes.read_text() == "keep me\n"
    assert "bob" not in listed_users(settings)


@pytest.mark.fast
def test_users_add_writes_through_a_temp_file_of_its_own(tmp_path: Path) -> None:
    """(In this process: `tekton users add` is this call and its one line.)"""
    users = Users(tmp_path / "data", "tekton")
    creds, neighbour = tmp_path / "bob.creds", tmp_path / "bob.tmp"
    neighbour.write_text("someone else's\n")
    users.add("bob", creds_path=creds)
    assert neighbour.read_text() == "someone else's\n"
    assert 'user = "bob"' in creds.read_text() and (creds.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bob.creds", "bob.tmp", "data"]
    # Bob removed and added again: his old (revoked) credentials file is the one thing replaced.
    old = creds.read_text()
    users.remove("bob")
    users.add("bob", creds_path=creds)
    assert creds.read_text() != old and 'user = "bob"' in creds.read_text()


@pytest.mark.fast
@pytest.mark.parametrize(
    "content",
    [
        [1, 2],
        "alice",
        {"alice": 1},
        {"alice": {"role": "user"}},
        {"alice": {"role": "god", "nkey": "UABC"}},
        {"Not A Name": {"role": "user", "nkey": "UABC"}},
    ],
)
def test_a_users_file_of_the_wrong_shape_is_one_line_naming_it(tmp_path: Path, content: object) -> None:
    """Each shape read in this process; `tekton users list` and `add` once, as a user runs them."""
    settings = offline(tmp_path)
    users = settings.data_dir / "auth" / "users.json"
    users.parent.mkdir(parents=True)
    users.write_text(json.dumps(content))
    for call in (lambda u: u.load(), lambda u: u.add("carol")):
        with pytest.raises(BusError) as refused:
            call(Users(settings.data_dir, settings.prefix))
        assert str(users) in str(refused.value) and "\n" not in str(refused.value)
    assert users.read_text() == json.dumps(content)
    assert not (tmp_path / "data" / "auth" / "users" / "carol.creds").exists()


@pytest.mark.fast
def test_tekton_users_with_a_users_file_of_the_wrong_shape_is_one_line(tmp_path: Path) -> None:
    settings = offline(tmp_path)
    users = settings.data_dir / "auth" / "users.json"
    users.parent.mkdir(parents=True)
    users.write_text("[1, 2]")
    done = run([*TEKTON, "users", "list"], settings)
    assert done.returncode in (1, 2) and str(users) in one_line(done.stderr)


@pytest.mark.fast
@pytest.mark.parametrize(
    "key",
    [
        os.urandom(64),
        b"not a seed\n",
        nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT) + b"\n",  # an nkey, not a user's
    ],
    ids=["random-bytes", "text", "account-seed"],
)
def test_a_leaf_key_that_is_no_user_seed_is_one_line_naming_it(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "leaf.nkey"
    path.write_bytes(key)
    with pytest.raises(UsageError) as refused:
        leaf_seed(tmp_path / "data", str(path))
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.fast
def test_tekton_nats_with_a_leaf_key_that_is_no_seed_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "leaf.nkey"
    path.write_bytes(os.urandom(64))
    argv = [*TEKTON, "nats", "--leaf-key", str(path), "--leaf", "nats://127.0.0.1:7422", "--print-config"]
    done = run(argv, offline(tmp_path))
    assert done.returncode == 2
    assert str(path) in one_line(done.stderr)
    assert "seed" not in done.stdout


@pytest.mark.fast
def test_a_cluster_secret_that_is_no_text_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    path.write_bytes(b"\xff\xfe" + os.urandom(30))
    argv = [*TEKTON, "nats", "--cluster", "127.0.0.1:6299", "--cluster-secret", str(path), "--print-config"]
    done = run(argv, offline(tmp_path))
    assert done.returncode == 2
    assert str(path) in one_line(done.stderr)


@contextmanager
def taken_port(tmp_path: Path) -> Iterator[TektonSettings]:
    """Settings whose server port is taken: a server started by mistake fails at once, never runs on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield offline(tmp_path).model_copy(update={"nats_url": f"nats://127.0.0.1:{taken.getsockname()[1]}"})


@pytest.mark.fast
def test_print_config_of_a_single_server_prints_it_and_starts_nothing(tmp_path: Path) -> None:
    with taken_port(tmp_path) as settings:
        done = run([*TEKTON, "nats", "--print-config"], settings)
    assert done.returncode == 0, done.stderr
    assert f'listen: "{settings.nats_url.removeprefix("nats://")}"' in done.stdout
    assert f'store_dir: "{settings.data_dir / "nats"}"' in done.stdout
    config = tmp_path / "printed.conf"
    config.write_text(done.stdout)
    check_config(config)  # nats-server itself accepts it


@pytest.mark.fast
@pytest.mark.anyio
async def test_a_printed_config_runs_a_server_with_the_users_and_tls_tekton_would_give_it(
    tmp_path: Path,
) -> None:
    """What --print-config prints is what `tekton nats` would run: a client without credentials is
    refused, the local user's are taken, over TLS when asked for (before, the users include and the
    client port's TLS were left out: a node started from it took anyone, in clear)."""
    port = free_ports(1)[0]
    settings = offline(tmp_path).model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"})
    done = run([*TEKTON, "nats", "--tls", "--print-config"], settings)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# Generated by Tekton")  # the config alone: notes go to stderr
    config = tmp_path / "printed.conf"
    config.write_text(done.stdout)
    check_config(config)
    server = subprocess.Popen(  # noqa: ASYNC220 (a start, not a wait)
        [nats_server_binary(), "-c", str(config)], stderr=subprocess.DEVNULL
    )
    try:
        url = f"tls://127.0.0.1:{port}"
        verified = ssl.create_default_context(cafile=str(settings.data_dir / "tls" / "ca.pem"))
        creds = find_credentials(None, settings.data_dir, "local")
        assert creds is not None
        with anyio.fail_after(30):
            while True:  # the server starts listening
                try:
                    nc = await connect(url, name="test", creds=creds, tls=verified)
                    break
                except NatsUnavailable:
                    await anyio.sleep(0.1)
        await nc.close()
        with pytest.raises(NotAuthorized):
            await connect(url, name="test", tls=verified)
        with pytest.raises(NatsUnavailable):  # in clear: the port speaks TLS only
            await connect(f"nats://127.0.0.1:{port}", name="test", creds=creds)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.fast
def test_print_config_of_a_single_server_refuses_websocket_in_one_line(tmp_path: Path) -> None:
    with taken_port(tmp_path) as settings:
        done = run([*TEKTON, "nats", "--websocket", "0", "--print-config"], settings)
    assert done.returncode == 2
    assert "--websocket" in one_line(done.stderr) and done.stdout == ""


@pytest.mark.fast
def test_top_into_a_pipe_prints_a_table_each_refresh(settings: TektonSettings) -> None:
    with specialist_process(settings, "apollo"):
        top = spawn([*TEKTON, "top", "--interval", "0.2"], child_env(settings))
        try:
            for _ in range(2):  # two refreshes, each as it comes (nothing appeared until top ended)
                title = top.wait_for(lambda s: s.strip().startswith("tekton top ·"))
                top.seen.remove(title)
                row = top.wait_for(lambda s: s.lstrip("│ ").startswith("apollo"))
                top.seen.remove(row)
                cells = [c.strip() for c in row.strip("│ ").split("│")]
                assert cells[0] == "apollo" and re.fullmatch(r"\d+", cells[5]), row  # a rate, not "-"
                assert "\x1b[" not in row  # no terminal: no escape codes
        finally:
            top.stop()


@pytest.mark.fast
def test_tekton_nats_at_a_url_it_cannot_listen_at_is_a_usage_error(tmp_path: Path) -> None:
    """(It started a server on 127.0.0.1:4222 for any URL it could not read.)"""
    for url in ("garbage", "nats://127.0.0.1:abc"):
        done = run([*TEKTON, "nats", "--nats", url], offline(tmp_path))
        assert done.returncode == 2 and url in one_line(done.stderr), done.stderr
