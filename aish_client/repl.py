"""The aish REPL: pipelines at a prompt-toolkit prompt, answers streamed as they arrive.

Tokens are printed while no prompt is on screen (the prompt is redrawn after the answer), so there is
no stdout proxy buffering them to newlines. Ctrl-C during an answer cancels it on the specialist;
Ctrl-C at the prompt clears the line; Ctrl-D exits.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import HTML
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import create_output
from prompt_toolkit.shortcuts import clear

from aish_client import sessions
from aish_client.fanout import Layout
from aish_client.logbook import Logbook
from aish_client.parser import PipelineSyntaxError, parse, tokenize
from aish_client.prompt_parts import chat_options
from aish_client.questions import question_pipeline, unquoted_question
from aish_client.render import Renderer
from aish_client.runner import run_pipeline
from aish_client.subcommands import cmd_list
from bus.client import Bus
from bus.errors import BusError, GatewayUnavailable
from bus.settings import TektonSettings

BUILTINS = {
    "help": "this help",
    "list": "running specialists (list CAP: ranked for a capability)",
    "history": "numbered history; !N runs entry N, !! the last one",
    "session": "the current session; session new [NAME], session switch ID|NAME, session list, session off",
    "clear": "clear the screen",
    "exit": "leave (or Ctrl-D)",
}
# What the REPL reads as a command, not as a question.
COMMANDS = (*BUILTINS, "echo", "exit", "quit")
HELP = """Pipelines:  apollo "question"   echo "text" | apollo | athena   apollo,athena << "msg"
            {apollo|athena} | prometheus   @code-analysis << "msg"   "any question" (routed)
            what is a mutex?   (a line that starts with no specialist or command: routed too)
            ... > file   ... >> file   apollo -m ollama:qwen2.5:7b "question" (a model per stage)
Keys:       Tab completes names, @capabilities, sessions, paths after >   Ctrl-R searches history
            a line ending in | , { << or \\ continues on the next line   Ctrl-C cancels an answer"""


def needs_more(text: str, specialists: Sequence[str] = ()) -> bool:
    """Whether Enter should continue the input on a new line instead of running it (a plain question's
    apostrophe opens no quote)."""
    stripped = text.rstrip()
    if not stripped:
        return False
    if stripped.endswith(("|", ",", "{", "<<", "\\")):
        return True
    if unquoted_question(text, specialists):
        return False
    try:
        tokens = tokenize(text.replace("\\\n", " "))
    except PipelineSyntaxError as err:
        return "unterminated" in str(err)
    depth = sum(
        1 if t.text == "{" and not t.quoted else -1 if t.text == "}" and not t.quoted else 0 for t in tokens
    )
    return depth > 0


class AishCompleter(Completer):
    """Specialist names, @capabilities, session names and ids, built-ins, and paths after > / >>."""

    def __init__(self, repl: Repl):
        self.repl = repl
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        before = document.text_before_cursor
        word = document.get_word_before_cursor(WORD=True)
        head = before[: len(before) - len(word)].rstrip()
        if head.endswith(">"):
            yield from self.paths.get_completions(Document(word, len(word)), complete_event)
            return
        if head.startswith("session") and "|" not in head:
            candidates: Iterable[str] = self.repl.session_names
        elif word.startswith("@"):
            candidates = ["@auto", *(f"@{c}" for c in self.repl.capabilities)]
        elif not head:
            candidates = [*BUILTINS, *self.repl.specialists, "echo"]
        elif head.endswith(("|", ",", "{")):
            candidates = self.repl.specialists
        else:
            return
        for candidate in sorted(set(candidates)):
            if candidate.startswith(word) and candidate != word:
                yield Completion(candidate, start_position=-len(word))


class Repl:
    def __init__(self, settings: TektonSettings, args: argparse.Namespace):
        self.settings = settings
        self.args = args
        self.renderer = Renderer()
        self.renderer.footers = True
        self.renderer.notes_dir = settings.data_dir
        self.renderer.render_markdown()
        self.logbook = None if getattr(args, "no_log", False) else Logbook(settings.data_dir / "logs.db")
        self.specialists: list[str] = []
        self.capabilities: list[str] = []
        self.session_names: list[str] = []
        self.session: str | None = None
        self.session_label = ""
        self.bus: Bus | None = None
        self._current: asyncio.Future[Any] | None = None
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.history = FileHistory(str(settings.data_dir / "aish_history"))
        # The prompt needs a terminal: when stdout is a file or a pipe, answers go there and the prompt
        # to stderr.
        output = None if sys.stdout.isatty() else create_output(stdout=sys.stderr)
        self.prompt: PromptSession[str] = PromptSession(
            history=self.history,
            completer=AishCompleter(self),
            key_bindings=self._keys(),
            bottom_toolbar=self._toolbar,
            refresh_interval=0.5,
            output=output,
        )

    def _keys(self) -> KeyBindings:
        keys = KeyBindings()

        @keys.add("enter")
        def _(event: KeyPressEvent) -> None:
            buffer = event.current_buffer
            if needs_more(buffer.text, self.specialists):
                buffer.insert_text("\n")
            else:
                buffer.validate_and_handle()

        @keys.add("c-c")
        def _(event: KeyPressEvent) -> None:
            event.current_buffer.reset()  # Ctrl-C at the prompt clears the line

        return keys

    def _toolbar(self) -> HTML:
        nc = self.bus.nc if self.bus else None
        if nc is None or nc.is_reconnecting or not nc.is_connected:
            link = "<style bg='ansired'> NATS disconnected: reconnecting… </style>"
        else:
            link = f"NATS {self.settings.nats_url}"
        talk = f"session {self.session_label}" if self.session else "no session"
        return HTML(f" {link} · {talk} · {len(self.specialists)} specialists · Tab completes · Ctrl-D exits")

    async def refresh_names(self, sessions: bool = True) -> None:
        """What completion offers: refreshed before each prompt (a few ms on the bus)."""
        assert self.bus is not None
        try:
            try:  # the gateway's catalog is refreshed all the time and forgives a late answer
                views = (await self.bus.gateway.discover()).specialists
            except GatewayUnavailable:
                views = await self.bus.survey()
        except Exception:  # disconnected: keep what we had
            return
        self.specialists = [v.name for v in views]
        self.capabilities = sorted({c for v in views for c in v.capabilities})
        if not sessions:
            return
        try:
            listed = await self.bus.gateway.list(limit=200)
        except BusError:
            return
        self.session_names = [*(s.name for s in listed if s.name), *(s.id for s in listed)]

    async def run(self) -> int:
        note = self.renderer.note
        note('aish: type a pipeline (echo "text" | apollo | athena), `help` for more; Ctrl-D to exit')
        async with Bus.connect(self.settings, name="aish") as bus:
            self.bus = bus
            await self._start_session()
            await self.refresh_names()  # completion works from the first prompt
            loop = asyncio.get_running_loop()
            # Ctrl-C outside the prompt (the terminal is not in raw mode then) arrives as SIGINT: it
            # cancels the answer being streamed, if any, and never kills the REPL.
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._spin)
                    tg.start_soon(self._keep_names_fresh)
                    try:
                        code = await self._loop()
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                loop.remove_signal_handler(signal.SIGINT)
        return code

    def _interrupt(self) -> None:
        if self._current is not None:
            self._current.cancel()

    async def _keep_names_fresh(self) -> None:
        for round_ in itertools.count(1):
            await anyio.sleep(2)
            # New specialists show up within 2 s; session names change rarely: list them every 30 s.
            await self.refresh_names(sessions=round_ % 15 == 0)

    async def _start_session(self) -> None:
        """The REPL talks in one session, so follow-up questions keep their context."""
        assert self.bus is not None
        given = self.args.session if self.args.session is not None or self.args.resume else sessions.NEW
        try:
            self._use(await sessions.resolve(self.bus, given, self.args.resume, self.renderer))
        except GatewayUnavailable:
            self.renderer.note("no gateway running: answers will not remember earlier ones (no session)")

    def _use(self, session_id: str | None, label: str | None = None) -> None:
        self.session = session_id
        self.session_label = label or (session_id[:8] if session_id else "")

    async def _spin(self) -> None:
        while True:
            await anyio.sleep(0.1)
            self.renderer.tick()

    async def _loop(self) -> int:
        while True:
            try:
                line = (await self.prompt.prompt_async("aish> ", handle_sigint=False)).strip()
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            if not line:
                continue
            if line in ("exit", "quit"):
                return 0
            expanded = self._expand(line)
            if expanded is not None:
                await self._run_line(expanded)

    def _expand(self, line: str) -> str | None:
        """`!N` / `!!`: an earlier line, shown before it runs."""
        if not line.startswith("!"):
            return line
        entries = self.history.get_strings()[:-1]  # oldest first, without this `!N`
        try:
            picked = entries[-1] if line == "!!" else entries[int(line[1:]) - 1]
        except (ValueError, IndexError):
            self.renderer.error(f"{line}: no such history entry (see `history`)")
            return None
        self.renderer.note(picked)
        return picked

    async def _run_line(self, line: str) -> None:
        word = line.split(maxsplit=1)[0]
        builtin: dict[str, Callable[[list[str]], Awaitable[None]]] = {
            "help": self._help,
            "list": self._list,
            "history": self._history,
            "session": self._session,
            "clear": self._clear,
        }
        if word in builtin:
            try:
                await builtin[word](shlex.split(line)[1:])
            except (BusError, ValueError) as err:
                self.renderer.error(str(err))
            return
        if unquoted_question(line, self.specialists, COMMANDS):
            # A question typed as it is: routed like a quoted one, the whole line its text.
            pipeline = question_pipeline(line.replace("\\\n", " "))
            self.renderer.note(
                f"{word}: no specialist or command of that name, so the line is a question (routed)"
            )
        else:
            try:
                pipeline = parse(line.replace("\\\n", " "))
            except PipelineSyntaxError as err:
                self.renderer.error(err.render())
                return
        await self._cancellable(
            run_pipeline(
                self.bus,  # type: ignore[arg-type]
                pipeline,
                self.renderer,
                options=chat_options(
                    getattr(self.args, "options", []),
                    max_tokens=self.args.max_tokens,
                    temperature=self.args.temperature,
                ),
                session=self.session,
                layout=self._layout(),
                model=getattr(self.args, "model", None),
                system=getattr(self.args, "system", None),
                logbook=self.logbook,
                deadline_s=self.args.timeout,
            )
        )

    def _layout(self) -> Layout:
        layout: Layout = self.args.layout
        return layout

    async def _cancellable(self, work: Awaitable[Any]) -> None:
        """Run ``work``; Ctrl-C cancels it (and so the answer on the specialist) and returns here."""
        task = self._current = asyncio.ensure_future(work)
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            self.renderer.end_answer()
            self.renderer.note("cancelled")
        except BusError as err:
            self.renderer.end_answer()
            self.renderer.error(str(err))
        finally:
            self._current = None

    async def _help(self, _: list[str]) -> None:
        self.renderer.token(HELP + "\n")
        for name, what in BUILTINS.items():
            self.renderer.token(f"  {name:<8} {what}\n")

    async def _list(self, args: list[str]) -> None:
        assert self.bus is not None
        await cmd_list(self.bus, self.renderer, args[0].lstrip("@") if args else None)

    async def _history(self, _: list[str]) -> None:
        entries = self.history.get_strings()[:-1]  # without this `history`
        for n, entry in list(enumerate(entries, start=1))[-20:]:
            self.renderer.token(f"{n:>4}  {entry}\n")

    async def _session(self, args: list[str]) -> None:
        assert self.bus is not None
        op = args[0] if args else "show"
        if op == "show":
            if self.session is None:
                self.renderer.note("no session (session new starts one)")
                return
            await sessions.run(self.bus, ["show", self.session], self.renderer)
        elif op == "new":
            created = await self.bus.gateway.create(name=args[1] if len(args) > 1 else None)
            self._use(created.id, created.name)
            self.renderer.note(f"now in session {sessions.label(created)}")
        elif op == "list":
            await sessions.run(self.bus, ["list"], self.renderer)
        elif op == "off":
            self._use(None)
            self.renderer.note("no session: answers will not remember earlier ones")
        else:
            ref = args[1] if op == "switch" and len(args) > 1 else op
            found = await self.bus.gateway.get(ref)
            self._use(found.id, found.name)
            self.renderer.note(f"now in session {sessions.label(found)}")

    async def _clear(self, _: list[str]) -> None:
        clear()


async def repl(settings: TektonSettings, args: argparse.Namespace) -> int:
    return await Repl(settings, args).run()
