"""deploy/: what can be checked without a container engine or Kubernetes (neither runs here).

The compose file and manifests parse and have the shape the README promises; every nats-server config
we ship or generate passes the server's own check (``nats-server -t``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bus.cluster import local_nodes
from bus.server import nats_server_binary
from bus.settings import TektonSettings
from tekton.cluster import check_config, cmd_cluster_routes

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


def test_shipped_cluster_config_needs_the_route_credentials_and_then_passes_nats_server_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """nats-server cannot put an environment variable inside a route URL: the shipped config includes
    routes.conf, which `tekton cluster routes` writes with the cluster's secret. Without it the node
    does not start."""
    conf = tmp_path / "cluster.conf"
    conf.write_text((DEPLOY / "nats" / "cluster.conf").read_text())
    refused = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SERVER_NAME": "nats-1"},
    )
    assert refused.returncode != 0 and "routes.conf" in refused.stdout + refused.stderr
    urls = [f"nats-route://nats-{i}:6222" for i in (1, 2, 3)]
    args = argparse.Namespace(urls=urls, cluster_secret=None)
    assert cmd_cluster_routes(TektonSettings(data_dir=tmp_path / "data"), args) == 0
    printed = capsys.readouterr().out
    secret = (tmp_path / "data" / "auth" / "cluster.secret").read_text().strip()
    assert f'password: "{secret}"' in printed
    assert ", ".join(f'"nats-route://route:{secret}@nats-{i}:6222"' for i in (1, 2, 3)) in printed
    (tmp_path / "routes.conf").write_text(printed)
    nats_check(conf, SERVER_NAME="nats-1")
    argv = [sys.executable, "-m", "tekton", "cluster", "routes", "nats-1:6222"]
    bad = subprocess.run(
        [*argv, "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "nats-route://nats-1:6222" in bad.stderr and "Traceback" not in bad.stderr


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
        assert "./nats/routes.conf:/etc/nats/routes.conf:ro" in services[name]["volumes"]
    for name in ("gateway", "apollo", "athena"):
        svc = services[name]
        assert svc["deploy"]["replicas"] >= 2
        url = svc["environment"]["TEKTON_NATS_URL"]
        assert url.split(",") == [f"nats://{n}:4222" for n in nodes]
        assert "probe" in svc["healthcheck"]["test"]
        assert svc["stop_grace_period"] == "40s"  # longer than TEKTON_DRAIN_GRACE_S: drains first


def _documents(name: str) -> list[dict]:  # type: ignore[type-arg]
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def test_kubernetes_manifests_have_a_deployment_per_specialist_with_probe_and_drain() -> None:
    roster = tomllib.loads((DEPLOY / "roster.toml").read_text())["specialists"]
    docs = _documents("tekton.yaml") + _documents("specialists.yaml")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert int(config["TEKTON_DRAIN_GRACE_S"]) == 30
    assert len(config["TEKTON_NATS_URL"].split(",")) == 3
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


def test_helm_values_ask_for_a_three_node_jetstream_cluster_with_leaf_nodes() -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())["config"]
    assert values["cluster"] == {"enabled": True, "replicas": 3, "routeURLs": {"user": "route"}}
    # The routes' password is given at install (--set), never kept in the repository.
    assert "routeURLs.password" in (DEPLOY / "k8s" / "nats-values.yaml").read_text()
    assert values["jetstream"]["enabled"] and values["jetstream"]["fileStore"]["pvc"]["enabled"]
    assert values["leafnodes"]["enabled"] and values["leafnodes"]["port"] == 7422
