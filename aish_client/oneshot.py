"""`aish`'s entry point, and its light first-request path: `aish NAME "question"` in a blink.

The common one-shot (`aish NAME "question"`, `echo x | aish NAME`, with `-m`, `--system`, `--json`,
`--no-log`, `--timeout`, `--max-tokens`, `--temperature`, `--nats`) is asked over bus/lite.py with
msgpack, without importing nats-py, pydantic, structlog or asyncio (their import alone is several times
the whole budget). It prints what the full path prints (the same Renderer and Logbook, the same errors
and exit codes) and hands everything else to aish_client.cli: other options and subcommands, pipelines,
sessions, the REPL, several servers or ws:// URLs, settings it does not read itself, and any surprise
before the answer starts (no such specialist, a server it cannot sign in to, a lost frame), which the
full client then reports with its did-you-mean. ``TEKTON_AISH_FAST=0`` always takes the full path.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from bus.places import default_data_dir

if TYPE_CHECKING:
    from aish_client.render import Renderer
    from bus.lite import LiteConnection

# Words that are not a specialist's name (subcommands, builtins): the full path.
NOT_NAMES = frozenset(
    {"list", "help", "route", "echo", "bulk", "sessions", "logs", "completion", "usage", "runs", "attach"}
    | {"cancel"}
)
# A routed request asked again of a named specialist within this long corrects the routing
# (aish_client/routes.py, which reads it here): such a rerun takes the full path.
RERUN_WINDOW_S = 600.0
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def compose(message: str | None, piped: str | None) -> str:
    """A stage's prompt: its own message, then the text piped into it."""
    parts = [p for p in (message, piped) if p]
    return "\n\n".join(parts)


class Handover(Exception):
    """Not for this path: the full client takes the command (nothing has been printed)."""


# Plain classes, not dataclasses: dataclasses (and inspect under them) cost more to import and define
# than this whole module.


class Ask:
    """The one-shot's command line."""

    def __init__(self) -> None:
        self.name = ""
        self.message: str | None = None
        self.model: str | None = None
        self.system: str | None = None
        self.json = False
        self.no_log = False
        self.timeout: float | None = None
        self.nats_url: str | None = None
        self.options: dict[str, Any] = {}


def _number(text: str, kind: type, low: float, high: float, low_open: bool = False) -> Any:
    value = kind(text)  # ValueError: the full path says what is wrong
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        raise ValueError(text)
    return value


_VALUED = ("-m", "--model", "--system", "--timeout", "--nats", "--max-tokens", "--temperature")


def plan(argv: Sequence[str]) -> Ask | None:
    """The one-shot ``argv`` asks for, if this path takes it exactly as the full parser would; else None."""
    from bus.frames import MODEL_RE
    from bus.subjects import NAME_RE

    words: list[str] = []
    words_ended = False
    ask = Ask()
    it = iter(argv)
    try:
        for arg in it:
            if not arg.startswith("-") or arg == "-":
                if words and words_ended:
                    return None  # argparse takes one run of words: the rest would be a usage error
                words.append(arg)
                continue
            words_ended = bool(words)
            opt, eq, value = arg.partition("=")
            if eq and not opt.startswith("--"):
                return None  # `-m=x` is "=x" to argparse
            if opt in ("--json", "--no-log"):
                if eq:
                    return None
                setattr(ask, opt[2:].replace("-", "_"), True)
                continue
            if opt not in _VALUED:
                return None  # anything else (abbreviations too) is the full parser's
            if not eq:
                value = next(it)
                if value.startswith("-"):
                    return None
            if opt in ("-m", "--model"):
                if not MODEL_RE.match(value):
                    return None
                ask.model = value
            elif opt == "--system":
                ask.system = value
            elif opt == "--nats":
                ask.nats_url = value
            elif opt == "--timeout":
                ask.timeout = _number(value, float, 0, 86_400, low_open=True)
            elif opt == "--max-tokens":
                ask.options["max_tokens"] = _number(value, int, 1, 1_000_000)
            else:
                ask.options["temperature"] = _number(value, float, 0, 2)
    except (StopIteration, ValueError, OverflowError):
        return None
    if not words or not NAME_RE.match(words[0]) or words[0] in NOT_NAMES:
        return None
    ask.name, ask.message = words[0], " ".join(words[1:]) or None
    return ask


class Settings:
    """The few settings a one-shot reads (bus/settings.py's names and defaults)."""

    def __init__(self) -> None:
        self.nats_url = "nats://127.0.0.1:4222"
        self.prefix = "tekton"
        self.data_dir = default_data_dir()
        self.idle_timeout_s = 10.0
        self.creds: Path | None = None
        self.tls_ca: Path | None = None


_READ = {"nats_url", "prefix", "data_dir", "idle_timeout_s", "creds", "tls_ca"}
# Read by other processes only; a one-shot checks just their type, as loading all settings would.
_OTHERS_STR = {"model", "provider"}
_OTHERS_POSITIVE = {"heartbeat_s"}
_NOT_SETTINGS = {"TEKTON_CONFIG", "TEKTON_AISH_FAST"}


def load(nats_url: str | None) -> Settings | None:
    """Settings as bus.settings.load_settings would load them (arguments, environment, config file), or
    None when they hold anything this path does not read itself (the full path then loads and checks all)."""
    from bus.places import config_file
    from bus.subjects import validate_prefix

    given: dict[str, Any] = {}
    path = config_file()
    file: dict[str, Any] = {}
    if path.exists():
        import tomllib

        try:
            file = tomllib.loads(path.read_text())
        except (OSError, ValueError):
            return None
    for key, value in file.items():
        if key in _OTHERS_STR and isinstance(value, str):
            continue
        if (
            key == "providers"
            and isinstance(value, dict)
            and all(isinstance(v, dict) for v in value.values())
        ):
            continue
        if key not in _READ | _OTHERS_POSITIVE or isinstance(value, dict | list | bool):
            return None
        given[key] = value
    for name, value in os.environ.items():
        if not name.upper().startswith("TEKTON_") or name in _NOT_SETTINGS:
            continue
        key = name[len("TEKTON_") :]
        if name != name.upper() or key.lower() not in _READ | _OTHERS_POSITIVE:
            return None
        given[key.lower()] = value
    if nats_url is not None:
        given["nats_url"] = nats_url
    try:
        settings = Settings()
        for key, value in given.items():
            if key in _OTHERS_POSITIVE:
                if not float(value) > 0:
                    return None
                continue
            if key == "idle_timeout_s":
                value = float(value)
                if not value > 0:
                    return None
            elif key == "prefix":
                value = validate_prefix(str(value))
            elif key in ("data_dir", "creds", "tls_ca"):
                value = Path(str(value))
            setattr(settings, key, str(value) if key == "nats_url" else value)
    except (ValueError, TypeError):
        return None
    return settings


class _Start:
    """A start frame's fields (bus.wire.StartFrame's names)."""

    def __init__(self, specialist: str, instance: str, provider: str, model: str):
        self.specialist, self.instance, self.provider, self.model = specialist, instance, provider, model


class _Usage:
    def __init__(self, prompt_tokens: int | None, completion_tokens: int, cost: float | None):
        self.prompt_tokens, self.completion_tokens, self.cost = prompt_tokens, completion_tokens, cost

    def model_dump(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
        }


class _Timings:
    def __init__(self, first_token_ms: float | None, total_ms: float, tokens_per_s: float | None):
        self.first_token_ms, self.total_ms, self.tokens_per_s = first_token_ms, total_ms, tokens_per_s

    def model_dump(self) -> dict[str, Any]:
        return {
            "first_token_ms": self.first_token_ms,
            "total_ms": self.total_ms,
            "tokens_per_s": self.tokens_per_s,
        }


class _Done:
    def __init__(self, finish_reason: str, usage: _Usage, timings: _Timings):
        self.finish_reason, self.usage, self.timings = finish_reason, usage, timings


class _Tool:
    """A tool_call or tool_result frame's fields, for Renderer.tool."""

    def __init__(self, raw: dict[str, Any]):
        self.type, self.id = str(raw["type"]), str(raw["id"])
        if self.type == "tool_call":
            self.server, self.tool = str(raw["server"]), str(raw["tool"])
            self.arguments = dict(raw.get("arguments") or {})
        else:
            self.text, self.is_error = str(raw["text"]), bool(raw.get("is_error", False))


def _int(value: Any) -> int:
    if type(value) is int or (type(value) is float and value.is_integer()):
        return int(value)
    raise ValueError(value)


def _float(value: Any) -> float:
    if type(value) in (int, float):
        return float(value)
    raise ValueError(value)


def _opt(value: Any, convert: Any) -> Any:
    return None if value is None else convert(value)


def _str(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(value)
    return value


# The keys each frame may carry (bus.wire's models, which forbid others).
_KEYS = {
    "start": {"v", "type", "seq", "specialist", "instance", "provider", "model"},
    "done": {"v", "type", "seq", "finish_reason", "usage", "timings"},
    "error": {"v", "type", "seq", "code", "message", "retryable"},
    "heartbeat": {"v", "type", "seq"},
    "tool_call": {"v", "type", "seq", "id", "server", "tool", "arguments"},
    "tool_result": {"v", "type", "seq", "id", "text", "is_error"},
}


def _frame(raw: dict[str, Any]) -> _Start | _Done | _Tool | Exception | None:
    """A start, done, tool or error frame as the wire models would read it; None for a heartbeat.
    Raises ValueError/KeyError/TypeError for anything else."""
    kind = raw["type"]
    if not raw.keys() <= _KEYS[kind]:
        raise ValueError(f"{kind}: unexpected {sorted(raw.keys() - _KEYS[kind])}")
    if kind == "heartbeat":
        return None
    if kind == "start":
        return _Start(*(_str(raw[k]) for k in ("specialist", "instance", "provider", "model")))
    if kind == "done":
        usage, timings = raw["usage"], raw["timings"]
        if raw["finish_reason"] not in ("stop", "length"):
            raise ValueError(raw["finish_reason"])
        if not usage.keys() <= {"prompt_tokens", "completion_tokens", "cost"} or not timings.keys() <= {
            "first_token_ms",
            "total_ms",
            "tokens_per_s",
        }:
            raise ValueError("done: unexpected usage or timings")
        return _Done(
            raw["finish_reason"],
            _Usage(
                _opt(usage.get("prompt_tokens"), _int),
                _int(usage.get("completion_tokens", 0)),
                _opt(usage.get("cost"), _float),
            ),
            _Timings(
                _opt(timings.get("first_token_ms"), _float),
                _float(timings["total_ms"]),
                _opt(timings.get("tokens_per_s"), _float),
            ),
        )
    if kind == "error":
        from bus.errors import from_wire

        return from_wire(_str(raw["code"]), _str(raw["message"]), bool(raw.get("retryable", False)))
    return _Tool(raw)


class _Answer:
    """What the logbook reads of a stream and of its result (the names ChatStream and StreamResult use)."""

    def __init__(self, request_id: str):
        self.id = request_id
        self.start_frame: _Start | None = None
        self.parts: list[str] = []
        self.done: _Done | None = None

    @property
    def request(self) -> _Answer:
        return self

    @property
    def text(self) -> str:
        return "".join(self.parts)

    text_so_far = text

    @property
    def start(self) -> _Start | None:
        return self.start_frame


def chat_request(a: Ask, prompt: str, request_id: str) -> dict[str, Any]:
    """The request as the full path's ChatRequest encodes it (tests/test_oneshot.py compares the bytes)."""
    messages = [{"role": "user", "content": prompt}]
    if a.system:
        messages.insert(0, {"role": "system", "content": a.system})
    request: dict[str, Any] = {"v": 1, "id": request_id, "messages": messages, "options": a.options}
    if a.timeout:  # a second later than the whole run's, as the full path sends it
        request["timeout_ms"] = int((a.timeout + 1.0) * 1000)
    if a.model:
        request["model"] = a.model
    return request


class Deadline(BaseException):
    """--timeout passed (a BaseException, as the cancellation it stands for in the full path)."""


def ask(a: Ask, settings: Settings, stdin_text: str | None) -> int:
    """Ask ``a`` over bus/lite.py and show the answer as the full path would; raises Handover."""
    from aish_client.logbook import Logbook
    from aish_client.render import Renderer
    from bus.auth import find_credentials
    from bus.errors import BusError, DeadlineExceeded
    from bus.lite import LiteConnection, Unsupported, tls_context
    from bus.subjects import ANONYMOUS, cancel_subject, chat_subject, run_listen_subject, run_subject

    prompt = compose(a.message, stdin_text)
    if not prompt.strip():
        raise Handover
    last_route = settings.data_dir / "last_route.json"
    try:
        if time.time() - last_route.stat().st_mtime < RERUN_WINDOW_S:
            raise Handover  # maybe a rerun that corrects the routing
    except OSError:
        pass
    try:
        creds = find_credentials(settings.creds, settings.data_dir, "local")
        tls = tls_context(settings.nats_url, settings.tls_ca, settings.data_dir)
        conn = LiteConnection(settings.nats_url, name="aish", seed=creds.seed if creds else None, tls=tls)
    except (Unsupported, BusError, OSError) as err:
        raise Handover from err
    user = creds.user if creds else ANONYMOUS
    answer = _Answer(os.urandom(16).hex())  # as uuid4().hex, without importing uuid
    request = chat_request(a, prompt, answer.id)
    renderer = Renderer.for_answers(settings.data_dir, a.json)
    logbook = None if a.no_log else Logbook(settings.data_dir / "logs.db")
    stream = _Stream(conn, a, settings, answer, renderer)
    with conn:
        reply = run_subject(user, answer.id, settings.prefix)
        try:
            conn.subscribe(run_listen_subject(reply))
        except OSError as err:  # the server went away already
            raise Handover from err
        from bus.frames import pack_request

        try:
            payload = pack_request(request)
        except BusError as err:  # text that is not valid Unicode: the full path says so
            raise Handover from err
        if len(payload) > conn.max_payload:
            raise Handover  # the full path names both sizes
        try:
            try:
                stream.send(chat_subject(a.name, settings.prefix), payload, reply)
            except OSError as err:
                raise Handover from err
            stream.read()
        except BaseException as err:
            failure: BaseException = err
            if isinstance(err, Handover):
                if stream.sent:
                    _cancel(conn, cancel_subject(answer.id, user, settings.prefix))
                raise
            if stream.sent and answer.done is None:
                _cancel(conn, cancel_subject(answer.id, user, settings.prefix))
            if isinstance(err, Deadline):
                failure = DeadlineExceeded(
                    f"no complete answer within --timeout {a.timeout:g} s; stopped the request"
                )
            if logbook is not None and stream.sent:
                logbook.record_failure(
                    a.name,
                    a.model,
                    prompt,
                    a.system,
                    cast(Any, answer),
                    None,
                    err,  # a deadline is logged as the interruption it is
                )
            if isinstance(failure, BusError):
                if a.json:
                    renderer.event(
                        "error", code=str(failure.code), message=str(failure), retryable=failure.retryable
                    )
                Renderer().error(str(failure))
                return EXIT_ERROR
            if isinstance(failure, KeyboardInterrupt):
                Renderer().error("interrupted")
                return EXIT_INTERRUPTED
            raise
    stream.finish(logbook, prompt)
    return 0


def _cancel(conn: LiteConnection, subject: str) -> None:
    with contextlib.suppress(OSError):  # the connection is gone: nothing more to stop
        conn.publish(subject, b"", flush=True)


class _Stream:
    """One answer read frame by frame, shown by the stage output aish_client.runner uses."""

    def __init__(self, conn: LiteConnection, a: Ask, settings: Settings, answer: _Answer, renderer: Renderer):
        self.conn, self.a, self.settings, self.answer, self.renderer = conn, a, settings, answer, renderer
        self.sent = False
        self.sent_at = 0.0
        self.first_chunk_at: float | None = None
        self.deadline = time.monotonic() + a.timeout if a.timeout else None

    def send(self, subject: str, payload: bytes, reply: str) -> None:
        from aish_client.output import StageOutput

        self.output = StageOutput(self.renderer, self.a.name, True, None)
        self.sent_at = time.perf_counter()
        self.conn.publish(subject, payload, reply)
        self.sent = True

    def read(self) -> None:
        from bus.errors import IdleTimeout, MalformedFrame, StreamGap
        from bus.frames import chunk_fields, unpack_frame
        from bus.lite import Unsupported

        answer, expected, idle = self.answer, 0, self.settings.idle_timeout_s
        while answer.done is None:
            wait = idle
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.monotonic())
                if wait <= 0:
                    raise Deadline
            try:
                msg = self.conn.next_msg(wait)
            except TimeoutError:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise Deadline from None
                if not answer.parts:
                    raise Handover from None  # the full client asks again
                self._resume(IdleTimeout(self.a.name, idle), expected - 1)
                continue
            except (OSError, Unsupported) as err:  # the connection dropped, or the server said -ERR
                if not answer.parts:
                    raise Handover from None
                self._resume(err, expected - 1)
                continue
            if msg.subject.endswith(".p"):
                continue  # the specialist asking whether anyone still listens
            if msg.status or not msg.data:
                raise Handover  # no responders: the full client says who runs instead
            raw = unpack_frame(msg.data)
            chunk = chunk_fields(raw)
            if chunk is not None:
                seq, text = chunk
                if seq != expected:
                    if not answer.parts:
                        raise Handover
                    if seq > expected:
                        self._resume(StreamGap(expected, seq), expected - 1)
                    continue  # (a frame read already: skipped, as the full client does)
                expected += 1
                if self.first_chunk_at is None:
                    self.first_chunk_at = time.perf_counter()
                answer.parts.append(text)
                self.output.started(cast(Any, answer.start_frame))
                self.output.chunk(text)
                continue
            try:
                seq = raw["seq"]
                if raw.get("v", 1) != 1 or type(seq) is not int:
                    raise ValueError(seq)
                frame = _frame(raw)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                if not answer.parts:
                    raise Handover from err
                raise MalformedFrame(f"not a reply frame: {err}") from err
            if seq != expected:
                if not answer.parts:
                    raise Handover
                if seq > expected:
                    self._resume(StreamGap(expected, seq), expected - 1)
                continue
            expected += 1
            if isinstance(frame, _Start):
                answer.start_frame = frame
            elif isinstance(frame, _Done):
                answer.done = frame
            elif isinstance(frame, _Tool):
                self.renderer.tool(cast(Any, frame))
            elif isinstance(frame, Exception):
                raise frame

    def _resume(self, lost: BaseException, after: int) -> None:
        """Frames were lost after the answer began: the full client reads the rest of the run from the
        runs stream (docs/protocol.md, "Runs"), as ChatStream does by itself; ``lost`` stands when it
        cannot (the run is not kept, or no server comes back within the idle timeout)."""
        import anyio

        from bus.client import Bus
        from bus.errors import BusError, IdleTimeout, NatsUnavailable
        from bus.settings import load_settings

        settings = load_settings(nats_url=self.a.nats_url)
        answer, output = self.answer, self.output

        async def follow() -> None:
            waited = 0.0
            while True:  # a server restarting: the full client would have reconnected meanwhile
                try:
                    async with Bus.connect(settings, name="aish") as bus:
                        async with bus.attach(answer.id, after=after) as s:
                            self.renderer.note(
                                f"(the connection dropped frames; the answer goes on from frame {after + 1})"
                            )
                            async for text in s:
                                answer.parts.append(text)
                                output.chunk(text)
                        result = await s.result()
                    break
                except NatsUnavailable:
                    if waited >= self.settings.idle_timeout_s:
                        raise
                    await anyio.sleep(0.2)  # a reconnect's backoff
                    waited += 0.2
            answer.done = cast(Any, result.done)
            answer.start_frame = answer.start_frame or cast(Any, result.start)

        async def within_deadline() -> bool:
            with anyio.move_on_after(remaining) as scope:
                await follow()
            return scope.cancelled_caught

        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        try:
            timed_out = anyio.run(within_deadline)
        except BusError:
            if isinstance(lost, BusError):
                raise lost from None
            raise IdleTimeout(self.a.name, self.settings.idle_timeout_s) from None
        if timed_out:
            raise Deadline

    def finish(self, logbook: Any, prompt: str) -> None:
        answer = self.answer
        done, start = answer.done, answer.start_frame
        if done is None or start is None:
            from bus.errors import BusError

            raise BusError("the stream ended without a done frame")
        self.output.started(cast(Any, start))
        self.output.done(done.usage.completion_tokens)
        first_ms = (self.first_chunk_at - self.sent_at) * 1000 if self.first_chunk_at is not None else None
        if logbook is not None:
            logbook.record(self.a.name, prompt, self.a.system, answer, None, answer.id, first_ms)
        self.output.finished(cast(Any, answer), first_ms, self.a.options.get("max_tokens"))
        self.renderer.end_answer()


def fast(argv: Sequence[str]) -> int | None:
    """Run ``argv`` on the light path; None when the full path should (stdin is then left readable)."""
    if os.environ.get("TEKTON_AISH_FAST") == "0" or sys.stdout is None:
        return None
    if any(name.startswith("OTEL_") for name in os.environ):
        return None  # tracing: the full path
    a = plan(argv)
    if a is None:
        return None
    settings = load(a.nats_url)
    if settings is None or (
        "://" in settings.nats_url and not settings.nats_url.startswith(("nats:", "tls:"))
    ):
        return None
    stdin_text = None
    if not sys.stdin.isatty():
        stdin_text = sys.stdin.read() or None
    try:
        return ask(a, settings, stdin_text)
    except Handover:
        sys.stdin = io.StringIO(stdin_text or "")  # what was read is read again by the full path
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = fast(args)
    except (KeyboardInterrupt, OSError) as err:  # Ctrl-C, a reader gone, a full disk...
        from aish_client.exits import exit_code_for
        from aish_client.render import Renderer

        return exit_code_for(err, Renderer())
    if code is not None:
        return code
    from aish_client.cli import main as full

    return full(args)
