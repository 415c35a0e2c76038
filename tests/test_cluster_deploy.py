"""deploy/: what can be checked without a container engine or Kubernetes (neither runs here).

The compose file and manifests parse and have the shape the README promises; every nats-server config
we ship or generate passes the server's own check (``nats-server -t``).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import anyio
import pytest
import yaml

from bus.auth import NotAuthorized, load_credentials
from bus.client import connect
from bus.cluster import free_ports, local_nodes
from bus.errors import NatsUnavailable
from bus.server import nats_server_binary
from bus.settings import TektonSettings
from tekton import certs
from tekton.cluster import check_config

pytestmark = pytest.mark.fast

DEPLOY = Path(__file__).parent.parent / "deploy"


def nats_check(path: Path, **env: str) -> None:
    done = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _secrets(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "tekton",
        "cluster",
        "secrets",
        *extra,
        "--data-dir",
        str(tmp_path / "data"),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_shipped_cluster_config_runs_with_users_route_and_leaf_credentials_and_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/nats/cluster.conf includes what `tekton cluster secrets` writes (nats-server cannot put an
    environment variable inside a route URL): without it a node does not start; with it the node takes
    only verified TLS clients with credentials. One node runs here from the shipped config (its ports
    and store moved to this machine's free ones), its peers being absent."""
    node = tmp_path / "node"
    node.mkdir()
    conf = node / "cluster.conf"
    conf.write_text((DEPLOY / "nats" / "cluster.conf").read_text())
    refused = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SERVER_NAME": "nats-1"},
    )
    assert refused.returncode != 0 and "clients.conf" in refused.stdout + refused.stderr

    out = tmp_path / "secrets"
    made = _secrets(tmp_path, str(out), "nats-1", "nats-2", "nats-3", "--mount", str(out / "nats"))
    assert made.returncode == 0, made.stderr
    (node / "secrets").symlink_to(out / "nats")
    data = tmp_path / "data" / "auth"
    secret = (data / "cluster.secret").read_text().strip()
    routes = (out / "nats" / "routes.conf").read_text()
    assert f'password: "{secret}"' in routes
    assert ", ".join(f'"nats-route://route:{secret}@nats-{i}:6222"' for i in (1, 2, 3)) in routes
    for path in [*out.rglob("*.conf"), *out.rglob("*.creds"), *out.rglob("*key.pem"), *out.rglob("*.env")]:
        # The owner's only; Tekton's containers' files also their group's (the image's user reads so).
        assert path.stat().st_mode & (0o037 if path.parent.name == "tekton" else 0o077) == 0, path
    assert (out / "ca-key.pem").exists() and not list((out / "nats").rglob("ca-key.pem"))
    # The bridge's environment (compose's env_file, Kubernetes' secret): a token and its certificate.
    for line in (out / "http.env").read_text().splitlines():
        monkeypatch.setenv(*line.split("=", 1))
    bridge = TektonSettings()
    assert bridge.http_tokens and len(bridge.http_tokens[0].split("=", 1)[1]) >= 24
    assert bridge.http_tls_cert == Path("/etc/tekton/server.pem")
    nats_check(conf, SERVER_NAME="nats-1")

    client, http, route, leaf = free_ports(4)
    text = conf.read_text()
    for shipped, here in [("4222", client), ("8222", http), ("6222", route), ("7422", leaf)]:
        text = text.replace(f'"0.0.0.0:{shipped}"', f'"127.0.0.1:{here}"')
    conf.write_text(text.replace('"/data/jetstream"', json.dumps(str(tmp_path / "store"))))
    server = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "SERVER_NAME": "nats-1"},
    )
    try:
        anyio.run(_signs_in_only_with_credentials_over_verified_tls, client, out, tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)


async def _signs_in_only_with_credentials_over_verified_tls(port: int, out: Path, tmp_path: Path) -> None:
    url = f"tls://127.0.0.1:{port}"
    with anyio.fail_after(30):
        while True:  # the node starts listening
            try:
                await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                break
            except OSError:
                await anyio.sleep(0.05)
    verified = ssl.create_default_context(cafile=str(out / "tekton" / "ca.pem"))
    creds = load_credentials(out / "tekton" / "specialist.creds")
    nc = await connect(url, name="test", creds=creds, tls=verified)
    await nc.close()
    with pytest.raises(NotAuthorized):
        await connect(url, name="test", tls=verified)
    other = ssl.create_default_context(cafile=str(certs.generate(tmp_path / "other").ca))
    with pytest.raises(NatsUnavailable, match="TLS handshake failed"):
        await connect(url, name="test", creds=creds, tls=other)


def test_tekton_cluster_secrets_takes_host_names_only(tmp_path: Path) -> None:
    bad = _secrets(tmp_path, str(tmp_path / "out"), "nats-route://nats-1:6222")
    assert bad.returncode == 2 and "looks like nats-1" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "a-file").write_text("")
    unwritable = _secrets(tmp_path, str(tmp_path / "a-file"), "nats-1")
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr
    assert unwritable.stderr.startswith("tekton: cannot write") and len(unwritable.stderr.splitlines()) == 1


def test_tekton_cluster_secrets_again_with_another_node_certifies_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _secrets(tmp_path, str(out), "nats-1", "nats-2").returncode == 0
    assert "nats-3" not in certs.names_in(out / "nats" / "tls" / "server.pem")
    assert _secrets(tmp_path, str(out), "nats-1", "nats-2", "nats-3").returncode == 0
    assert {"nats-1", "nats-2", "nats-3", "gateway"} <= set(
        certs.names_in(out / "nats" / "tls" / "server.pem")
    )
    assert (out / "tekton" / "ca.pem").read_text() == (out / "nats" / "tls" / "ca.pem").read_text()


def test_nats_server_check_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check can fail: a config with a typo is refused."""
    bad = tmp_path / "bad.conf"
    bad.write_text((DEPLOY / "nats" / "cluster.conf").read_text().replace("cluster {", "cluster {{", 1))
    with pytest.raises(Exception, match="rejects"):
        check_config(bad)


def test_generated_node_configs_pass_nats_server_check(tmp_path: Path) -> None:
    for node in local_nodes(tmp_path, 3, leaf_ports=[7422, 7423, 7424]):
        out = check_config(node.write())
        assert "is valid" in out


def test_node_configs_with_route_secret_leaf_key_and_tls_pass_nats_server_check(tmp_path: Path) -> None:
    from tekton import certs
    from tekton.cluster import new_leaf_seed, public_key

    tls = certs.generate(tmp_path / "tls")
    seed = new_leaf_seed()
    nodes = local_nodes(tmp_path, 3, leaf_ports=[7422, 7423, 7424], tls=tls, leaf_nkey=public_key(seed))
    for node in nodes:
        text = node.render()
        assert f'"nats-route://route:{node.route_secret}@127.0.0.1:' in text  # peers sign in
        assert "authorization { user:" in text and "authorization { nkey:" in text
        assert text.count("tls {") == 2  # routes and leaf connections
        assert "is valid" in check_config(node.write())
    leaf = local_nodes(tmp_path / "leaf", 1)[0]
    leaf.cluster_port = None
    leaf.leaf_remotes, leaf.leaf_seed, leaf.remote_ca = ["tls://hub:7422"], seed, tls.ca
    assert f'nkey: "{seed}", tls: {{ ca_file:' in leaf.render()
    assert "is valid" in check_config(leaf.write())


def test_a_route_or_leaf_port_off_loopback_without_tls_is_refused(tmp_path: Path) -> None:
    node = local_nodes(tmp_path, 1)[0]
    node.cluster_host = "0.0.0.0"
    with pytest.raises(Exception, match=r"refusing to listen on 0\.0\.0\.0 without TLS"):
        node.server()


def test_tekton_nats_cluster_prints_a_valid_node_config(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tekton", "nats", "--cluster", "0.0.0.0:6222", "--name", "alpha"]
    argv += ["--routes", "nats-route://beta:6222,nats-route://gamma:6222", "--leafnodes", "7422"]
    argv += ["--nats", "nats://0.0.0.0:4222", "--data-dir", str(tmp_path), "--print-config"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'server_name: "alpha"' in done.stdout
    secret = (tmp_path / "auth" / "cluster.secret").read_text().strip()  # made on first use, 0600
    assert (tmp_path / "auth" / "cluster.secret").stat().st_mode & 0o777 == 0o600
    assert f'"nats-route://route:{secret}@beta:6222", "nats-route://route:{secret}@gamma:6222"' in done.stdout
    conf = tmp_path / "alpha.conf"
    conf.write_text(done.stdout)
    check_config(conf)


def test_tekton_nats_routes_without_cluster_is_a_usage_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tekton", "nats", "--routes", "nats-route://x:6222"]
    done = subprocess.run([*argv, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "tekton: --routes needs --cluster HOST:PORT"


def test_compose_file_runs_three_nats_nodes_and_replicated_pieces() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    nodes = [s for s in services if s.startswith("nats-")]
    assert nodes == ["nats-1", "nats-2", "nats-3"]
    for name in nodes:
        assert services[name]["environment"]["SERVER_NAME"] == name
        assert services[name]["command"] == ["-c", "/etc/nats/cluster.conf"]
        assert "./secrets/nats:/etc/nats/secrets:ro" in services[name]["volumes"]
    for name in ("gateway", "apollo", "athena"):
        svc = services[name]
        assert svc["deploy"]["replicas"] >= 2
        env = svc["environment"]
        assert env["TEKTON_NATS_URL"].split(",") == [f"tls://{n}:4222" for n in nodes]
        assert env["TEKTON_TLS_CA"] == "/etc/tekton/ca.pem"
        role = "gateway" if name == "gateway" else "specialist"
        assert env["TEKTON_CREDS"] == f"/etc/tekton/{role}.creds"
        assert "./secrets/tekton:/etc/tekton:ro" in svc["volumes"]
        assert "probe" in svc["healthcheck"]["test"]
        assert svc["stop_grace_period"] == "40s"  # longer than TEKTON_DRAIN_GRACE_S: drains first


def _documents(name: str) -> list[dict]:  # type: ignore[type-arg]
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def test_kubernetes_manifests_have_a_deployment_per_specialist_with_probe_and_drain() -> None:
    roster = tomllib.loads((DEPLOY / "roster.toml").read_text())["specialists"]
    docs = _documents("tekton.yaml") + _documents("specialists.yaml")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert int(config["TEKTON_DRAIN_GRACE_S"]) == 30
    assert [u.split("://")[0] for u in config["TEKTON_NATS_URL"].split(",")] == ["tls"] * 3
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"tekton-gateway", *(f"tekton-{n}" for n in roster)}
    for name, d in deployments.items():
        assert d["apiVersion"] == "apps/v1"
        spec = d["spec"]
        assert spec["replicas"] >= 2
        assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > int(config["TEKTON_DRAIN_GRACE_S"])
        (container,) = pod["containers"]
        assert container["readinessProbe"]["exec"]["command"][:2] == ["tekton", "probe"], name
        assert container["args"][0] in {"gateway", "specialist"}
        # Signed in with its role's credentials, from the secret `tekton cluster secrets` filled.
        assert container["env"] == [
            {"name": "TEKTON_CREDS", "value": f"/etc/tekton/{container['args'][0]}.creds"}
        ]
        assert pod["volumes"][0]["secret"]["secretName"] == "tekton"


def test_helm_values_ask_for_a_three_node_jetstream_cluster_with_leaf_nodes() -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())["config"]
    cluster = values["cluster"]
    assert (cluster["enabled"], cluster["replicas"], cluster["routeURLs"]) == (True, 3, {"user": "route"})
    # TLS everywhere with the certificate `tekton cluster secrets` made, and its users file included.
    for part in (values["nats"], cluster, values["leafnodes"]):
        assert part["tls"] == {
            "enabled": True,
            "secretName": "tekton-nats-tls",
            "cert": "server.pem",
            "key": "server-key.pem",
        }
    assert values["merge"]["$include"] == "./tekton/users.conf"
    # The routes' password is given at install (--set), never kept in the repository.
    assert "routeURLs.password" in (DEPLOY / "k8s" / "nats-values.yaml").read_text()
    assert values["jetstream"]["enabled"] and values["jetstream"]["fileStore"]["pvc"]["enabled"]
    assert values["leafnodes"]["enabled"] and values["leafnodes"]["port"] == 7422
