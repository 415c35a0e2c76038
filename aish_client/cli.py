"""`aish`: one-shot pipelines (`aish -c '...'`, `aish apollo "question"`), `aish list`, and a REPL."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from aish_client import runs, sessions
from aish_client.fanout import load_plan, run_plan
from aish_client.parser import AUTO, Ask, Pipeline, PipelineSyntaxError, Target, parse
from aish_client.render import Renderer
from aish_client.repl import repl
from aish_client.runner import run_pipeline
from bus.client import Bus
from bus.errors import BadRequest, BusError
from bus.logs import configure_logging
from bus.settings import TektonSettings, load_settings
from bus.subjects import NAME_RE
from bus.wire import ChatOptions

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
BUILTINS = ("list", "help")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aish",
        description="Talk to Tekton's AI specialists: aish -c 'echo \"text\" | apollo | athena'",
    )
    parser.add_argument(
        "-c",
        dest="command",
        action="store_true",
        help="the words are one pipeline: run it and exit (aish -c 'echo \"x\" | apollo | athena')",
    )
    parser.add_argument(
        "--nats", dest="nats_url", help="NATS URL (default $TEKTON_NATS_URL or nats://127.0.0.1:4222)"
    )
    parser.add_argument("--max-tokens", type=int, help="cap each answer at N tokens")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--timeout", type=float, help="deadline of each request, seconds")
    parser.add_argument("--idle-timeout", type=float, help="give up after N s without a token or heartbeat")
    parser.add_argument(
        "--session",
        nargs="?",
        const=sessions.NEW,
        metavar="ID|NAME",
        help="talk in a session kept by the gateway; a name starts it on first use; without a value "
        "(last, or right before -c) a new session",
    )
    parser.add_argument(
        "--capability",
        metavar="CAP",
        help="let the gateway pick the best specialist for this capability (as @CAP does in a pipeline)",
    )
    parser.add_argument(
        "--continue", dest="resume", action="store_true", help="continue the most recently used session"
    )
    parser.add_argument(
        "--layout",
        choices=["stacked", "lines"],
        default="stacked",
        help="several answers at once: one after another under headers (stacked), or side by side as "
        "labelled lines (lines)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="start the question as a run that goes on without aish: prints its id (aish attach RUN)",
    )
    parser.add_argument(
        "--after", type=int, default=-1, metavar="SEQ", help="aish attach: only the frames after this seq"
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "words",
        nargs="*",
        help="`list`, `sessions ...`, `runs`, `attach RUN`, `cancel RUN`, or a specialist and a question",
    )
    return parser


def _options(args: argparse.Namespace) -> ChatOptions:
    return ChatOptions(max_tokens=args.max_tokens, temperature=args.temperature)


async def cmd_list(bus: Bus, renderer: Renderer, capability: str | None = None) -> int:
    """Running specialists with capabilities, replicas and health; with ``capability``, ranked for it."""
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
    for v in views:
        caps = ", ".join(f"{c} {s:.2f}" for c, s in sorted(v.capabilities.items(), key=lambda kv: -kv[1]))
        renderer.token(f"{v.name:<12} x{len(v.instances)} health {v.health:.2f}  {v.model:<28} {caps}\n")
        for conflict in v.conflicts:
            renderer.note(f"  {v.name}: {conflict}")
    return 0


async def run_once(
    settings: TektonSettings, pipeline: Pipeline, args: argparse.Namespace, stdin_text: str | None
) -> int:
    renderer = Renderer()
    async with Bus.connect(settings, name="aish") as bus:
        if args.detach:
            return await runs.detach(bus, pipeline, _options(args), renderer)
        session = await sessions.resolve(bus, args.session, args.resume, renderer)
        await run_pipeline(
            bus,
            pipeline,
            renderer,
            stdin_text=stdin_text,
            options=_options(args),
            session=session,
            layout=args.layout,
        )
    return 0


async def run_bulk(settings: TektonSettings, args: argparse.Namespace, files: Sequence[str]) -> int:
    if len(files) != 1:
        raise BadRequest("usage: aish bulk PLAN.yaml (or .json)")
    plan = load_plan(files[0])
    async with Bus.connect(settings, name="aish") as bus:
        await run_plan(bus, plan, [op.id for op in plan.operations], Renderer(), layout=args.layout)
    return 0


async def run_sessions(settings: TektonSettings, argv: Sequence[str]) -> int:
    async with Bus.connect(settings, name="aish") as bus:
        return await sessions.run(bus, argv, Renderer())


async def run_runs(settings: TektonSettings, args: argparse.Namespace) -> int:
    """`aish runs`, `aish attach RUN [--after SEQ]`, `aish cancel RUN`."""
    verb, words, renderer = args.words[0], args.words[1:], Renderer()
    if verb == "runs" and words:
        raise runs.UsageError("usage: aish runs")
    async with Bus.connect(settings, name="aish") as bus:
        if verb == "attach":
            return await runs.attach(bus, words, args.after, renderer)
        if verb == "cancel":
            return await runs.cancel(bus, words, renderer)
        return await runs.list_runs(bus, renderer)


async def run_list(settings: TektonSettings, capability: str | None) -> int:
    async with Bus.connect(settings, name="aish") as bus:
        return await cmd_list(bus, Renderer(), capability)


def _pipeline_from_words(words: Sequence[str], capability: str | None = None) -> Pipeline:
    """`aish apollo "question"`: the shell already did the quoting, so no second parse of the text.

    `aish "question"` (no specialist named) and `aish --capability X "question"` are routed.
    """
    if capability is not None:
        return Pipeline(None, (Ask((Target(capability, 1, True),), " ".join(words) or None, 1),), None)
    head = words[0]
    if not NAME_RE.match(head) and not head.startswith("@"):
        return Pipeline(None, (Ask((Target(AUTO, 1, True),), " ".join(words), 1),), None, " ".join(words))
    if len(words) == 1 or not head.startswith("@"):
        parsed = parse(head)  # validates the name (or @capability) with a clear error
        if len(parsed.stages) != 1 or parsed.source or parsed.redirect:
            raise PipelineSyntaxError("use -c for a pipeline: aish -c '...'", 1, head)
        target: Target = parsed.stages[0].targets[0]
    else:
        target = parse(head).stages[0].targets[0]
    message = " ".join(words[1:]) or None
    return Pipeline(None, (Ask((target,), message, 1),), None, " ".join(words))


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    args.pipeline = " ".join(args.words) if args.command else None
    if args.command and not args.words:
        build_parser().error("-c needs a pipeline: aish -c 'echo \"text\" | apollo'")
    if rest and not (args.words and args.words[0] == "sessions"):
        build_parser().parse_args(argv)  # the usual usage error for unknown options
    configure_logging(args.log_level)
    renderer = Renderer()
    try:
        settings = load_settings(
            nats_url=args.nats_url, idle_timeout_s=args.idle_timeout, request_timeout_s=args.timeout
        )
        if args.pipeline is None and args.words and args.words[0] == "list":
            return anyio.run(run_list, settings, args.capability)
        if args.pipeline is None and args.words and args.words[0] in ("runs", "attach", "cancel"):
            if args.detach:
                raise runs.UsageError('--detach starts a question: aish --detach apollo "long job"')
            return anyio.run(run_runs, settings, args)
        if args.pipeline is None and args.words and args.words[0] == "bulk":
            return anyio.run(run_bulk, settings, args, args.words[1:])
        if args.pipeline is None and args.words and args.words[0] == "sessions":
            return anyio.run(run_sessions, settings, [*args.words[1:], *rest])
        if args.pipeline is None and not args.words:
            if sys.stdin.isatty():
                return anyio.run(repl, settings, args)
            renderer.error("nothing to run: aish -c 'PIPELINE', aish NAME \"question\", or aish list")
            return EXIT_USAGE
        pipeline = (
            parse(args.pipeline)
            if args.pipeline is not None
            else _pipeline_from_words(args.words, args.capability)
        )
        stdin_text = None
        if pipeline.source is None and not sys.stdin.isatty():
            stdin_text = sys.stdin.read() or None
        return anyio.run(run_once, settings, pipeline, args, stdin_text)
    except PipelineSyntaxError as err:
        renderer.error(err.render())
        return EXIT_USAGE
    except runs.UsageError as err:
        renderer.error(str(err))
        return EXIT_USAGE
    except BusError as err:
        renderer.end_answer()
        renderer.error(str(err))
        return EXIT_ERROR
    except KeyboardInterrupt:
        renderer.end_answer()
        renderer.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`aish list | head`): stop quietly, like other Unix tools.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
