"""Identities on one bus: who exists, with which role, and the nats-server file that lets them in.

All of it lives in the data dir's ``auth/`` (mode 0700):

    users.json        name -> role and public nkey (no secrets)
    nats-users.conf   the `authorization` block nats-server includes (public nkeys + permissions)
    local.creds, gateway.creds, specialist.creds
                      credentials (0600) `tekton up` made on first run for the local user (an admin)
                      and its own services
    users/NAME.creds  a user's credentials from `tekton users add NAME`, to hand over to them

nats-server does the checking; revoking a user is rewriting nats-users.conf and asking the running
server to reload (SIGHUP to the pid in its pid file, what `nats-server --signal reload` does), which
closes that user's connections.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import nkeys  # type: ignore[import-untyped]

from bus.auth import (
    Credentials,
    creds_dir,
    default_creds_path,
    permissions,
    save_credentials,
    validate_role,
    validate_user,
)
from bus.errors import BusError
from bus.subjects import ANONYMOUS, GATEWAY_USER

USERS_FILE = "users.json"
AUTH_CONF = "nats-users.conf"
# The identities `tekton up` makes for itself on first run: (name, role, creds file identity).
SERVICES = ((GATEWAY_USER, "gateway"), ("specialists", "specialist"))


def new_credentials(user: str, role: str) -> tuple[Credentials, str]:
    """A fresh user nkey: the credentials (with the seed) and the public key the server knows."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    return Credentials(user=user, role=role, seed=seed), public


def local_user_name() -> str:
    """The OS login as a valid user name, else "local"."""
    try:
        name = "".join(c if c.isalnum() else "-" for c in getpass.getuser().lower()).strip("-")
        return validate_user(name[:64].strip("-"))
    except (BusError, OSError, KeyError):
        return "local"


@dataclass(frozen=True)
class User:
    name: str
    role: str
    nkey: str


class Users:
    """The users registry of one data dir and the nats-server authorization file made from it."""

    def __init__(self, data_dir: Path, prefix: str):
        self.dir = creds_dir(data_dir)
        self.data_dir = data_dir
        self.prefix = prefix

    @property
    def auth_file(self) -> Path:
        return self.dir / AUTH_CONF

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nats" / "nats-server.pid"

    def user_creds_path(self, name: str) -> Path:
        """Where `tekton users add NAME` writes the new user's credentials (to hand over to them)."""
        return self.dir / "users" / f"{name}.creds"

    def exists(self) -> bool:
        return (self.dir / USERS_FILE).exists()

    def load(self) -> dict[str, User]:
        try:
            raw = json.loads((self.dir / USERS_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise BusError(f"cannot read {self.dir / USERS_FILE}: {err}") from None
        if not isinstance(raw, dict):
            raise BusError(
                f"{self.dir / USERS_FILE} is not a users file: it holds no {{name: {{role, nkey}}}} object"
            )
        return {name: self._user(name, entry) for name, entry in raw.items()}

    def _user(self, name: str, entry: object) -> User:
        """One entry of users.json, checked: a bad one would become a bad nats-server config."""
        path = self.dir / USERS_FILE
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("role"), str)
            and isinstance(entry.get("nkey"), str)
        ):
            raise BusError(f"{path} is not a users file: user {name!r} has no role and nkey strings")
        try:
            validate_user(name)
            validate_role(entry["role"])
        except BusError as err:
            raise BusError(f"{path}: {err}") from None
        return User(name, entry["role"], entry["nkey"])

    def _save(self, users: dict[str, User]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        data = {
            u.name: {"role": u.role, "nkey": u.nkey} for u in sorted(users.values(), key=lambda u: u.name)
        }
        tmp = self.dir / f"{USERS_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.dir / USERS_FILE)
        self.write_auth_file(users)

    def write_auth_file(self, users: dict[str, User] | None = None) -> Path:
        """The `authorization` block nats-server includes: each user's public nkey and permissions."""
        users = self.load() if users is None else users
        entries = [
            f"    # {u.name} ({u.role})\n    {{nkey: {json.dumps(u.nkey)}, "
            f"permissions: {json.dumps(permissions(u.role, u.name, self.prefix))}}}"
            for u in sorted(users.values(), key=lambda u: u.name)
        ]
        body = ",\n".join(entries)
        text = (
            "# Written by `tekton users`; edits here are overwritten.\n"
            f"authorization {{\n  users = [\n{body}\n  ]\n}}\n"
        )
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.auth_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.auth_file)
        return self.auth_file

    def add(self, name: str, role: str = "user", creds_path: Path | None = None) -> tuple[Credentials, Path]:
        """A new identity: registered, allowed by the server config, and its credentials file written."""
        validate_user(name)
        validate_role(role)
        if name == ANONYMOUS:
            raise BusError(f"{ANONYMOUS!r} is the name of clients without credentials; pick another")
        users = self.load()
        if name in users:
            raise BusError(f"user {name!r} exists already (remove it first with `tekton users rm {name}`)")
        creds, public = new_credentials(name, role)
        path = creds_path or self.user_creds_path(name)
        save_credentials(path, creds, replace_others=False)
        users[name] = User(name, role, public)
        try:
            self._save(users)
        except BaseException:
            path.unlink(missing_ok=True)  # no seed left behind for a user the server does not know
            raise
        return creds, path

    def remove(self, name: str) -> User:
        users = self.load()
        if name not in users:
            known = ", ".join(sorted(users)) or "none"
            raise BusError(f"no user named {name!r} (users: {known})")
        user = users.pop(name)
        self._save(users)
        self.user_creds_path(name).unlink(missing_ok=True)
        return user

    def ensure_local(self) -> bool:
        """First run: the services' identities and the local user (an admin, as the machine's owner),
        with their credentials in the data dir. Returns whether anything was created."""
        if self.exists():
            return False
        users: dict[str, User] = {}
        for name, role in [*SERVICES, ("local", "admin")]:
            user = local_user_name() if name == "local" else name
            user = "local" if user in users else user
            creds, public = new_credentials(user, role)
            save_credentials(default_creds_path(self.data_dir, "local" if name == "local" else role), creds)
            users[user] = User(user, role, public)
        self._save(users)
        return True

    def reload_server(self) -> bool:
        """Ask the server started from this data dir to re-read its users; False when none runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        return True
