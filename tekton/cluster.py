"""`tekton cluster up`, `tekton nats --cluster`, `tekton up --leaf`: Tekton's bus past one machine.

nats-server does the clustering (routes), the replication (JetStream R3) and the leaf node links; these
commands only write its config from a few options and run it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import nkeys  # type: ignore[import-untyped]

from bus import argparsing
from bus.auth import creds_dir, default_creds_path
from bus.cluster import LocalCluster, NodeConfig, new_secret, route_lines, split_urls
from bus.errors import BusError
from bus.server import EmbeddedNats, TlsFiles, nats_server_binary, server_config, tls_block
from bus.settings import TektonSettings
from bus.signals import set_on_signal
from tekton import certs
from tekton.users import Users, local_user_name

# A leaf keeps its own JetStream (sessions work offline) under this domain, apart from the hub's.
LEAF_DOMAIN = "leaf"


class UsageError(BusError):
    """A bad combination of options: exit 2."""


# In the data dir's auth/ (0600): the cluster's route secret (every node of one cluster has the same:
# copy it to each machine), and the nkey seed leaf nodes sign in to a hub with (copy it to each laptop).
CLUSTER_SECRET = "cluster.secret"
LEAF_KEY = "leaf.nkey"


def _secret_file(path: Path, what: str, make: Callable[[], str], create: bool = True) -> str | None:
    """The secret kept in ``path``, made (0600) on first use when ``create``; else None if absent."""
    if path.exists():
        return _read_secret(path, what, BusError)
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _read_secret(path: Path, what: str, error: type[BusError] = UsageError) -> str:
    """A secret file's text, or ``error`` naming the file: one given on the command line is a usage
    error, a broken one in the data dir is not."""
    try:
        return path.read_text().strip()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise error(f"cannot read {what} {path}: it is not text") from None


def new_leaf_seed() -> str:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


def route_secret(data_dir: Path, path: str | None = None) -> str:
    """The cluster's route secret: from ``path`` when given (it must exist), else the data dir's."""
    if path is not None:
        return _read_secret(Path(path).expanduser(), "the cluster secret")
    found = _secret_file(creds_dir(data_dir) / CLUSTER_SECRET, "the cluster secret", new_secret)
    assert found is not None
    return found


def leaf_seed(data_dir: Path, path: str | None = None, create: bool = False) -> str | None:
    """The leaf nkey seed: from ``path`` when given (it must exist), else the data dir's (made when
    ``create``: a hub makes it; a leaf only reads the copy it was given)."""
    if path is not None:
        file = Path(path).expanduser()
        seed: str | None = _read_secret(file, "the leaf key")
    else:
        file = creds_dir(data_dir) / LEAF_KEY
        seed = _secret_file(file, "the leaf key", new_leaf_seed, create)
    if seed is not None and not _is_user_seed(seed):
        error = UsageError if path is not None else BusError
        raise error(f"the leaf key {file} is not an nkey user seed (SU...)")
    return seed


def _is_user_seed(seed: str) -> bool:
    try:
        nkeys.from_seed(bytearray(seed.encode()))
    except Exception:  # nkeys raises several kinds for a malformed seed
        return False
    return seed.startswith("SU")


def public_key(seed: str) -> str:
    if not _is_user_seed(seed):
        raise UsageError("the leaf key is not an nkey user seed (SU...)")
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


def secure(
    config: NodeConfig,
    settings: TektonSettings,
    args: argparse.Namespace,
    auth_file: Path | None,
    tls: TlsFiles | None,
) -> NodeConfig:
    """Credentials (and TLS) on the node's routes and leaf connections; users on its client port."""
    config.auth_file, config.tls = auth_file, tls
    if config.cluster_port is not None:
        config.route_secret = route_secret(settings.data_dir, getattr(args, "cluster_secret", None))
    key = getattr(args, "leaf_key", None)
    if config.leaf_port is not None:
        seed = leaf_seed(settings.data_dir, key, create=True)
        assert seed is not None
        config.leaf_nkey = public_key(seed)
    if config.leaf_remotes:
        config.leaf_seed = leaf_seed(settings.data_dir, key)
    return config


def _say(text: str) -> None:
    print(text, flush=True)


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host:
        host, port = value, str(default_port)
    try:
        return host, int(port)
    except ValueError:
        raise UsageError(f"not HOST:PORT: {value!r}") from None


def add_cluster_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    cluster = sub.add_parser("cluster", help="run a local N-node NATS cluster (development and tests)")
    actions = cluster.add_subparsers(dest="cluster_cmd", required=True)
    up = actions.add_parser("up", parents=[common], help="start N nats-servers routed into one cluster")
    up.add_argument("--nodes", type=argparsing.at_least(1), default=3, help="how many nodes (default 3)")
    up.add_argument(
        "--port", type=argparsing.port, default=4222, help="client port of the first node (then +1, +2...)"
    )
    up.add_argument("--cluster-port", type=argparsing.port, default=6222, help="route port of the first node")
    up.add_argument(
        "--leafnodes",
        type=argparsing.port,
        metavar="PORT",
        help="accept leaf nodes on PORT (then +1...): be a hub",
    )
    up.add_argument("--tls", action="store_true", help="TLS for clients, routes and leaf nodes (own CA)")
    up.add_argument(
        "--no-auth", action="store_true", help="no users on the client ports (routes keep their secret)"
    )
    made = actions.add_parser(
        "secrets",
        parents=[common],
        help="write what deploy/compose.yaml's nodes and services mount: users, route and leaf "
        "credentials, TLS (see docs/security.md)",
    )
    made.add_argument("dir", metavar="DIR", help="where to write them (deploy/secrets for the compose file)")
    made.add_argument("hosts", nargs="+", metavar="HOST", help="every node's host name (nats-1 ...)")
    made.add_argument(
        "--route-port", type=argparsing.port, default=6222, help="the nodes' route port (default 6222)"
    )
    made.add_argument(
        "--mount",
        default="/etc/nats/secrets",
        help="where the nodes see DIR/nats (default /etc/nats/secrets, next to cluster.conf)",
    )
    made.add_argument(
        "--cluster-secret",
        metavar="FILE",
        help=f"the route secret (default: the data dir's auth/{CLUSTER_SECRET}, made on first use)",
    )


def add_nats_cluster_options(nats_cmd: argparse.ArgumentParser) -> None:
    nats_cmd.add_argument(
        "--cluster", metavar="HOST:PORT", help="join a cluster: listen for routes here (e.g. 0.0.0.0:6222)"
    )
    nats_cmd.add_argument(
        "--routes", default="", help="peers' route URLs, comma-separated (nats-route://host:6222,...)"
    )
    nats_cmd.add_argument("--name", help="this node's server name (default: the host name); unique")
    nats_cmd.add_argument("--cluster-name", default="tekton", help="the cluster's name (same on every node)")
    nats_cmd.add_argument(
        "--leafnodes", type=argparsing.port, metavar="PORT", help="accept leaf nodes on PORT (a hub)"
    )
    nats_cmd.add_argument("--leaf", metavar="URL", help="join a hub as a leaf node (nats://hub:7422)")
    nats_cmd.add_argument(
        "--cluster-secret",
        metavar="FILE",
        help=f"the cluster's route secret (default: the data dir's auth/{CLUSTER_SECRET}, made on first use;"
        " every node needs the same)",
    )
    nats_cmd.add_argument(
        "--leaf-key",
        metavar="FILE",
        help=f"the nkey seed leaf nodes sign in with (default: the data dir's auth/{LEAF_KEY}; hubs make it)",
    )
    nats_cmd.add_argument(
        "--print-config", action="store_true", help="print the generated nats-server config and exit"
    )


def node_config(settings: TektonSettings, args: argparse.Namespace) -> NodeConfig | None:
    """The config ``tekton nats`` options ask for, or None for a plain single server (unless it is
    only to be printed: then the single server's, with the listen address and store it would use)."""
    single = not (args.cluster or args.leafnodes is not None or args.leaf)
    if single and args.routes:
        raise UsageError("--routes needs --cluster HOST:PORT")
    if single and not args.print_config:
        return None
    if getattr(args, "websocket", None) is not None:
        raise UsageError(
            "--print-config prints no --websocket block (tekton adds it when it starts the server)"
            if single
            else "--websocket is for a single server; put it in the node's config"
        )
    url = split_urls(settings.nats_url)[0]
    host, port = _host_port(url.split("://", 1)[-1], 4222)
    name = args.name or ("tekton" if single else socket.gethostname())
    config = NodeConfig(
        name=name,
        store_dir=settings.data_dir / "nats" if single else settings.data_dir / "nats" / name,
        host=host,
        port=port,
        cluster_name=args.cluster_name,
        leaf_port=args.leafnodes,
        leaf_remotes=[_leaf_url(u) for u in split_urls(args.leaf)] if args.leaf else [],
        js_domain=LEAF_DOMAIN if args.leaf else None,
    )
    if args.cluster:
        config.cluster_host, config.cluster_port = _host_port(args.cluster, 6222)
        config.routes = split_urls(args.routes) if args.routes else []
    return config


def _leaf_url(url: str) -> str:
    """A hub's leaf node URL: ``nats://hub:7422`` and ``nats-leaf://hub:7422`` both work for the server."""
    if "://" not in url:
        raise UsageError(f"a leaf node URL looks like nats://hub:7422, not {url!r}")
    return url


async def cmd_nats_node(settings: TektonSettings, args: argparse.Namespace, config: NodeConfig) -> int:
    if args.print_config:  # what server() would run: the node's config, its client port's TLS, its users
        base, tls = config.render(), config.tls
        _say(server_config(config_dir=None, base=base, auth_file=config.auth_file, tls=tls).rstrip())
        return 0
    server = config.server(log_file=settings.data_dir / f"nats-{config.name}.log")
    await anyio.to_thread.run_sync(server.start)
    try:
        role = f"node {config.name} of cluster {config.cluster_name}" if config.cluster_port else config.name
        if config.leaf_remotes:
            role += f", leaf of {', '.join(config.leaf_remotes)}"
        if config.leaf_port is not None:
            role += f", hub for leaf nodes on port {config.leaf_port}"
        _say(f"ready nats-server {role} on {server.url} (JetStream store {server.store_dir}); Ctrl-C to stop")
        await set_on_signal(anyio.Event())
    finally:
        server.stop()
    return 0


def cmd_cluster_secrets(settings: TektonSettings, args: argparse.Namespace) -> int:
    """What a shipped cluster config (deploy/nats/cluster.conf, deploy/compose.yaml) needs to be as
    secure as one ``tekton`` runs itself, written to ``args.dir`` (kept out of the repository):

    - ``nats/``, mounted at ``args.mount`` in each node: ``clients.conf`` (``users.conf``, the users
      file of this data dir as ``tekton up`` writes it, and TLS on the client port), ``routes.conf``
      (the peers' route URLs carrying the cluster's secret, the routes' authorization and TLS:
      nats-server cannot put an environment variable inside a route URL), ``leaf.conf`` (leaf nodes
      only with the leaf key, TLS) and ``tls/`` (a CA and a certificate for every node's host name);
    - ``tekton/``, mounted in the gateway's and the specialists' containers: the CA they verify the
      nodes with, their credentials and the bridge's certificate, readable by the group (the image's
      user reads them through it: ``chgrp -R 10001``);
    - ``http.env`` (the bridge's API token, read by compose on the host) and ``ca-key.pem``, mounted
      nowhere.

    Run again (a user added, a node renamed), it rewrites what changed: a certificate is made anew
    when the host names differ from the ones it has.
    """
    try:
        return _write_secrets(settings, args)
    except OSError as err:
        raise UsageError(f"cannot write {err.filename or args.dir}: {err.strerror or err}") from None


def _write_secrets(settings: TektonSettings, args: argparse.Namespace) -> int:
    hosts = list(args.hosts)
    for host in hosts:
        if not host or any(c in host for c in ":/@ ,"):
            raise UsageError(f"a node's host name looks like nats-1, not {host!r}")
    out = Path(args.dir).expanduser()
    nats_dir, tekton_dir = out / "nats", out / "tekton"
    for d in (out, nats_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    tekton_dir.mkdir(exist_ok=True, mode=0o750)
    users = Users(settings.data_dir, settings.prefix)
    users.ensure_local()
    secret = route_secret(settings.data_dir, args.cluster_secret)
    seed = leaf_seed(settings.data_dir, create=True)
    assert seed is not None
    names = [*hosts, "gateway"]
    made = certs.ensure(nats_dir / "tls", names)
    if set(certs.server_names(names)) != set(certs.names_in(made.cert)):
        made = certs.generate(nats_dir / "tls", names)  # other hosts: a new CA and certificate
    if made.key.with_name("ca-key.pem").exists():  # the CA's key goes where no container mounts it
        made.key.with_name("ca-key.pem").replace(out / "ca-key.pem")
    mount = args.mount.rstrip("/")
    inside = TlsFiles(*(Path(f"{mount}/tls/{name}.pem") for name in ("server", "server-key", "ca")))
    header = "# Written by `tekton cluster secrets`; keep it private, never in the repository.\n"
    _private(nats_dir / "users.conf", header + users.write_auth_file().read_text())
    _private(nats_dir / "clients.conf", header + 'include "users.conf"\n' + tls_block(inside))
    routes = [f"nats-route://{host}:{args.route_port}" for host in hosts]
    route_conf = "\n".join(route_lines(routes, secret)) + "\n"
    _private(nats_dir / "routes.conf", header + route_conf + tls_block(inside))
    leaf_auth = f"authorization {{ nkey: {json.dumps(public_key(seed))}, timeout: 5 }}\n"
    _private(nats_dir / "leaf.conf", header + tls_block(inside) + leaf_auth)
    _private(tekton_dir / "ca.pem", made.ca.read_text(), GROUP_READ)
    for role in ("gateway", "specialist"):
        creds = default_creds_path(settings.data_dir, role).read_text()
        _private(tekton_dir / f"{role}.creds", creds, GROUP_READ)
    # The bridge listens off loopback: it needs an API token and TLS (the nodes' certificate names
    # "gateway" too). The token's user is this data dir's admin; add others with NAME=TOKEN.
    http = out / "http.env"
    if not http.exists():
        _private(
            http,
            f"TEKTON_HTTP_TOKENS={json.dumps([f'{local_user_name()}={secrets.token_urlsafe(24)}'])}\n"
            "TEKTON_HTTP_TLS_CERT=/etc/tekton/server.pem\nTEKTON_HTTP_TLS_KEY=/etc/tekton/server-key.pem\n",
        )
    _private(tekton_dir / "server.pem", made.cert.read_text(), GROUP_READ)
    _private(tekton_dir / "server-key.pem", made.key.read_text(), GROUP_READ)
    _say(f"wrote the cluster's secrets to {out}: the nodes mount {nats_dir} at {mount}")
    return 0


# Tekton's containers read their files through the group (the image's user is not the host's).
GROUP_READ = 0o640


def _private(path: Path, text: str, mode: int = 0o600) -> None:
    """``text`` in ``path``, readable by its owner only (or ``mode``) from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a file left there keeps its mode; a link there is not followed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)  # whatever the umask made of it
        f.write(text)
    tmp.replace(path)


async def cmd_cluster(
    settings: TektonSettings, args: argparse.Namespace, auth_file: Path | None, tls: TlsFiles | None
) -> int:
    """``auth_file``: the users file every node includes (the same users as ``tekton up``'s, from the
    same data dir); ``tls``: the certificate for clients, routes and leaf connections."""
    if args.nodes < 1 or args.nodes > 9:
        raise UsageError(f"--nodes takes 1 to 9, not {args.nodes}")
    host = "127.0.0.1"
    n = args.nodes
    leaf = leaf_seed(settings.data_dir, create=True) if args.leafnodes is not None else None
    cluster = LocalCluster(
        settings.data_dir / "cluster",
        n,
        probe=settings if auth_file is not None else None,
        host=host,
        ports=[args.port + i for i in range(n)],
        cluster_ports=[args.cluster_port + i for i in range(n)],
        leaf_ports=[args.leafnodes + i for i in range(n)] if args.leafnodes is not None else None,
        route_secret=route_secret(settings.data_dir),
        auth_file=auth_file,
        tls=tls,
        leaf_nkey=public_key(leaf) if leaf else None,
    )
    await anyio.to_thread.run_sync(cluster.start)
    try:
        _say(f"ready cluster of {n} nodes: {cluster.url}")
        _say(f"stores and logs under {cluster.data_dir}")
        secured = "users from" if auth_file else "NO users (--no-auth);"
        _say(
            f"routes need the secret in {creds_dir(settings.data_dir) / CLUSTER_SECRET}; {secured} "
            f"{creds_dir(settings.data_dir) if auth_file else 'anyone on this machine owns the bus'}"
        )
        if leaf:
            _say(
                f"leaf nodes sign in with {creds_dir(settings.data_dir) / LEAF_KEY} (copy it to each laptop)"
            )
        _say(f"next: tekton up --nats {cluster.url}   (or TEKTON_NATS_URL={cluster.url})")
        await set_on_signal(anyio.Event())
    finally:
        cluster.stop()
    return 0


async def start_leaf(
    settings: TektonSettings, stack: AsyncExitStack, hub: str, say: Callable[[str], None] | None = None
) -> str:
    """A local nats-server that joins ``hub`` as a leaf node (it runs, and serves locally, while the hub
    is unreachable), for ``tekton up --leaf``. Returns its client URL."""
    url = split_urls(settings.nats_url)[0]
    host, port = _host_port(url.split("://", 1)[-1], 4222)
    config = NodeConfig(
        name=f"leaf-{socket.gethostname()}",
        store_dir=settings.data_dir / "nats-leaf",
        host=host,
        port=port,
        leaf_remotes=[_leaf_url(u) for u in split_urls(hub)],
        js_domain=LEAF_DOMAIN,
        # The hub's leaf key, if this laptop was given a copy (a hub made by tekton asks for it).
        leaf_seed=leaf_seed(settings.data_dir),
        remote_ca=settings.tls_ca,  # a hub on tls://: verified with this CA (else the system's)
    )
    server: EmbeddedNats = config.server(log_file=settings.data_dir / "nats-leaf.log")
    await anyio.to_thread.run_sync(server.start)
    stack.callback(server.stop)
    (say or _say)(f"nats-server listening on {server.url}, a leaf node of {hub} (works offline too)")
    if config.leaf_seed is None:
        key = creds_dir(settings.data_dir) / LEAF_KEY
        (say or _say)(f"no leaf key at {key}: a hub made by tekton refuses this leaf (copy the hub's there)")
    return server.url


def check_config(path: Path) -> str:
    """``nats-server -t``: the server's own parse of a config; returns its output, raises when invalid."""
    import subprocess

    done = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise BusError(f"nats-server rejects {path}: {output}")
    return output


def write_ready(settings: TektonSettings, instances: list[tuple[str, str]]) -> None:
    """Note this process's micro service instances (name, id) in ``TEKTON_READY_FILE`` for the probe."""
    if settings.ready_file is None:
        return
    with settings.ready_file.open("w") as f:  # a restarted process replaces its old instances
        f.writelines(f"{name} {instance}\n" for name, instance in instances)


def add_probe_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    probe = sub.add_parser(
        "probe", parents=[common], help="readiness: this process's services answer $SRV.PING (exit 0/1)"
    )
    probe.add_argument(
        "--ready-file", help="the file the specialist/gateway wrote (default $TEKTON_READY_FILE)"
    )
    probe.add_argument("--timeout", type=argparsing.seconds, default=2.0)


async def cmd_probe(settings: TektonSettings, args: argparse.Namespace) -> int:
    """Ready when every instance this pod started answers ``$SRV.PING.<name>.<id>`` over the bus: the
    process is up, connected, and its micro service is serving (what a Kubernetes readiness probe wants)."""
    from bus.client import connect

    path = Path(args.ready_file) if args.ready_file else settings.ready_file
    if path is None:
        raise UsageError("--ready-file (or TEKTON_READY_FILE) is needed")
    try:
        entries = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except OSError as err:
        _say(f"not ready: {path}: {err.strerror}")
        return 1
    if not entries:
        _say(f"not ready: no instance in {path} yet")
        return 1
    nc = await connect(settings.nats_url, name="tekton-probe", connect_timeout=args.timeout)
    try:
        for name, instance in entries:
            try:
                await nc.request(f"$SRV.PING.{name}.{instance}", b"", timeout=args.timeout)
            except Exception as err:
                _say(f"not ready: {name} {instance} does not answer ({type(err).__name__})")
                return 1
    finally:
        await nc.close()
    _say(f"ready: {', '.join(f'{n} {i}' for n, i in entries)}")
    return 0
