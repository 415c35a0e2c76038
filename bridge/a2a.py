"""A2A (the ``a2a-sdk``): every specialist as an A2A agent, over the bus client.

For each specialist ``NAME`` the app serves, under ``/a2a/NAME``:

- its agent card at ``/a2a/NAME/.well-known/agent-card.json`` (skills from the roster's capabilities
  as discovery announces them, primary ones first; streaming on);
- JSON-RPC at ``/a2a/NAME/`` (``SendMessage`` / ``SendStreamingMessage``, and the v0.3 names
  ``message/send`` / ``message/stream``): the message's text becomes one Tekton request; the answer
  streams back as artifact chunks of one task (``append``, ``last_chunk`` on the end), then the task
  completes, or fails with the bus error's one-line message.

A task's ``context_id`` (the client's, or the one the server gave the first message) names a Tekton
session of the caller's (``a2a.<context_id>``, see :func:`session_name`), made on the context's first
message: a message with that context continues the conversation, the gateway putting the session's
history before it and recording the answer. On a bus without a gateway each message is one request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import AsyncGenerator
from typing import Any

import structlog
from a2a.helpers.proto_helpers import new_task_from_user_message, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.agent_execution.active_task import TERMINAL_TASK_STATES
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT
from a2a.utils.errors import InvalidParamsError, UnsupportedOperationError
from starlette.applications import Starlette
from starlette.routing import Mount

from bridge.edge import bus_error_response, strict_json
from bus.client import Bus
from bus.discovery import SpecialistView
from bus.errors import BadRequest, BusError, ErrorCode, GatewayUnavailable
from bus.wire import A2A_USAGE_KEY, ChatMessage

A2A_PREFIX = "/a2a"
log = structlog.get_logger("tekton.a2a")
_PLAIN_CONTEXT = re.compile(r"^[A-Za-z0-9_.-]{1,59}$")


def session_name(context_id: str) -> str:
    """The Tekton session an A2A context continues: ``a2a.<context_id>``, or a digest of an id that
    cannot be part of a session name."""
    if _PLAIN_CONTEXT.match(context_id):
        return f"a2a.{context_id}"
    return "a2a." + hashlib.sha256(context_id.encode()).hexdigest()[:40]


async def context_session(bus: Bus, specialist: str, context_id: str) -> str | None:
    """The session of ``context_id`` (made on first use), or None when the bus has no gateway."""
    name = session_name(context_id)
    try:
        if await bus.gateway.find(name) is None:
            try:
                await bus.gateway.create(specialist, name=name)
            except BadRequest:  # another message of the same context made it meanwhile
                await bus.gateway.get(name)
    except GatewayUnavailable:
        log.warning("no gateway: the A2A context is not kept", context_id=context_id)
        return None
    return name


def agent_card(view: SpecialistView, base_url: str, bearer: bool = False) -> AgentCard:
    """The card of one specialist; ``base_url`` is where the bridge is reached from outside.
    ``bearer``: the server asks for an API token (``Authorization: Bearer``), and the card says so."""
    url = f"{base_url.rstrip('/')}{A2A_PREFIX}/{view.name}/"
    ordered = [*view.primary, *sorted(c for c in view.capabilities if c not in view.primary)]
    skills = [
        AgentSkill(
            id=cap,
            name=cap.replace("-", " "),
            description=f"{view.name}: {cap} (score {view.capabilities.get(cap, 0):.2f})",
            tags=[cap, *(["primary"] if cap in view.primary else [])],
        )
        for cap in ordered
    ]
    return AgentCard(
        name=view.name,
        description=view.description or f"the Tekton specialist {view.name}",
        version="0.1.0",
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version=PROTOCOL_VERSION_CURRENT)
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=skills,
        security_schemes={"bearer": BEARER} if bearer else None,
        security_requirements=[SecurityRequirement(schemes={"bearer": StringList()})] if bearer else None,
    )


BEARER = SecurityScheme(
    http_auth_security_scheme=HTTPAuthSecurityScheme(
        scheme="Bearer", description="an API token of the bridge's (TEKTON_HTTP_TOKENS)"
    )
)


class SpecialistExecutor(AgentExecutor):
    """One A2A message: one Tekton request, streamed into the task as artifact chunks."""

    def __init__(self, bus: Bus, specialist: str):
        self.bus = bus
        self.specialist = specialist

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task
        if task is None:
            assert context.message is not None
            try:
                task = new_task_from_user_message(context.message)
            except ValueError as err:  # not a user's message, or one with an empty text part
                raise InvalidParamsError(message=f"bad_request: {err}") from None
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        prompt = context.get_user_input()
        if not prompt.strip():
            await updater.failed(new_text_message("bad_request: the message has no text", task_id=task.id))
            return
        await updater.start_work()
        artifact = f"{task.id}-answer"
        first = True
        messages = [ChatMessage(role="user", content=prompt)]
        try:
            session = await context_session(self.bus, self.specialist, task.context_id)
            async with self.bus.stream(self.specialist, messages, session=session) as s:
                async for text in s:
                    await updater.add_artifact(
                        [new_text_part(text)], artifact_id=artifact, name="answer", append=not first
                    )
                    first = False
            result = await s.result()
        except BusError as err:
            message = new_text_message(
                f"{err.code}: {err.message}", context_id=task.context_id, task_id=task.id
            )
            await updater.failed(message)
            return
        # The answer's tokens (A2A has no field for them; a chunk may carry several): a Tekton
        # specialist on the a2a provider reads them back (specialists/providers/a2a_remote.py).
        usage = {A2A_USAGE_KEY: result.done.usage.model_dump(exclude_none=True)}
        await updater.add_artifact(
            [], artifact_id=artifact, name="answer", append=True, last_chunk=True, metadata=usage
        )
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        # The framework cancels execute()'s task: leaving bus.stream()'s block cancels the request on
        # the specialist. Here the task only has to say so.
        if context.task_id and context.context_id:
            await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


SEND_METHODS = frozenset({"message/send", "message/stream", "SendMessage", "SendStreamingMessage"})
TASK_METHODS = frozenset({"tasks/get", "tasks/cancel", "tasks/resubscribe", "GetTask", "CancelTask"})
USER_ROLES = ("user", "ROLE_USER", 1)  # A2A 0.3's name, 1.0's (protobuf JSON: a name or its number)
MAX_ID = 2**63
MAX_HISTORY = 2**31 - 1


def rpc_problem(body: bytes) -> tuple[Any, int, str] | None:
    """Why ``body`` is no request for an agent: ``(its id, JSON-RPC code, message)``, or None.

    The SDK answers most bad requests itself, but logs a traceback for each (and a few, such as bytes
    that are not UTF-8 or a file part that is not base64, come back as internal errors): a caller's
    mistake is answered here in one line, and the SDK sees only requests of the right shape."""
    try:
        request = strict_json(body.decode())  # UTF-8 only, as the SDK reads it
    except (ValueError, RecursionError) as err:  # also bytes not UTF-8, ints of 4,300 digits, nesting
        return None, -32700, f"parse error: {str(err)[:200]}"
    if (
        not isinstance(request, dict)
        or request.get("jsonrpc") != "2.0"
        or not isinstance(request.get("method"), str)
    ):
        return None, -32600, "invalid request: one JSON-RPC 2.0 object with a method name"
    rid = request.get("id")
    if not (rid is None or isinstance(rid, str) or _whole(rid, MAX_ID, signed=True)):
        return None, -32600, "invalid request: an id is a string, a 64-bit integer or null"
    params = request.get("params", {})  # may be left out (ListTasks)
    if not isinstance(params, dict):
        return rid, -32602, "invalid params: params must be an object"
    problem = _send_problem(params) if request["method"] in SEND_METHODS else None
    if request["method"] in TASK_METHODS and not isinstance(_field(params, "id"), str):
        problem = "params.id must be a task's id (a string)"
    configuration = params.get("configuration")
    history = [_field(params, "historyLength")]
    history += [_field(configuration, "historyLength")] if isinstance(configuration, dict) else []
    history = [int(h) if isinstance(h, str) and h.isascii() and h.isdigit() else h for h in history]
    if any(h is not None and not _whole(h, MAX_HISTORY + 1) for h in history):
        problem = f"historyLength must be a whole number from 0 to {MAX_HISTORY}"
    return (rid, -32602, f"invalid params: {problem}") if problem else None


def _whole(value: Any, bound: int, *, signed: bool = False) -> bool:
    """An int (not a bool) in ``[0, bound)``, or in ``(-bound, bound)`` when ``signed``."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return abs(value) < bound if signed else 0 <= value < bound


def _field(record: dict[str, Any], name: str) -> Any:
    """A field by its JSON name or its proto one (both SDK parsers take either); null is absent."""
    value = record.get(name)
    if value is None:
        value = record.get(re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name))
    return value


def _send_problem(params: dict[str, Any]) -> str | None:
    message = params.get("message")
    if not isinstance(message, dict):
        return "params.message must be an object"
    role = message.get("role")
    if isinstance(role, bool) or role not in USER_ROLES:
        return "the message must be from a user (role 'user')"
    for name in ("messageId", "taskId", "contextId"):
        if _field(message, name) is not None and not isinstance(_field(message, name), str):
            return f"message.{name} must be a string"
    if not _field(message, "messageId"):
        return "the message needs a messageId"
    parts = message.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        return "message.parts must be a list of parts (objects), not empty"
    for part in parts:
        if "text" in part and (not isinstance(part["text"], str) or not part["text"]):
            return "a text part needs its text"
        file = part.get("file")
        if not _decodes(part.get("raw"), file.get("bytes") if isinstance(file, dict) else None):
            return "a file's bytes must be base64"
    return None


def _decodes(raw: Any, file_bytes: Any) -> bool:
    """Whether a part's bytes decode as the SDK will decode them: 1.0's ``raw`` as protobuf's JSON
    parser does (URL-safe or standard alphabet, padding optional), 0.3's ``file.bytes`` as
    ``base64.b64decode`` (characters outside the alphabet skipped)."""
    try:
        if raw is not None:
            encoded = raw.encode() if isinstance(raw, str) else raw
            base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))
        if file_bytes is not None:
            base64.b64decode(file_bytes)
    except (binascii.Error, TypeError, ValueError, AttributeError):
        return False
    return True


class _Handler(DefaultRequestHandler):
    """The SDK's handler, but a message to a task that has ended is refused before the SDK opens an
    active task for it (a2a-sdk 1.3 then refused it too, but left that task's dispatch loop pending:
    two leaked asyncio tasks per such message)."""

    def __init__(self, *, task_store: InMemoryTaskStore, **kwargs: Any):
        super().__init__(task_store=task_store, **kwargs)
        self._tasks = task_store

    async def _refuse_ended(self, params: Any, context: ServerCallContext) -> None:
        task_id = params.message.task_id if params.HasField("message") else ""
        task = await self._tasks.get(task_id, context) if task_id else None
        if task is not None and task.status.state in TERMINAL_TASK_STATES:
            raise UnsupportedOperationError(message=f"Task {task_id} has ended: it takes no more messages")

    async def on_message_send(self, params: Any, context: ServerCallContext) -> Any:
        await self._refuse_ended(params, context)
        return await super().on_message_send(params, context)

    async def on_message_send_stream(self, params: Any, context: ServerCallContext) -> AsyncGenerator[Any]:
        await self._refuse_ended(params, context)
        async for event in super().on_message_send_stream(params, context):
            yield event


class A2ARouter:
    """ASGI app for ``/a2a/NAME/...`` on the HTTP bridge: each specialist's agent is built on its first
    request from a fresh discovery (so specialists started after the bridge are served too).
    ``bus_for(scope)`` returns the bus to ask with (the caller's, after the bridge's own checks) or
    raises :class:`BusError`."""

    def __init__(self, bus_for: Any, base_url: str | None = None, bearer: bool = False):
        self.bus_for = bus_for
        self.base_url = base_url
        self.bearer = bearer  # the bridge asks for API tokens: the cards say so
        self._apps: dict[tuple[str, int], _Checked] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, root = scope["path"], scope.get("root_path", "")
        route = path[len(root) :] if root and path.startswith(root) else path  # below the mount
        name = route.strip("/").split("/")[0]
        try:
            bus = self.bus_for(scope)
            views = [v for v in await bus.survey(window=0.3) if v.name == name]
            if not views:
                running = ", ".join(v.name for v in await bus.survey(window=0.1)) or "none"
                raise BusError(
                    f"no specialist named '{name}' is running (running: {running})",
                    code=ErrorCode.SPECIALIST_UNAVAILABLE,
                )
        except BusError as err:  # (the bridge's one error body: code, message, retryable)
            return await bus_error_response(err)(scope, receive, send)
        key = (name, id(bus))
        if key not in self._apps:
            server = scope.get("server") or ("127.0.0.1", 80)
            base = self.base_url or f"{scope.get('scheme', 'http')}://{server[0]}:{server[1]}"
            self._apps[key] = create_a2a_app(bus, views, base, self.bearer)
        await self._apps[key]({**scope, "path": A2A_PREFIX + route, "root_path": ""}, receive, send)


class _Checked:
    """The agents' app, but a JSON-RPC request of the wrong shape (:func:`rpc_problem`) is answered
    here, before the SDK sees it."""

    def __init__(self, app: Starlette):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        path = scope.get("path", "")
        rpc = path.startswith(f"{A2A_PREFIX}/") and path.rstrip("/").count("/") == 2  # /a2a/NAME/
        if scope["type"] == "http" and scope.get("method") == "POST" and rpc:
            raw, receive = await _body(receive)
            if raw is None:  # the client left before its request was whole: nobody to answer
                return
            problem = rpc_problem(raw)
            if problem is not None:
                rid, code, message = problem
                reply = {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
                return await JSONResponse(reply)(scope, receive, send)
        await self.app(scope, receive, send)


async def _body(receive: Any) -> tuple[bytes | None, Any]:
    """The request's whole body (the bridge's edge has bounded its size; None: the client left first),
    and a ``receive`` that gives it again to the app."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body, given = b"".join(chunks), False

    async def again() -> Any:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, again


def create_a2a_app(bus: Bus, views: list[SpecialistView], base_url: str, bearer: bool = False) -> _Checked:
    """An ASGI app with one A2A agent per specialist in ``views`` (mount it at the bridge's root), its
    JSON-RPC requests checked for shape before the SDK's Starlette routes see them."""
    mounts = []
    for view in views:
        card = agent_card(view, base_url, bearer)
        handler = _Handler(
            agent_executor=SpecialistExecutor(bus, view.name), task_store=InMemoryTaskStore(), agent_card=card
        )
        routes: list[Any] = [
            *create_agent_card_routes(card),
            *create_jsonrpc_routes(handler, rpc_url="/", enable_v0_3_compat=True),
        ]
        mounts.append(Mount(f"{A2A_PREFIX}/{view.name}", routes=routes))
    return _Checked(Starlette(routes=mounts))
