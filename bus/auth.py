"""Who may do what on the bus: roles as nats-server subject permissions, and credentials files.

nats-server enforces all of it (config-file users identified by nkeys, see docs/security.md); this
module only says, as pure data, which subjects each role may publish and subscribe to, and reads and
writes the small credentials file a client connects with.

A credentials file (TOML, mode 0600):

    user = "alice"
    role = "user"
    seed = "SU..."      # the nkey seed: the secret that signs the server's nonce
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from bus.errors import BusError, NatsUnavailable
from bus.subjects import INBOX_ROOT, inbox_prefix, runs_filter, runs_stream_name, validate_name

Role = Literal["user", "admin", "specialist", "gateway"]
ROLES: tuple[str, ...] = get_args(Role)
SERVICE_ROLES = ("specialist", "gateway")
SRV = "$SRV.>"
# A specialist may answer a request with this many frames within this long (its whole stream).
RESPONSE_FRAMES_MAX = 1_000_000
RESPONSE_WINDOW = "1h"


def permissions(role: str, user: str, prefix: str) -> dict[str, Any]:
    """The nats-server ``permissions`` block of ``user`` in ``role``.

    A user publishes requests (to specialists, to the gateway under their own name, cancels under their
    own name, discovery pings) and subscribes only to their own inbox; services subscribe to what they
    serve and answer on any inbox; only the gateway touches JetStream (the sessions bucket).
    """
    own_inbox = f"{inbox_prefix(user)}.>"
    chat = f"{prefix}.ai.*.chat"
    runs = runs_stream_name(prefix)
    if role in ("user", "admin"):
        publish = [chat, f"{prefix}.cancel.{user}.*", f"{prefix}.gateway.{user}.>", SRV]
        # Replay requests for their own runs (the replica producing one re-sends its frames).
        publish.append(f"{prefix}.replay.{user}.*")
        # Their own runs only (bus/runs.py): a consumer whose filter is one of their run subjects (the
        # filter is in the API subject of a named consumer), direct gets by such a subject, the stream's
        # info (run ids and counts, no content), flow control of their consumers.
        publish += [
            f"$JS.API.CONSUMER.CREATE.{runs}.*.{runs_filter(prefix, user)}",
            f"$JS.API.DIRECT.GET.{runs}.{runs_filter(prefix, user)}",
            f"$JS.API.STREAM.INFO.{runs}",
            f"$JS.FC.{runs}.>",
        ]
        if role == "admin":
            # Any user's name in gateway subjects (and _all: every user's sessions) and cancels.
            publish += [f"{prefix}.gateway.*.>", f"{prefix}.cancel.*.*", f"{prefix}.replay.*.*"]
        return {"publish": {"allow": publish}, "subscribe": {"allow": [own_inbox, f"{prefix}.run.{user}.>"]}}
    if role == "specialist":
        # Only answers to requests it received (any number of frames within the hour), nothing else:
        # a specialist's credentials cannot write into an inbox nobody asked it to answer.
        # And usage records (a batch of answers at a time) to the gateway's usage book; it hears who is
        # over budget.
        return {
            # ...and empty probes next to a run, asking whether anyone still follows it; and placement
            # (specialists/placement.py): free slots to their peers, requests forwarded to one with room.
            "publish": {
                "allow": [
                    f"{prefix}.usage.*",
                    f"{prefix}.run.*.*.p",
                    f"{prefix}.ai.*.load",
                    f"{prefix}.ai.*.direct.*",
                ]
            },
            "allow_responses": {"max": RESPONSE_FRAMES_MAX, "expires": RESPONSE_WINDOW},
            "subscribe": {
                "allow": [
                    chat,
                    f"{prefix}.cancel.*.*",
                    f"{prefix}.replay.*.*",
                    SRV,
                    own_inbox,
                    f"{prefix}.budget",
                    f"{prefix}.ai.*.load",
                    f"{prefix}.ai.*.direct.*",
                ]
            },
        }
    if role == "gateway":
        return {
            "publish": {
                # Gateway subjects and cancels under any name: its HTTP bridge acts for its callers.
                "allow": [
                    f"{INBOX_ROOT}.>",
                    chat,
                    f"{prefix}.gateway.>",
                    f"{prefix}.cancel.*.*",
                    f"{prefix}.replay.*.*",
                    f"{prefix}.run.>",
                    # The turn journal (gateway/journal.py): only gateways write what gateways replay.
                    f"{prefix}.journal.*.*",
                    "$JS.>",
                    "$KV.>",
                    SRV,
                    f"{prefix}.budget",
                ]
            },
            # The whole inbox tree: a session chat is recorded by listening on the client's inbox.
            # And every run: it records session answers from them, and its HTTP bridge resumes them.
            "subscribe": {
                "allow": [
                    f"{prefix}.gateway.>",
                    f"{INBOX_ROOT}.>",
                    f"{prefix}.cancel.*.*",
                    f"{prefix}.run.>",
                    SRV,
                    f"{prefix}.usage.*",
                ]
            },
        }
    raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


class NotAuthorized(NatsUnavailable):
    """The server is there but will not let us in."""

    retryable = False

    def __init__(self, url: str, user: str | None):
        BusError.__init__(
            self,
            f"the nats-server at {url} requires credentials: pass --creds FILE or set TEKTON_CREDS "
            "(`tekton users add NAME` makes them)"
            if user is None
            else f"the nats-server at {url} refused the credentials of {user!r} (revoked, or made for "
            "another server)",
        )
        self.url = url


def validate_user(name: str) -> str:
    """A user name is a subject token: the same rules as a specialist name."""
    try:
        return validate_name(name)
    except ValueError:
        raise BusError(
            f"invalid user name {name!r}: use lowercase letters, digits and '-' (not at the start or "
            "end), at most 64 characters"
        ) from None


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise BusError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return role


class Credentials(NamedTuple):
    """What a client connects with: its name (the subject token its permissions pin), role and seed."""

    user: str
    role: str
    seed: str

    def dump(self) -> str:
        return (
            "# Tekton credentials: keep this file secret (mode 0600).\n"
            f'user = "{self.user}"\nrole = "{self.role}"\nseed = "{self.seed}"\n'
        )


def load_credentials(path: Path) -> Credentials:
    """Read a credentials file, or raise a BusError saying what is wrong with it."""
    import tomllib  # a one-shot aish on a server without users never reads one

    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BusError(f"no credentials file at {path} (create one with `tekton users add NAME`)") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BusError(f"cannot read credentials file {path}: {err}") from None
    try:
        creds = Credentials(user=str(data["user"]), role=str(data["role"]), seed=str(data["seed"]))
    except KeyError as err:
        raise BusError(f"credentials file {path} has no {err.args[0]!r}") from None
    validate_user(creds.user)
    validate_role(creds.role)
    if not creds.seed.startswith("SU"):
        raise BusError(f"credentials file {path} holds no user nkey seed (it should start with 'SU')")
    return creds


def save_credentials(path: Path, creds: Credentials, *, replace_others: bool = True) -> None:
    """Write ``creds`` readable by the owner only (created 0600, never world-readable for an instant).

    Without ``replace_others``, a file already at ``path`` is replaced only when it holds credentials
    of the same user (a stale copy: theirs were revoked when they were removed), never anything else.
    Nothing is left behind when the write fails."""
    if not replace_others:
        _check_replaceable(path, creds.user)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A name of its own next to ``path`` (made 0600 by mkstemp): no other file is truncated.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise BusError(f"cannot write credentials to {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(creds.dump())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise BusError(f"cannot write credentials to {path}: {err.strerror or err}") from None
        raise


def _check_replaceable(path: Path, user: str) -> None:
    """Refuse to write over anything at ``path`` but an old credentials file of ``user``."""
    if path.is_dir():
        raise BusError(f"{path} is a directory: name the credentials file to write, e.g. {path / user}.creds")
    if not (path.exists() or path.is_symlink()):
        return
    try:
        stale = load_credentials(path).user == user
    except BusError:
        stale = False
    if not stale:
        raise BusError(
            f"{path} exists and is not the credentials of {user!r}: not overwriting it "
            "(move it away, or write elsewhere)"
        )


def creds_dir(data_dir: Path) -> Path:
    return data_dir / "auth"


def default_creds_path(data_dir: Path, identity: str) -> Path:
    """Where ``tekton`` keeps the credentials of one identity: the local user's (``local``), the
    gateway's and the specialists' (see tekton/users.py)."""
    return creds_dir(data_dir) / f"{identity}.creds"


def find_credentials(explicit: Path | None, data_dir: Path, identity: str = "local") -> Credentials | None:
    """``--creds``/``TEKTON_CREDS`` when given (and then it must exist), else the default file of
    ``identity`` in the data dir when there is one, else None (a server without auth)."""
    if explicit is not None:
        return load_credentials(Path(explicit).expanduser())
    path = default_creds_path(data_dir, identity)
    return load_credentials(path) if path.exists() else None
