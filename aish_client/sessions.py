"""Sessions in aish: `--session [ID|NAME]`, `--continue`, and `aish sessions list|show|rm|fork|rename`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from aish_client.prompt_parts import UsageError
from aish_client.render import Renderer
from bus.argparsing import OneLineParser, number
from bus.auth import find_credentials
from bus.client import Bus
from bus.errors import BadRequest, SessionNotFound, Unauthorized
from bus.sessions import FORK_AT_MAX, SESSION_ID_RE, SESSION_NAME_RE, GatewayClient, Session
from bus.subjects import ALL_USERS

NEW = object()  # `--session` given without a value


def label(session: Session) -> str:
    return f"'{session.name}' ({session.id})" if session.name else session.id


async def resolve(bus: Bus, ref: object, resume_last: bool, renderer: Renderer) -> str | None:
    """The id of the session this command talks in, or None for no session.

    ``--session`` alone starts a new one; ``--session NAME`` uses the session of that name and starts it
    on first use; ``--session ID`` must exist; ``--continue`` takes the most recently used one.
    """
    if resume_last:
        recent = await bus.gateway.list(limit=1)
        if recent:
            renderer.note(f"continuing session {recent[0].name or recent[0].id}")
            return recent[0].id
        ref = NEW
    if ref is None:
        return None
    if ref is NEW:
        session = await bus.gateway.create()
        renderer.note(f"new session {session.id}")
        return session.id
    assert isinstance(ref, str)
    found = await bus.gateway.find(ref)
    if found is not None:
        return found.id
    if SESSION_ID_RE.match(ref) or not SESSION_NAME_RE.match(ref):
        raise SessionNotFound.named(ref)
    try:
        session = await bus.gateway.create(name=ref)
    except BadRequest:  # another command started it a moment ago: talk in that one
        found = await bus.gateway.find(ref)
        if found is None:
            raise
        return found.id
    renderer.note(f"new session {label(session)}")
    return session.id


def everyone(bus: Bus) -> GatewayClient:
    """The gateway as an admin sees it: every user's sessions. nats-server lets only the admin role
    publish as ``_all``; saying so here first makes a user's refusal one clear line, not a timeout."""
    creds = find_credentials(bus.settings.creds, bus.settings.data_dir)
    if creds is not None and creds.role != "admin":
        raise Unauthorized(
            f"--all lists every user's sessions, which only an admin may see; you are {creds.user!r} "
            f"(role {creds.role})"
        )
    return GatewayClient(bus.nc, bus.settings.prefix, user=ALL_USERS)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="aish sessions", description="Conversation sessions.")
    every = "every user's sessions and their owners (admins only; owner '?': made before sessions had owners)"
    parser.add_argument("--all", action="store_true", help=every)
    sub = parser.add_subparsers(dest="op")
    ls = sub.add_parser("list", help="sessions, most recently used first (the default)")
    ls.add_argument("--specialist")
    ls.add_argument("--limit", type=number(int, 1, 10_000), default=50)
    # On the subcommands too (`aish sessions list --all`); SUPPRESS keeps one given before them.
    ls.add_argument("--all", action="store_true", default=argparse.SUPPRESS, help=every)
    show = sub.add_parser("show", help="one session with its turns")
    show.add_argument("ref", metavar="ID|NAME")
    show.add_argument("--all", action="store_true", default=argparse.SUPPRESS, help=every)
    rm = sub.add_parser("rm", help="delete a session")
    rm.add_argument("ref", metavar="ID|NAME")
    rm.add_argument("--all", action="store_true", default=argparse.SUPPRESS, help=every)
    fork = sub.add_parser("fork", help="a new session starting from a turn of another")
    fork.add_argument("ref", metavar="ID|NAME")
    fork.add_argument("--at", type=number(int, 0, FORK_AT_MAX), help="keep the first N turns (default: all)")
    fork.add_argument("--name")
    rename = sub.add_parser("rename", help="give a session a name")
    rename.add_argument("ref", metavar="ID|NAME")
    rename.add_argument("name")
    return parser


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


async def run(bus: Bus, argv: Sequence[str], renderer: Renderer) -> int:
    args = build_parser().parse_args(argv)
    op = args.op or "list"
    if args.all and op not in ("list", "show", "rm"):
        raise UsageError(f"--all is for list, show and rm; {op} works on your own sessions")
    gateway = everyone(bus) if args.all else bus.gateway
    if op == "list":
        sessions = await gateway.list(
            specialist=getattr(args, "specialist", None), limit=args.limit if args.op else 50
        )
        if not sessions:
            renderer.note("no sessions yet: start one with aish --session NAME ...")
            return 0
        owner = f"{'OWNER':<16} " if args.all else ""
        renderer.token(f"{'ID':<32}  {owner}{'NAME':<16} {'UPDATED':<16} {'TURNS':>5}  LAST\n")
        for s in sessions:
            last = s.last.replace("\n", " ")[:40]
            owner = f"{s.owner or '?':<16} " if args.all else ""
            renderer.token(
                f"{s.id:<32}  {owner}{s.name or '-':<16} {_when(s.updated):<16} {s.turns:>5}  {last}\n"
            )
        return 0
    if op == "show":
        session = await gateway.get(args.ref)
        renderer.token(
            (f"owner {session.owner or '?'}  " if args.all else "")
            + f"session {label(session)}  specialist {session.specialist or '-'}  "
            f"context {session.context_window} turns  created {_when(session.created)}  "
            f"updated {_when(session.updated)}\n"
        )
        if session.dropped:
            renderer.token(f"({session.dropped} older turns dropped)\n")
        for n, turn in enumerate(session.turns, start=session.dropped + 1):
            who = "you" if turn.role == "user" else turn.specialist
            mark = "" if turn.status == "ok" else f" [{turn.status}{': ' + turn.error if turn.error else ''}]"
            renderer.token(f"[{n}] {who}{mark}: {turn.content}\n")
        return 0
    if op == "rm":
        renderer.token(f"deleted {await gateway.delete(args.ref)}\n")
        return 0
    if op == "fork":
        if args.at is not None and args.at < 0:
            raise BadRequest("--at counts turns from the start: 0 or more")
        fork = await bus.gateway.fork(args.ref, at=args.at, name=args.name)
        renderer.token(f"{fork.id}\n")
        renderer.note(f"forked {args.ref} at turn {len(fork.turns)} into {label(fork)}")
        return 0
    renamed = await bus.gateway.rename(args.ref, args.name)
    renderer.token(f"renamed {renamed.id} to '{renamed.name}'\n")
    return 0
