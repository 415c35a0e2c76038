"""aish's subcommands, each with its own ``-h``: list, bulk, sessions, logs, completion, route...

The REPL uses :func:`cmd_list` too; it lives here so neither the CLI nor the REPL imports the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import anyio

from aish_client import runs, sessions
from aish_client.completion import SHELLS, script
from aish_client.exits import EXIT_ERROR, EXIT_USAGE, HANDLED, exit_code_for, json_error
from aish_client.logbook import Logbook, as_json, as_text, open_logbook
from aish_client.prompt_parts import UsageError
from aish_client.render import Renderer
from aish_client.runner import DEMO_MODEL
from bus.argparsing import OneLineParser, number
from bus.client import Bus
from bus.discovery import Correction
from bus.errors import BadRequest, BusError
from bus.settings import TektonSettings, load_settings
from bus.usage import utc_time


def version(prog: str) -> str:
    try:
        return f"{prog} {package_version('tekton')}"
    except PackageNotFoundError:
        return f"{prog} (not installed)"


def model_label(provider: str, model: str) -> str:
    label = f"{provider}:{model}" if provider else model
    return label + " (demo)" if provider == "local" and model.startswith(DEMO_MODEL) else label


async def cmd_list(bus: Bus, renderer: Renderer, capability: str | None = None, as_json: bool = False) -> int:
    """Running specialists with their model, capabilities, replicas and health; with ``capability``,
    ranked for it."""
    views = await bus.survey()
    if not views:
        renderer.error(f"no specialists are running on {bus.settings.nats_url} (start them with `tekton up`)")
        return EXIT_ERROR
    if capability:
        reply = await bus.gateway.discover(capability=capability)
        for r in reply.ranked:
            mark = "*" if r.name == reply.chosen else " "
            renderer.token(f"{mark} {r.name:<12} {r.score:.2f}  ({r.why})\n")
        if reply.chosen is None:
            renderer.note(reply.reason)
        return 0
    if as_json:
        for v in views:
            renderer.token(json.dumps(v.model_dump(), ensure_ascii=False) + "\n")
        return 0
    width = max(len(model_label(v.provider, v.model)) for v in views)
    for v in views:
        caps = ", ".join(f"{c} {s:.2f}" for c, s in sorted(v.capabilities.items(), key=lambda kv: -kv[1]))
        model = model_label(v.provider, v.model)
        renderer.token(f"{v.name:<12} x{len(v.instances)} health {v.health:.2f}  {model:<{width}}  {caps}\n")
        if v.description:  # what it is for: what text routing sends it
            renderer.token(f"{'':<12} {v.description}\n")
        for conflict in v.conflicts:
            renderer.note(f"  {v.name}: {conflict}")
    return 0


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parsers: dict[str, argparse.ArgumentParser] = {}
    ls = parsers["list"] = OneLineParser(
        prog="aish list", description="Running specialists: replicas, health, model and capabilities."
    )
    ls.add_argument("--capability", metavar="CAP", help="rank the specialists for this capability")
    ls.add_argument("--json", action="store_true", help="one JSON object per specialist")
    bulk = parsers["bulk"] = OneLineParser(
        prog="aish bulk",
        description="Run a dependency graph of requests from a YAML or JSON file (format: docs/bulk.md).",
    )
    bulk.add_argument("plan", metavar="PLAN.yaml")
    bulk.add_argument("--layout", choices=["stacked", "lines"], default=None)
    bulk.add_argument("--json", action="store_true", help="one JSON object per event (docs/aish-json.md)")
    bulk.add_argument("--no-log", action="store_true", help="do not record the answers in the log")
    parsers["sessions"] = sessions.build_parser()
    logs = parsers["logs"] = OneLineParser(
        prog="aish logs",
        description="Every prompt and answer aish recorded (newest last), with model and token counts.",
    )
    logs.add_argument(
        "-n",
        "--count",
        type=number(int, 1, 1_000_000),
        default=3,
        metavar="N",
        help="the last N entries (default 3)",
    )
    logs.add_argument("-q", "--query", metavar="TEXT", help="only entries whose prompt or answer holds TEXT")
    logs.add_argument("--json", action="store_true", help="one JSON object per entry")
    logs.add_argument("--path", action="store_true", help="print where the log is kept")
    completion = parsers["completion"] = OneLineParser(
        prog="aish completion",
        description='Print a shell completion script. bash: eval "$(aish completion bash)"; '
        'zsh: eval "$(aish completion zsh)"; fish: aish completion fish | source',
    )
    completion.add_argument("shell", choices=SHELLS)
    parsers["usage"] = OneLineParser(
        prog="aish usage", description="The tokens you have spent (per session too) and your budget."
    )
    parsers["runs"] = OneLineParser(
        prog="aish runs",
        description="Your recent runs (answers kept for resume and attach) and their states.",
    )
    attach = parsers["attach"] = OneLineParser(
        prog="aish attach",
        description="Replay a run from its start (or after a frame) and follow it to its end.",
    )
    attach.add_argument("run", metavar="RUN")
    attach.add_argument("--after", type=int, default=-1, metavar="SEQ", help="only the frames after this seq")
    cancel = parsers["cancel"] = OneLineParser(prog="aish cancel", description="Stop a run.")
    cancel.add_argument("run", metavar="RUN")
    route = parsers["route"] = OneLineParser(
        prog="aish route",
        description="Who would answer a request, and why (the ranking, best first); or your routing "
        "corrections: the requests you reran with another specialist's name, which route your own "
        "requests like them (nobody else's).",
    )
    route.add_argument("text", nargs="*", metavar="TEXT", help="the request (else read from stdin)")
    route.add_argument("--corrections", action="store_true", help="list your corrections with their ids")
    route.add_argument(
        "--forget", metavar="ID", help="forget your correction ID (or the start of its id; 'all' for all)"
    )
    return parsers


def _settings(args: argparse.Namespace) -> TektonSettings:
    return load_settings(
        nats_url=args.nats_url,
        idle_timeout_s=args.idle_timeout,
        request_timeout_s=args.timeout,
        creds=args.creds,
        tls_ca=args.tls_ca,
    )


def run_subcommand(name: str, argv: Sequence[str], top: argparse.Namespace) -> int:
    """Run subcommand ``name`` with its own arguments; ``top`` holds the options given before it."""
    parser = _parsers()[name]
    args = parser.parse_args(argv)
    renderer = Renderer()
    handlers: dict[str, Callable[[], int]] = {
        "list": lambda: anyio.run(
            _list, _settings(top), args.capability or top.capability, args.json or top.json
        ),
        "bulk": lambda: anyio.run(_bulk, _settings(top), args, top),
        "sessions": lambda: anyio.run(_sessions, _settings(top), argv),
        "logs": lambda: _logs(_settings(top), args, renderer, top),
        "completion": lambda: _completion(args.shell, renderer),
        "usage": lambda: anyio.run(_usage, _settings(top), renderer),
        "runs": lambda: anyio.run(_runs, _settings(top), name, args, renderer),
        "attach": lambda: anyio.run(_runs, _settings(top), name, args, renderer),
        "cancel": lambda: anyio.run(_runs, _settings(top), name, args, renderer),
        "route": lambda: anyio.run(_route, top, args, renderer),
    }
    if top.detach:
        renderer.error(f'--detach starts a question (aish --detach apollo "long job"), not {name}')
        return EXIT_USAGE
    try:
        return handlers[name]()
    except HANDLED as err:
        return exit_code_for(err, renderer)


async def cmd_route(bus: Bus, renderer: Renderer, text: str) -> int:
    """How the gateway would route ``text``: every specialist that fits, best first, and why."""
    reply = await bus.gateway.discover(text=text)
    for r in reply.ranked:
        if r.fit >= 0.01 or r.name == reply.chosen:  # what shows as 0.00 tells nothing
            mark = "*" if r.name == reply.chosen else " "
            renderer.token(f"{mark} {r.name:<12} {r.score:.2f}  {r.why}\n")
    if reply.chosen is None or reply.generalist or reply.judged_by:
        renderer.note(reply.reason)
    return 0 if reply.chosen else EXIT_ERROR


def show_corrections(corrections: Sequence[Correction], renderer: Renderer) -> None:
    if not corrections:
        renderer.note("no routing corrections (rerunning a routed request with a name makes one)")
        return
    renderer.token(f"{'ID':<12}  {'SPECIALIST':<12}  {'WHEN':<16}  REQUEST\n")
    for c in corrections:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.at))
        text = " ".join(c.text.split())
        text = text if len(text) <= 60 else text[:59] + "…"
        renderer.token(f"{c.id:<12}  {c.specialist:<12}  {when:<16}  {text}\n")


async def _route(top: argparse.Namespace, args: argparse.Namespace, renderer: Renderer) -> int:
    """`aish route TEXT`, `aish route --corrections`, `aish route --forget ID`."""
    if args.forget is not None and args.corrections:
        raise UsageError("give --corrections or --forget ID, not both")
    if args.forget is not None and not args.forget.strip():
        raise UsageError(
            "--forget needs a correction's id (or the start of one, or 'all'): see --corrections"
        )
    text = " ".join(args.text)
    if (args.forget is not None or args.corrections) and text:
        raise UsageError("--corrections and --forget take no request text")
    if args.forget is None and not args.corrections and not text and not sys.stdin.isatty():
        text = sys.stdin.read()
    if args.forget is None and not args.corrections and not text.strip():
        raise UsageError(
            'route needs a request: aish route "what is a mutex?" (or --corrections, --forget ID)'
        )
    settings = load_settings(
        nats_url=top.nats_url, idle_timeout_s=top.idle_timeout, creds=top.creds, tls_ca=top.tls_ca
    )
    async with Bus.connect(settings, name="aish") as bus:
        if args.forget is not None:
            before = (await bus.gateway.discover(corrections=True)).corrections or []
            left = (await bus.gateway.discover(forget=args.forget)).corrections
            if left is None:  # a gateway that did not take the request to forget
                raise BusError(f"the gateway forgot nothing: it did not take --forget {args.forget!r}")
            # Only what this request named and is gone now (not a correction another command dropped).
            kept = {c.id for c in left}
            for gone in before:
                if (args.forget == "all" or gone.id.startswith(args.forget)) and gone.id not in kept:
                    renderer.note(f"forgot {gone.id}: {gone.text[:60]!r} -> {gone.specialist}")
            return 0
        if args.corrections:
            show_corrections((await bus.gateway.discover(corrections=True)).corrections or [], renderer)
            return 0
        return await cmd_route(bus, renderer, text)


async def _list(settings: TektonSettings, capability: str | None, as_json: bool) -> int:
    async with Bus.connect(settings, name="aish") as bus:
        return await cmd_list(bus, Renderer(), capability, as_json)


async def _bulk(settings: TektonSettings, args: argparse.Namespace, top: argparse.Namespace) -> int:
    from aish_client.fanout import load_plan, run_plan

    renderer = Renderer()
    renderer.json_events = args.json or top.json
    plan = load_plan(args.plan)
    ops = [op.id for op in plan.operations]
    book = open_logbook(settings.data_dir, off=args.no_log or top.no_log)
    try:
        async with Bus.connect(settings, name="aish") as bus:
            layout = args.layout or top.layout
            await run_plan(bus, plan, ops, renderer, layout=layout, logbook=book)
    except BusError as err:
        json_error(renderer, err)
        raise
    return 0


async def _runs(settings: TektonSettings, name: str, args: argparse.Namespace, renderer: Renderer) -> int:
    async with Bus.connect(settings, name="aish") as bus:
        if name == "attach":
            return await runs.attach(bus, [args.run], args.after, renderer)
        if name == "cancel":
            return await runs.cancel(bus, [args.run], renderer)
        return await runs.list_runs(bus, renderer)


async def _sessions(settings: TektonSettings, argv: Sequence[str]) -> int:
    async with Bus.connect(settings, name="aish") as bus:
        return await sessions.run(bus, argv, Renderer())


def _logs(
    settings: TektonSettings, args: argparse.Namespace, renderer: Renderer, top: argparse.Namespace
) -> int:
    book = Logbook(settings.data_dir / "logs.db")
    if args.path:
        renderer.token(f"{book.path}\n")
        return 0
    if args.count < 1:
        raise BadRequest("-n takes a number of entries, 1 or more")
    entries = book.entries(args.count, args.query)
    if not entries:
        renderer.note("no matching entries" if args.query else f"nothing logged yet ({book.path})")
        return 0
    for entry in entries:
        if args.json or top.json:
            renderer.token(as_json(entry) + "\n")
        else:
            renderer.token("\n".join(as_text(entry)) + "\n")
    return 0


def usd(amount: float) -> str:
    """A budget in dollars as it was set: cents at least, to the micro-dollar (0.0003 is not $0.00)."""
    whole, _, cents = f"{amount:.6f}".rstrip("0").partition(".")
    return f"{whole}.{cents:0<2}"


async def _usage(settings: TektonSettings, renderer: Renderer) -> int:
    """`aish usage`: the gateway's totals for the asker (docs/observability.md)."""
    async with Bus.connect(settings, name="aish") as bus:
        u = await bus.gateway.usage()
    t = u.total
    line = (
        f"{u.user}: {t.requests} requests, {t.prompt_tokens} prompt + {t.completion_tokens} completion"
        f" = {t.tokens} tokens" + (f", ${t.cost:.6f}" if t.cost else "")
    )
    budgets = []
    spent, per = (u.period_total, f" a {u.budget_period}") if u.period_total is not None else (t, "")
    if u.budget_tokens is not None:
        budgets.append(f"budget {u.budget_tokens} tokens{per}, {max(0, u.budget_tokens - spent.tokens)} left")
    if u.budget_cost is not None:
        budgets.append(f"budget ${usd(u.budget_cost)}{per}, ${max(0.0, u.budget_cost - spent.cost):.6f} left")
    if budgets and u.period_resets is not None:
        budgets.append(f"resets {utc_time(u.period_resets)}")
    if budgets:
        line += f" ({'; '.join(budgets)})"
    renderer.token(line + "\n")
    if u.sessions:
        renderer.token(f"{'SESSION':<34} {'REQUESTS':>8} {'PROMPT':>8} {'COMPLETION':>10} {'COST $':>10}\n")
        for session, s in sorted(u.sessions.items()):
            counts = f"{s.requests:>8} {s.prompt_tokens:>8} {s.completion_tokens:>10}"
            cost = f"{s.cost:.6f}" if s.cost else "-"  # (nothing priced what it used)
            renderer.token(f"{session:<34} {counts} {cost:>10}\n")
    return 0


def _completion(shell: str, renderer: Renderer) -> int:
    renderer.token(script(shell))
    return 0
