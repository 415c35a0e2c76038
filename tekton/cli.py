"""`tekton`: run Tekton's pieces.

tekton up [-- CMD ...]        nats-server (embedded, or the one already at --nats) + every specialist
tekton specialist NAME ...    one or more specialists against any NATS URL (scale-out)
tekton gateway                a gateway replica (sessions in JetStream KV)
tekton nats                   just the embedded nats-server (--cluster: one node of a cluster)
tekton cluster up             a local N-node NATS cluster (development and tests)
tekton status                 running specialists, replicas and live stats
tekton top                    live view of every specialist instance (slots, queue, tok/s, p99)
tekton metrics                the whole bus's figures once, in Prometheus text format
tekton mcp                    an MCP server on stdio: each running specialist as a tool
tekton a2a                    every running specialist as an A2A agent over HTTP
tekton users add|rm|list      identities on the bus (nats-server users with nkeys and permissions)
tekton models                 the models each provider offers (for -m PROVIDER:MODEL)
tekton logs [-f]              what `tekton up` logged (it writes to a file, not to the terminal)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlparse

import anyio

from bridge.listen import HTTP_KEEP_ALIVE_S, http_socket
from bus import argparsing, tracing
from bus.auth import ROLES
from bus.client import Bus, connect_as
from bus.errors import BusError, GatewayUnavailable, NatsUnavailable
from bus.logs import configure_logging
from bus.server import EmbeddedNats, TlsFiles
from bus.settings import TektonSettings, config_file, load_settings
from bus.signals import die_with_parent, set_on_signal
from bus.subjects import ALL_USERS
from tekton import certs
from tekton.cluster import (
    UsageError,
    add_cluster_parser,
    add_nats_cluster_options,
    add_probe_parser,
    cmd_cluster,
    cmd_cluster_secrets,
    cmd_nats_node,
    cmd_probe,
    node_config,
    secure,
    start_leaf,
    write_ready,
)
from tekton.supervisor import run_child
from tekton.users import Users

if TYPE_CHECKING:
    from specialists.service import SpecialistService

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def _tell(text: str) -> None:
    """A note beside a command's output (on stderr)."""
    print(f"tekton: {text}", file=sys.stderr, flush=True)


def _say(text: str) -> None:
    print(text, flush=True)


def secured_server(
    settings: TektonSettings,
    args: argparse.Namespace,
    *,
    websocket_port: int | None = None,
    log_file: Path | None = None,
) -> EmbeddedNats:
    """The embedded server for ``settings.nats_url``, with auth (users made on first run) unless
    --no-auth, and TLS with --tls (tekton's own CA, or the files given)."""
    url = urlparse(settings.nats_url)
    try:
        port = url.port or 4222
    except ValueError:  # nats://host:abc
        port = -1
    if url.scheme not in ("nats", "tls") or not url.hostname or port < 0 or "," in settings.nats_url:
        # (it started a server on 127.0.0.1:4222 for any URL it could not read)
        raise UsageError(f"a server listens at one nats://HOST:PORT (or tls://), not {settings.nats_url!r}")
    return EmbeddedNats(
        settings.data_dir / "nats",
        host=url.hostname,
        port=port,
        auth_file=users_file(settings, args),
        tls=server_tls(settings, args),
        log_file=log_file,
        websocket_port=websocket_port,
        allowed_origins=settings.ws_allowed_origins,
    )


def users_file(
    settings: TektonSettings, args: argparse.Namespace, tell: Callable[[str], None] = _say
) -> Path | None:
    """The users file a server includes (users made on first run), None with --no-auth."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if getattr(args, "no_auth", False):
        return None
    users = Users(settings.data_dir, settings.prefix)
    if users.ensure_local():
        tell(f"created credentials for the local user and tekton's services in {users.dir}")
    return users.write_auth_file()  # permissions follow this version's subjects


def server_tls(settings: TektonSettings, args: argparse.Namespace) -> TlsFiles | None:
    if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
        if not (args.tls_cert and args.tls_key and settings.tls_ca):
            raise UsageError("--tls-cert needs --tls-key and --tls-ca (the CA clients verify it with)")
        return TlsFiles(cert=Path(args.tls_cert), key=Path(args.tls_key), ca=settings.tls_ca)
    if not getattr(args, "tls", False):
        return None
    url = urlparse(settings.nats_url)
    return certs.ensure(settings.data_dir / "tls", [url.hostname] if url.hostname else None)


def _http_tls(settings: TektonSettings, args: argparse.Namespace) -> dict[str, Path]:
    """With --tls the HTTP bridge serves https with the server's certificate."""
    tls = server_tls(settings, args)
    return {"http_tls_cert": tls.cert, "http_tls_key": tls.key} if tls else {}


async def ensure_nats(
    settings: TektonSettings,
    stack: AsyncExitStack,
    websocket: int | None = None,
    args: argparse.Namespace | None = None,
    leaf: str | None = None,
    say: Callable[[str], None] = _say,
) -> str:
    """The URL of a running nats-server: the one already at ``settings.nats_url``, else an embedded one
    (with a WebSocket listener on port ``websocket`` when given; a leaf node of hub ``leaf`` if given)."""
    try:
        nc = await connect_as(settings, name="tekton-probe")
    except NatsUnavailable:
        pass
    else:
        await nc.close()
        say(f"using the nats-server already running at {settings.nats_url}")
        if websocket is not None or leaf is not None:
            say("(its own config decides whether it listens for WebSocket clients or joins a hub)")
        return settings.nats_url
    if "," in settings.nats_url:
        raise NatsUnavailable(settings.nats_url, "no node of that cluster answers (tekton cluster up?)")
    url = urlparse(settings.nats_url)
    if url.scheme not in ("nats", "tls") or (url.hostname or "") not in LOCAL_HOSTS:
        raise NatsUnavailable(
            settings.nats_url, "and it is not a local nats:// URL where one could be started"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if leaf is not None:
        return await start_leaf(settings, stack, leaf, say)
    server = secured_server(
        settings,
        args or argparse.Namespace(),
        log_file=settings.data_dir / "nats-server.log",
        websocket_port=websocket,
    )
    await anyio.to_thread.run_sync(server.start)
    stack.callback(server.stop)
    say(f"nats-server listening on {server.url} (JetStream store {server.store_dir})")
    if server.ws_port:
        say(f"NATS WebSocket on {server.ws_url} (aish --nats {server.ws_url})")
    return server.url


def _child_argv(
    names: Sequence[str], settings: TektonSettings, http: tuple[str, int] | None = None
) -> list[str]:
    common = ["--nats", settings.nats_url, "--data-dir", str(settings.data_dir)]
    common += ["--creds", str(settings.creds)] if settings.creds else []
    common += ["--tls-ca", str(settings.tls_ca)] if settings.tls_ca else []
    if list(names) == ["gateway"]:
        argv = [sys.executable, "-m", "tekton", "gateway", *common]
        if http is not None:
            argv += ["--http", str(http[1]), "--http-host", http[0]]
        return argv
    argv = [sys.executable, "-m", "tekton", "specialist", *names, *common]
    if settings.provider:
        argv += ["--provider", settings.provider]
    if settings.model:
        argv += ["--model", settings.model]
    return argv


async def _start_children(
    tg: anyio.abc.TaskGroup,
    groups: Sequence[tuple[str, Sequence[str]]],
    settings: TektonSettings,
    http: tuple[str, int] | None = None,
    local_processes: int = 0,
) -> None:
    # The HTTP bridge's certificate (--tls) reaches a gateway child through its environment.
    tls = {"TEKTON_HTTP_TLS_CERT": settings.http_tls_cert, "TEKTON_HTTP_TLS_KEY": settings.http_tls_key}
    env = {k: str(v) for k, v in tls.items() if v}
    if local_processes > 1 and "TEKTON_LOCAL_PROCESSES" not in os.environ:
        # Each local model takes its share of the cores (specialists/providers/local.py).
        env["TEKTON_LOCAL_PROCESSES"] = str(local_processes)
    child = functools.partial(run_child, env=env)
    async with anyio.create_task_group() as starting:
        for label, names in groups:
            starting.start_soon(tg.start, child, _child_argv(names, settings, http), label)


def log_path(settings: TektonSettings) -> Path:
    return settings.data_dir / "tekton.log"


def _log_to_file(path: Path) -> tuple[TextIO, TextIO]:
    """Send this process's stdout and stderr (and so its children's) to ``path``; returns streams to
    where they went before. Keeps the REPL that `tekton up -- aish` runs free of log lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return terminal


async def cmd_up(settings: TektonSettings, args: argparse.Namespace) -> int:
    from specialists.roster import load_roster

    roster = load_roster(settings.roster, settings.provider)
    terminal = _log_to_file(log_path(settings))
    try:
        return await _up(settings, args, roster, terminal)
    except (BusError, BaseExceptionGroup) as err:  # the log has it too (main prints it there)
        # ...and the person must see it: one line (a piece that failed to start fails a task group).
        first = _first_bus_error(err) if isinstance(err, BaseExceptionGroup) else err
        if first is not None:
            print(f"tekton: {first} (log: {log_path(settings)})", file=terminal[1], flush=True)
        raise


async def _up(
    settings: TektonSettings,
    args: argparse.Namespace,
    roster: dict[str, Any],
    terminal: tuple[TextIO, TextIO],
) -> int:
    # Here, not at the top: the commands that serve nothing start without the servers' imports
    # (fastapi, the MCP and A2A SDKs, the providers): `tekton status` in 1.3 s, not 3.0 s.
    from gateway.runtime import serve_gateway
    from specialists.runtime import local_model_processes, serve_specialists

    _say(f"--- tekton up, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}")

    def tell(text: str) -> None:
        """A line for the person at the terminal too (without a command attached: with one, it owns
        the terminal and gets a clean screen)."""
        _say(text)
        if not args.command:
            print(text, file=terminal[0], flush=True)

    async with AsyncExitStack() as stack:
        url = await ensure_nats(settings, stack, args.websocket, args, args.leaf, say=tell)
        settings = settings.model_copy(update={"nats_url": url, **_http_tls(settings, args)})
        stop = anyio.Event()
        exit_code = 0
        http = (args.http_host, args.http) if args.http is not None else None
        async with anyio.create_task_group() as tg:
            if args.processes:
                groups = [("gateway", ["gateway"]), *((name, [name]) for name in roster)]
                await _start_children(
                    tg, groups, settings, http, local_model_processes(settings, list(roster))
                )
            else:
                async with anyio.create_task_group() as starting:
                    starting.start_soon(
                        tg.start,
                        lambda task_status: serve_gateway(
                            settings,
                            stop=stop,
                            task_status=task_status,
                            http=http,
                            on_http=lambda url: tell(_http_line(url)),
                        ),
                    )
                    starting.start_soon(
                        tg.start,
                        lambda task_status: serve_specialists(settings, stop=stop, task_status=task_status),
                    )
            if args.metrics is not None:
                await _serve_metrics(tg, stack, settings, args.metrics, args.http_host, stop, tell)
            if not args.processes:
                _settle_heap()
            names = ", ".join(roster)
            tell(f"Tekton is up: gateway + {len(roster)} specialists ({names}) on {settings.nats_url}")
            if args.command:
                exit_code = await _run_attached(args.command, settings, terminal)
            else:
                tell(f"logs in {log_path(settings)} (tekton logs -f); Ctrl-C to stop")
                await set_on_signal(stop)
            stop.set()
            if args.processes:
                tg.cancel_scope.cancel()
    tell("Tekton stopped")
    return exit_code


async def _serve_metrics(
    tg: anyio.abc.TaskGroup,
    stack: AsyncExitStack,
    settings: TektonSettings,
    port: int,
    host: str,
    stop: anyio.Event,
    tell: Callable[[str], None],
) -> None:
    from bridge.metrics import BusFigures, MetricsListener

    bus = await stack.enter_async_context(Bus.connect(settings, name="tekton-metrics"))
    figures = BusFigures()
    listener = MetricsListener(figures, port, host)
    stack.callback(listener.close)

    async def refresh_until_stopped() -> None:
        async with anyio.create_task_group() as refreshing:
            refreshing.start_soon(figures.run, bus)
            await stop.wait()
            refreshing.cancel_scope.cancel()

    tg.start_soon(refresh_until_stopped)
    tell(f"metrics of the whole bus on {listener.url}")


async def cmd_top(settings: TektonSettings, args: argparse.Namespace) -> int:
    from tekton.top import run_top, top_console

    async with Bus.connect(settings, name="tekton-top") as bus:
        await run_top(
            bus,
            top_console(),
            interval=args.interval,
            iterations=args.iterations,
            p99_window_s=args.p99_window,
        )
    return 0


async def cmd_metrics(settings: TektonSettings, args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, generate_latest

    from bridge.metrics import BusCollector, BusFigures

    figures = BusFigures()
    async with Bus.connect(settings, name="tekton-metrics") as bus:
        await figures.refresh(bus, window=args.window)
    registry = CollectorRegistry()
    registry.register(BusCollector(figures))
    sys.stdout.write(generate_latest(registry).decode())
    return 0


async def cmd_usage(settings: TektonSettings, args: argparse.Namespace) -> int:
    """`tekton usage`: every user's totals; `tekton usage reset USER`: forget USER's, so their budget
    starts again. Both ask the gateway as the ``_all`` user, which nats-server lets only admins be."""
    async with Bus.connect(settings, name="tekton-usage") as bus:
        book = Bus(bus.nc, settings, acting_for=ALL_USERS).gateway
        try:
            reply = await book.usage(reset=args.user if args.usage_cmd == "reset" else None)
        except GatewayUnavailable as err:
            raise BusError(
                f"{err.message} (every user's usage is an admin's: use an admin's credentials)"
            ) from err
    if args.usage_cmd == "reset":
        _say(
            f"reset {args.user}'s usage ({reply.removed} total{'' if reply.removed == 1 else 's'} removed)"
            if reply.removed
            else f"{args.user} has no usage"
        )
        return 0
    totals = reply.users
    _say(f"{'USER':<24} {'REQUESTS':>8} {'PROMPT':>10} {'COMPLETION':>10} {'COST $':>12}")
    for user, t in sorted(totals.items()):
        cost = f"{t.cost:.6f}" if t.cost else "-"  # (nothing priced what they used)
        _say(f"{user:<24} {t.requests:>8} {t.prompt_tokens:>10} {t.completion_tokens:>10} {cost:>12}")
    return 0


async def cmd_mcp(settings: TektonSettings, args: argparse.Namespace) -> int:
    from tekton.mcp_server import serve_http, serve_stdio

    if args.http is not None:
        await serve_http(
            settings, args.http_host, args.http, lambda url: _say(f"MCP (streamable HTTP) on {url}")
        )
    else:
        await serve_stdio(settings)
    return 0


async def cmd_a2a(settings: TektonSettings, args: argparse.Namespace) -> int:
    import uvicorn

    from bridge.a2a import create_a2a_app
    from bridge.edge import EdgeGuard

    base = args.base_url or f"http://{args.host}:{args.port}"
    async with Bus.connect(settings, name="tekton-a2a") as bus:
        views = await bus.survey(window=0.3)
        if not views:
            raise BusError(f"no specialists are running on {settings.nats_url} (start them with `tekton up`)")
        # The bridge's Host, Origin and body checks in front, as on every HTTP edge (DNS rebinding).
        app = EdgeGuard(create_a2a_app(bus, views, base), settings=settings, host=args.host)
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=HTTP_KEEP_ALIVE_S)
        server = uvicorn.Server(config)
        with http_socket(args.host, args.port) as sock:  # a port in use is one line, before any is said
            for view in views:
                _say(f"A2A agent {view.name}: {base}/a2a/{view.name}/.well-known/agent-card.json")
            await server.serve([sock])
    return 0


async def _run_attached(
    command: Sequence[str], settings: TektonSettings, terminal: tuple[TextIO, TextIO]
) -> int:
    """Run ``command`` on our terminal; Ctrl-C belongs to it while it runs (SIGTERM still stops us)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Where the local user's credentials (and a generated CA) are: aish finds them there.
        env = {"TEKTON_NATS_URL": settings.nats_url, "TEKTON_DATA_DIR": str(settings.data_dir)}
        process = await anyio.open_process(
            list(command), stdin=None, stdout=terminal[0], stderr=terminal[1], env={**os.environ, **env}
        )
        async with anyio.create_task_group() as tg:

            async def on_term() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM) as received:
                    async for _ in received:
                        process.terminate()
                        break

            tg.start_soon(on_term)
            code = await process.wait()
            tg.cancel_scope.cancel()
        return code
    finally:
        signal.signal(signal.SIGINT, previous)


def _settle_heap() -> None:
    """Once a server is up: collect, then move what is alive into the collector's permanent
    generation (``gc.freeze``), so that a full collection walks what was made since, not the ~170,000
    objects start-up left (FastAPI, pydantic, the MCP and A2A SDKs). The gateway spent ~300 us of
    collection per SSE request at 100 at once, a third of its CPU: 937-1,043 -> 768-818 us per request
    with it (bench/results/hot_path-profiles.md, round 7)."""
    gc.collect()
    gc.freeze()


async def cmd_specialist(settings: TektonSettings, args: argparse.Namespace) -> int:
    from specialists.roster import load_roster
    from specialists.runtime import local_model_processes, select, serve_specialists

    select(load_roster(settings.roster, settings.provider), args.names)  # fail on unknown names now
    if args.replicas > 1:
        async with anyio.create_task_group() as tg:
            await _start_children(
                tg,
                [(f"{'+'.join(args.names)}#{i}", args.names) for i in range(args.replicas)],
                settings,
                local_processes=args.replicas * local_model_processes(settings, args.names),
            )
            _say(f"ready {' '.join(args.names)} x{args.replicas} on {settings.nats_url}")
            stop = anyio.Event()
            await set_on_signal(stop)
            tg.cancel_scope.cancel()
        return 0

    def ready(services: list[SpecialistService]) -> None:
        _settle_heap()
        for service in services:
            _say(f"ready {service.spec.name} {service.instance_id} on {settings.nats_url}")
        write_ready(settings, [(s.spec.name, s.instance_id) for s in services])

    await serve_specialists(settings, args.names, on_ready=ready)
    return 0


async def cmd_gateway(settings: TektonSettings, args: argparse.Namespace) -> int:
    from gateway.runtime import serve_gateway

    http = (args.http_host, args.http) if args.http is not None else None
    async with anyio.create_task_group() as tg:
        service = await tg.start(
            lambda task_status: serve_gateway(
                settings, task_status=task_status, http=http, on_http=_http_ready
            )
        )
        _settle_heap()
        _say(f"ready gateway {service.instance_id} on {settings.nats_url}")
        write_ready(settings, [("gateway", service.instance_id)])
    return 0


def _http_line(url: str) -> str:
    return f"HTTP bridge on {url} (console {url}/, OpenAPI {url}/openapi.json)"


def _http_ready(url: str) -> None:
    _say(_http_line(url))


async def cmd_nats(settings: TektonSettings, args: argparse.Namespace) -> int:
    config = node_config(settings, args)
    if config is not None:
        # The cluster's and leaf's secrets first: one that is wrong is one line, with no users made.
        secure(config, settings, args, None, server_tls(settings, args))
        # A printed config is for a node started elsewhere: with the users file, as this one would be
        # (stdout is the config alone).
        config.auth_file = users_file(settings, args, tell=_tell if args.print_config else _say)
        return await cmd_nats_node(settings, args, config)
    server = secured_server(settings, args, websocket_port=args.websocket)
    await anyio.to_thread.run_sync(server.start)
    try:
        if server.ws_port:
            _say(f"NATS WebSocket on {server.ws_url}")
        _say(f"ready nats-server on {server.url} (JetStream store {server.store_dir}); Ctrl-C to stop")
        await set_on_signal(anyio.Event())
    finally:
        server.stop()
    return 0


async def cmd_status(settings: TektonSettings, args: argparse.Namespace) -> int:
    async with Bus.connect(settings, name="tekton-status") as bus:
        # A status report can afford its whole window: every instance gets its say.
        instances = await bus.instances(window=args.window, thorough=True)
        stats = {s["id"]: s for s in await bus.stats(window=args.window, thorough=True)}
    if args.json:
        _say(
            json.dumps(
                [
                    {"name": i.name, "id": i.id, "metadata": i.metadata, "stats": stats.get(i.id)}
                    for i in instances
                ],
                indent=2,
            )
        )
        return 0
    if not instances:
        _say(f"no specialists are running on {settings.nats_url} (start them with `tekton up`)")
        return 1
    gateways = len(await _gateways(settings, args.window))
    _say(
        f"gateway: {gateways} replica{'s' if gateways != 1 else ''}" + ("" if gateways else " (sessions off)")
    )
    row = "{:<12} {:>8} {:<40} {:>7} {:>6} {:>6} {:>6} {:>10}".format
    _say(row("SPECIALIST", "REPLICAS", "PROVIDER/MODEL", "SERVED", "ERRORS", "CANCEL", "ACTIVE", "1ST TOKEN"))
    by_name: dict[str, list[str]] = {}
    for i in instances:
        by_name.setdefault(i.name, []).append(i.id)
    for name, ids in by_name.items():
        meta = next(i.metadata for i in instances if i.name == name)
        datas = [(stats.get(x, {}).get("endpoints") or [{}])[0].get("data") or {} for x in ids]
        served = sum(d.get("served", 0) for d in datas)
        errors = sum(d.get("errors", 0) for d in datas)
        cancelled = sum(d.get("cancelled", 0) for d in datas)
        active = sum(d.get("in_flight", 0) for d in datas)
        firsts = [d["avg_first_token_ms"] for d in datas if d.get("avg_first_token_ms") is not None]
        first = f"{sum(firsts) / len(firsts):.1f} ms" if firsts else "-"
        model = f"{meta.get('provider', '?')}/{meta.get('model', '?')}"
        _say(row(name, len(ids), model, served, errors, cancelled, active, first))
    return 0


async def _gateways(settings: TektonSettings, window: float) -> list[str]:
    async with Bus.connect(settings, name="tekton-status") as bus:
        return [i.id for i in await bus.instances(window=window, role="gateway", thorough=True)]


async def cmd_models(settings: TektonSettings, args: argparse.Namespace) -> int:
    from specialists.models import list_models

    found = await list_models(settings, within=args.timeout)
    default = settings.model or "local (the bundled SmolLM2-135M demo model)"
    if args.json:
        for provider, models, note in found:
            _say(json.dumps({"provider": provider, "models": models, "note": note}))
        return 0
    _say(f'default: {default}  (set `model = "PROVIDER:MODEL"` in {config_file()}, or -m per call)')
    for provider, models, note in found:
        if not models:
            _say(f"{provider:<10} - {note}")
        for model in models:
            _say(f"{provider:<10} {provider}:{model}")
    return 0


async def cmd_logs(settings: TektonSettings, args: argparse.Namespace) -> int:
    """The last lines of `tekton up`'s log; with ``-f``, then every new line as it is written."""
    path = log_path(settings)
    if not path.exists():
        print(f"tekton: no log yet at {path} (tekton up writes it)", file=sys.stderr)
        return 1
    with path.open("r", encoding="utf-8", errors="replace") as log:
        for line in list(deque(log, maxlen=args.lines)):
            sys.stdout.write(line)
        sys.stdout.flush()
        while args.follow:
            line = log.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                await anyio.sleep(0.2)  # polling a file: no change notification to wait on portably
    return 0


WEBSOCKET_HELP = "also serve NATS over WebSocket on PORT (0: any free port)"
HTTP_HELP = (
    "serve the HTTP bridge (JSON, SSE, JSON-RPC WebSocket, OpenAI API, console) on PORT (0: any free"
    " port; its URL is printed)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.OneLineParser(
        prog="tekton", description="Run Tekton: a team of AI specialists on NATS."
    )
    common = argparsing.OneLineParser(add_help=False)
    common.add_argument(
        "--nats",
        dest="nats_url",
        help="NATS URL, or a cluster's, comma-separated (default $TEKTON_NATS_URL or nats://127.0.0.1:4222)",
    )
    common.add_argument("--provider", help="run every specialist on this provider (e.g. scripted, for tests)")
    common.add_argument("--data-dir", help="where the embedded server keeps its JetStream store")
    common.add_argument("--creds", help="credentials file (default $TEKTON_CREDS, else the data dir's)")
    common.add_argument("--tls-ca", help="CA certificate to verify the server with (tls:// URLs)")
    common.add_argument("--log-level", type=argparsing.log_level, default="info")
    common.add_argument(
        "-m", "--model", help="every specialist's model, PROVIDER:MODEL (default: config.toml's `model`)"
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", parents=[common], help="start nats-server and every specialist")
    up.add_argument("--processes", action="store_true", help="each specialist in its own process")
    up.add_argument("--websocket", type=argparsing.port, metavar="PORT", help=WEBSOCKET_HELP)
    up.add_argument("--http", type=argparsing.port, metavar="PORT", help=HTTP_HELP)
    up.add_argument("--http-host", default="127.0.0.1", help="where the HTTP bridge listens")
    up.add_argument("--leaf", metavar="URL", help="join a team's hub as a NATS leaf node (nats://hub:7422)")
    _server_options(up)
    up.add_argument(
        "--metrics",
        type=argparsing.port,
        metavar="PORT",
        help="serve the whole bus's Prometheus /metrics on PORT",
    )
    up.add_argument(
        "command", nargs=argparse.REMAINDER, help="after --: a command to run once ready (e.g. aish)"
    )

    spec = sub.add_parser("specialist", parents=[common], help="run specialists against a NATS server")
    spec.add_argument("names", nargs="+")
    spec.add_argument(
        "--replicas",
        type=argparsing.at_least(1),
        default=1,
        help="run N replica processes (they share the load)",
    )

    gateway = sub.add_parser("gateway", parents=[common], help="run a gateway replica against a NATS server")
    gateway.add_argument("--http", type=argparsing.port, metavar="PORT", help=HTTP_HELP)
    gateway.add_argument("--http-host", default="127.0.0.1", help="where the HTTP bridge listens")
    nats_cmd = sub.add_parser("nats", parents=[common], help="run just the embedded nats-server")
    nats_cmd.add_argument("--websocket", type=argparsing.port, metavar="PORT", help=WEBSOCKET_HELP)
    _server_options(nats_cmd)
    add_nats_cluster_options(nats_cmd)
    add_cluster_parser(sub, common)
    add_probe_parser(sub, common)

    users = sub.add_parser("users", parents=[common], help="add, remove and list users of the bus")
    users_sub = users.add_subparsers(dest="users_cmd", required=True)
    add = users_sub.add_parser("add", help="create a user and write their credentials file (0600)")
    add.add_argument("name")
    add.add_argument(
        "--role", default="user", choices=ROLES, help="user (default), admin, specialist, gateway"
    )
    add.add_argument("--out", help="where to write the credentials (default: the data dir's auth/users/)")
    rm = users_sub.add_parser("rm", help="revoke a user: the running server cuts them off")
    rm.add_argument("name")
    users_sub.add_parser("list", help="list users and roles")

    status = sub.add_parser("status", parents=[common], help="list running specialists and their stats")
    status.add_argument("--json", action="store_true")
    status.add_argument("--window", type=argparsing.seconds, default=0.1, help="seconds to wait for answers")

    top = sub.add_parser("top", parents=[common], help="live view of every specialist instance")
    top.add_argument("--interval", type=argparsing.seconds, default=1.0, help="seconds between refreshes")
    top.add_argument(
        "--iterations", type=argparsing.at_least(1), help="stop after N refreshes (default: until Ctrl-C)"
    )
    top.add_argument(
        "--p99-window",
        type=argparsing.seconds,
        default=60.0,
        metavar="SECONDS",
        help="the p99 first chunk covers the answers of the last SECONDS (default 60)",
    )
    metrics = sub.add_parser("metrics", parents=[common], help="the bus's figures in Prometheus format")
    metrics.add_argument("--window", type=argparsing.seconds, default=0.2, help="seconds to wait for answers")
    usage = sub.add_parser("usage", parents=[common], help="every user's token and cost totals")
    usage_sub = usage.add_subparsers(dest="usage_cmd")
    reset = usage_sub.add_parser("reset", help="forget a user's totals: their budget starts again")
    reset.add_argument("user")
    mcp = sub.add_parser("mcp", parents=[common], help="serve MCP on stdio (for an MCP host's config)")
    mcp.add_argument(
        "--http", type=argparsing.port, metavar="PORT", help="serve MCP over streamable HTTP on PORT instead"
    )
    mcp.add_argument("--http-host", default="127.0.0.1", help="where the MCP HTTP endpoint listens")
    a2a = sub.add_parser("a2a", parents=[common], help="serve every running specialist as an A2A agent")
    a2a.add_argument("--port", type=argparsing.port, default=8100)
    a2a.add_argument("--host", default="127.0.0.1")
    a2a.add_argument("--base-url", help="the URL clients reach this server at (default http://HOST:PORT)")

    models = sub.add_parser(
        "models", parents=[common], help="list the models each provider offers (for -m PROVIDER:MODEL)"
    )
    models.add_argument("--json", action="store_true", help="one JSON object per provider")
    models.add_argument(
        "--timeout", type=argparsing.seconds, default=5.0, help="seconds to wait for each provider"
    )

    logs = sub.add_parser("logs", parents=[common], help="show what tekton up logged")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-n",
        "--lines",
        type=argparsing.at_least(0),
        default=50,
        help="how many of the last lines (default 50)",
    )
    return parser


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", help="TLS with a CA and certificate tekton generates")
    parser.add_argument("--tls-cert", help="your own server certificate (PEM; with --tls-key, --tls-ca)")
    parser.add_argument("--tls-key", help="the key of --tls-cert")
    parser.add_argument(
        "--no-auth", action="store_true", help="no users: anyone who can connect owns the bus (loopback only)"
    )


async def cmd_users(settings: TektonSettings, args: argparse.Namespace) -> int:
    try:
        return _users(Users(settings.data_dir, settings.prefix), args)
    except BusError as err:  # a name that cannot be, one that exists, one that does not
        raise UsageError(err.message) from err


def _users(users: Users, args: argparse.Namespace) -> int:
    if args.users_cmd == "list":
        for user in sorted(users.load().values(), key=lambda u: u.name):
            _say(f"{user.name:<24} {user.role:<11} {user.nkey}")
        return 0
    if args.users_cmd == "add":
        creds, path = users.add(args.name, args.role, Path(args.out) if args.out else None)
        _say(f"added {creds.user} ({creds.role}); credentials in {path} (use with --creds or TEKTON_CREDS)")
    else:
        users.remove(args.name)
        _say(f"removed {args.name}")
    if users.reload_server():
        _say("the running nats-server reloaded its users")
    return 0


def _version() -> str:
    try:
        return f"tekton {package_version('tekton')}"
    except PackageNotFoundError:
        return "tekton (not installed)"


async def _cluster(settings: TektonSettings, args: argparse.Namespace) -> int:
    if args.cluster_cmd == "secrets":
        return cmd_cluster_secrets(settings, args)
    return await cmd_cluster(settings, args, users_file(settings, args), server_tls(settings, args))


COMMANDS = {
    "users": cmd_users,
    "up": cmd_up,
    "specialist": cmd_specialist,
    "gateway": cmd_gateway,
    "nats": cmd_nats,
    "status": cmd_status,
    "top": cmd_top,
    "metrics": cmd_metrics,
    "usage": cmd_usage,
    "mcp": cmd_mcp,
    "a2a": cmd_a2a,
    "cluster": _cluster,
    "probe": cmd_probe,
    "models": cmd_models,
    "logs": cmd_logs,
}


def main(argv: Sequence[str] | None = None) -> int:
    if os.environ.get("TEKTON_SUPERVISED") == "1":
        die_with_parent()
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    configure_logging(args.log_level)
    tracing.configure(f"tekton-{args.cmd}")
    try:
        settings = load_settings(
            nats_url=args.nats_url,
            provider=args.provider,
            data_dir=args.data_dir,
            creds=args.creds,
            tls_ca=args.tls_ca,
            model=args.model,
        )
        return anyio.run(COMMANDS[args.cmd], settings, args)
    except UsageError as err:
        print(f"tekton: {err}", file=sys.stderr)
        return 2
    except BusError as err:
        print(f"tekton: {err}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # A piece that failed to start (a missing API key, say) fails its task group: say why, once.
        first = _first_bus_error(group)
        if first is None:
            raise
        print(f"tekton: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tekton status | head`: the reader left; stop quietly
        sys.stderr.close()
        return 0


def _first_bus_error(group: BaseExceptionGroup) -> BusError | None:
    for err in group.exceptions:
        found = _first_bus_error(err) if isinstance(err, BaseExceptionGroup) else err
        if isinstance(found, BusError):
            return found
    return None


if __name__ == "__main__":
    sys.exit(main())
