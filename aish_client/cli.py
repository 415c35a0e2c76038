"""`aish`: one-shot pipelines (`aish -c '...'`, `aish apollo "question"`), `aish list`, and a REPL."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

# First: nats-py and structlog load without their optional extras (aiohttp, rich).
import aish_client.lean_imports  # noqa: F401
from aish_client import runs, sessions
from aish_client.completion import SUBCOMMANDS, roster_names
from aish_client.exits import EXIT_ERROR, EXIT_USAGE, HANDLED, exit_code_for, json_error
from aish_client.logbook import Logbook, open_logbook
from aish_client.parser import AUTO, Ask, Pipeline, PipelineSyntaxError, Target, parse
from aish_client.prompt_parts import attachments, chat_options, check_model
from aish_client.questions import unquoted_question
from aish_client.render import Renderer
from aish_client.runner import compose, run_pipeline
from aish_client.subcommands import cmd_list, run_subcommand, version
from bus import tracing
from bus.argparsing import OneLineParser, log_level, number
from bus.client import Bus
from bus.errors import BusError, DeadlineExceeded, GatewayUnavailable, SpecialistUnavailable
from bus.logs import configure_logging
from bus.settings import TektonSettings, load_settings
from bus.subjects import NAME_RE
from bus.wire import ChatOptions

__all__ = ["cmd_list", "main"]

BUILTINS = ("list", "help")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="aish",
        description="Talk to Tekton's AI specialists: aish -c 'echo \"text\" | apollo | athena'",
        epilog="subcommands (each with its own -h): " + ", ".join(SUBCOMMANDS),
        add_help=add_help,
        # The pass that finds a subcommand must not read its options as abbreviations of ours
        # (`sessions fork X --at 2` is not --attach).
        allow_abbrev=add_help,
    )
    parser.add_argument("--version", action="version", version=version("aish"))
    parser.add_argument(
        "-m",
        "--model",
        help="the model to answer with, PROVIDER:MODEL (ollama:qwen2.5:7b, "
        "anthropic:claude-3-5-haiku-latest, openai:gpt-4o-mini); `tekton models` lists them",
    )
    parser.add_argument("--system", help="a system prompt for this request (after the specialist's persona)")
    parser.add_argument(
        "-o",
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a request option: max_tokens, temperature, top_p, repeat_penalty, seed (repeatable)",
    )
    parser.add_argument(
        "-f",
        "--attach",
        dest="attach",
        action="append",
        default=[],
        metavar="FILE",
        help="add a file's text to the question (globs too: -f 'src/*.py'; 256 KiB a file, 512 KiB in all)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per event on stdout (docs/aish-json.md)"
    )
    parser.add_argument("--no-log", action="store_true", help="do not record this in the log (aish logs)")
    parser.add_argument(
        "-c",
        dest="command",
        action="store_true",
        help="the words are one pipeline: run it and exit (aish -c 'echo \"x\" | apollo | athena')",
    )
    parser.add_argument(
        "--nats",
        dest="nats_url",
        help="NATS URL, or a cluster's, comma-separated (default $TEKTON_NATS_URL or nats://127.0.0.1:4222)",
    )
    parser.add_argument("--max-tokens", type=number(int, 1, 1_000_000), help="cap each answer at N tokens")
    parser.add_argument("--temperature", type=number(float, 0, 2), help="0 to 2")
    parser.add_argument(
        "--timeout", type=number(float, 0, 86_400, low_open=True), help="deadline of the whole run, seconds"
    )
    parser.add_argument(
        "--idle-timeout",
        type=number(float, 0, 86_400, low_open=True),
        help="give up after N s without a token or heartbeat",
    )
    parser.add_argument(
        "--creds", help="credentials file (default $TEKTON_CREDS, else tekton's local user's)"
    )
    parser.add_argument("--tls-ca", help="CA certificate to verify the server with (tls:// URLs)")
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
    parser.add_argument("--log-level", type=log_level, default="warning")
    parser.add_argument(
        "words",
        nargs="*",
        help='`list`, `sessions ...`, `route "question"` (who would answer it, and why), `runs`, '
        "`attach RUN`, `cancel RUN`, or a specialist name and a question",
    )
    return parser


def _options(args: argparse.Namespace) -> ChatOptions:
    return chat_options(args.options, max_tokens=args.max_tokens, temperature=args.temperature)


def logbook(settings: TektonSettings, args: argparse.Namespace) -> Logbook | None:
    return open_logbook(settings.data_dir, off=getattr(args, "no_log", False))


def renderer_for(settings: TektonSettings, args: argparse.Namespace) -> Renderer:
    """The renderer of an answer: --json events, or markdown and a footer on a terminal."""
    return Renderer.for_answers(settings.data_dir, bool(getattr(args, "json", False)))


async def _run(
    bus: Bus,
    pipeline: Pipeline,
    args: argparse.Namespace,
    renderer: Renderer,
    stdin_text: str | None,
    session: str | None,
    settings: TektonSettings,
) -> None:
    """One run of ``pipeline`` with the command line's options."""
    await run_pipeline(
        bus,
        pipeline,
        renderer,
        stdin_text=stdin_text,
        options=_options(args),
        session=session,
        layout=args.layout,
        model=args.model,
        system=args.system,
        logbook=logbook(settings, args),
        # The specialist's own deadline backs ours up (when this process is gone), a second
        # later, so the whole run's deadline is the one that speaks.
        deadline_s=args.timeout + 1.0 if args.timeout else None,
    )


def _as_question(
    err: SpecialistUnavailable, args: argparse.Namespace, roster: Sequence[str]
) -> Pipeline | None:
    """`aish what is a mutex`: the shell's words, whose first names no specialist of the roster or
    running (nor one close to a running one: a typo keeps its "did you mean"), are a question, routed
    as `aish "what is a mutex"` would be. Only for words given as they are (not -c, --capability)."""
    words = args.words
    if args.pipeline is not None or args.capability or len(words) < 2 or err.name != words[0]:
        return None
    if words[0] in roster:  # a specialist that is not running: its own error says so
        return None
    line = " ".join(words)
    if not unquoted_question(line, err.running or [], (*SUBCOMMANDS, "echo")):
        return None
    return Pipeline(None, (Ask((Target(AUTO, 1, True),), line, 1),), None, line)


async def run_once(
    settings: TektonSettings, pipeline: Pipeline, args: argparse.Namespace, stdin_text: str | None
) -> int:
    renderer = renderer_for(settings, args)
    try:
        # --timeout bounds the whole run; leaving the stream's block cancels it on the specialist.
        with anyio.move_on_after(args.timeout) as deadline:
            async with Bus.connect(settings, name="aish") as bus:
                if args.detach:
                    return await runs.detach(bus, pipeline, _options(args), renderer)
                session = await sessions.resolve(bus, args.session, args.resume, renderer)
                try:
                    await _run(bus, pipeline, args, renderer, stdin_text, session, settings)
                except SpecialistUnavailable as err:
                    question = _as_question(err, args, roster_names(settings.roster))
                    if question is None:
                        raise
                    renderer.note(
                        f"{err.name}: no specialist or command of that name, so the words are a question"
                        " (routed)"
                    )
                    try:
                        await _run(bus, question, args, renderer, stdin_text, session, settings)
                    except GatewayUnavailable:
                        raise err from None  # nothing routes here: the name's own error says more
        if deadline.cancelled_caught:
            raise DeadlineExceeded(
                f"no complete answer within --timeout {args.timeout:g} s; stopped the request"
            )
    except BusError as err:
        json_error(renderer, err)
        raise
    return 0


def _pipeline_from_words(words: Sequence[str], capability: str | None = None) -> Pipeline:
    """`aish apollo "question"`: the shell already did the quoting, so no second parse of the text.

    `aish "question"` (no specialist named) and `aish --capability X "question"` are routed.
    """
    if capability is not None:
        return Pipeline(None, (Ask((Target(capability, 1, True),), " ".join(words) or None, 1),), None)
    if not words:  # only -f files: routed by their text
        return Pipeline(None, (Ask((Target(AUTO, 1, True),), None, 1),), None)
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
    # A subcommand (`aish sessions -h`, `aish logs -n 3`) takes the words after it, with its own help.
    args, rest = build_parser(add_help=False).parse_known_args(argv)
    if not args.command and args.words and args.words[0] in SUBCOMMANDS:
        configure_logging(args.log_level)
        return run_subcommand(args.words[0], [*args.words[1:], *rest], args)
    args, rest = build_parser().parse_known_args(argv)
    args.pipeline = " ".join(args.words) if args.command else None
    if args.command and not args.words:
        build_parser().error("-c needs a pipeline: aish -c 'echo \"text\" | apollo'")
    if args.resume and args.session is not None:
        # Both name the session to talk in: taking either one would put the turn where it was not meant.
        build_parser().error("give --continue (the most recent session) or --session ID|NAME, not both")
    if rest:
        build_parser().parse_args(argv)  # the usual usage error for unknown options
    configure_logging(args.log_level)
    tracing.configure("aish")
    renderer = Renderer()
    try:
        if sys.stdout is None:  # `aish ... >&-`
            renderer.error("standard output is closed: nowhere to write the answer (redirect it to a file)")
            return EXIT_ERROR
        settings = load_settings(
            nats_url=args.nats_url, idle_timeout_s=args.idle_timeout, creds=args.creds, tls_ca=args.tls_ca
        )
        _options(args)  # a bad -o value is a usage error before anything connects
        check_model(args.model)
        attached = attachments(args.attach)
        if args.pipeline is None and not args.words and not attached:
            if sys.stdin.isatty():
                from aish_client.repl import repl  # prompt_toolkit: only the REPL pays for it

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
        if attached:  # after what was piped in, as `cat x | llm -f y` does
            stdin_text = compose(stdin_text, attached)
        return anyio.run(run_once, settings, pipeline, args, stdin_text)
    except HANDLED as err:
        return exit_code_for(err, renderer)


if __name__ == "__main__":
    sys.exit(main())
