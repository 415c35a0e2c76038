"""Wire models and the msgpack codec. The protocol is written down in docs/protocol.md.

Every message is a msgpack map with ``v`` (protocol version). Reply frames carry ``type`` (the
discriminator) and ``seq``: consecutive from 0 over every frame of one reply stream, so a client
notices a lost frame (core NATS is at-most-once).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from bus.errors import BadRequest, MalformedFrame
from bus.frames import (
    MODEL_RE,
    PROTOCOL_VERSION,
    REQUEST_ID_RE,
    _pack,
    _unpack,
    chunk_fields,
    unpack_frame,
)

__all__ = ["MODEL_RE", "PROTOCOL_VERSION", "REQUEST_ID_RE", "chunk_fields", "unpack_frame"]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatMessage(Wire):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatOptions(Wire):
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    # Added in protocol 1 without a version bump: optional, and sent only when set, so a request that
    # does not use them is byte-for-byte what older specialists accept.
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # Penalise tokens already in the answer (1.0: off). Small models loop without it.
    repeat_penalty: float | None = Field(default=None, ge=1.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


def new_request_id() -> str:
    return uuid.uuid4().hex


class ChatRequest(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    id: str = Field(default_factory=new_request_id)
    messages: list[ChatMessage] = Field(min_length=1)
    options: ChatOptions = ChatOptions()
    # The request's deadline, relative to when the specialist receives it (clocks across machines
    # are not trusted to agree). None: the specialist's own default.
    timeout_ms: int | None = Field(default=None, ge=1, le=86_400_000)
    # A detached run (aish --detach) goes on to its end with nobody listening, unless cancelled.
    detach: bool | None = None
    # The model to answer with (see MODEL_RE); None: the specialist's own. Optional and sent only when
    # set (protocol 1 stays 1: a specialist that predates it answers bad_request to a request naming one).
    model: str | None = None

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        return check_model(value)

    @field_validator("id")
    @classmethod
    def _id_is_a_subject_token(cls, value: str) -> str:
        if not REQUEST_ID_RE.match(value):
            raise ValueError("request id must be 1-64 characters of [A-Za-z0-9_-]")
        return value


class Usage(Wire):
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    # USD, where the provider's model is priced (config ``prices``, or the roster); else absent.
    cost: float | None = None


# Where a Tekton A2A agent puts an answer's usage (A2A has no field for it): the metadata of its last
# artifact chunk (bridge/a2a.py), read back by the a2a provider (specialists/providers/a2a_remote.py).
A2A_USAGE_KEY = "tekton.usage"


class Timings(Wire):
    first_token_ms: float | None = None
    total_ms: float
    tokens_per_s: float | None = None


class StartFrame(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["start"] = "start"
    seq: int = 0
    specialist: str
    instance: str
    provider: str
    model: str


class ChunkFrame(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["chunk"] = "chunk"
    seq: int
    text: str


class HeartbeatFrame(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["heartbeat"] = "heartbeat"
    seq: int


class ToolCallFrame(Wire):
    """The specialist is calling a tool (of an MCP server its roster entry names)."""

    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["tool_call"] = "tool_call"
    seq: int
    id: str
    server: str
    tool: str
    arguments: dict[str, Any] = {}


class ToolResultFrame(Wire):
    """What the tool of the :class:`ToolCallFrame` with the same ``id`` answered."""

    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["tool_result"] = "tool_result"
    seq: int
    id: str
    text: str
    is_error: bool = False


class DoneFrame(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["done"] = "done"
    seq: int
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings


class ErrorFrame(Wire):
    v: Literal[1] = PROTOCOL_VERSION
    type: Literal["error"] = "error"
    seq: int
    code: str
    message: str
    retryable: bool = False


Frame = Annotated[
    StartFrame | ChunkFrame | HeartbeatFrame | ToolCallFrame | ToolResultFrame | DoneFrame | ErrorFrame,
    Field(discriminator="type"),
]
_FRAME = TypeAdapter(Frame)


def check_model(value: str | None) -> str | None:
    """A model's name as requests carry it (MODEL_RE), for the models' validators."""
    if value is not None and not MODEL_RE.match(value):
        raise ValueError("model must be 1-200 characters of [A-Za-z0-9_.:/@+-], e.g. ollama:qwen2.5:7b")
    return value


def encode(model: Wire, limit: int | None = None) -> bytes:
    """Encode a wire model; ``limit`` is the server's max_payload."""
    return _pack(model.model_dump(mode="python", exclude_none=True), limit, type(model).__name__)


def encode_request(request: ChatRequest, limit: int | None = None) -> bytes:
    return _pack(request.model_dump(mode="python", exclude_none=True), limit, "the request")


# The hot path packs with one reused Packer: ``msgpack.packb`` builds a new one per call, which is most
# of a small frame's cost. (A Packer resets its buffer when packing raises, so one bad text leaves
# nothing behind for the next frame.)
_PACKER = msgpack.Packer()
# A chunk frame is a fixed head, the seq, the "text" key and the text: {"v": 1, "type": "chunk", ...}.
_CHUNK_HEAD = _PACKER.pack({"v": PROTOCOL_VERSION, "type": "chunk"})[1:] + _PACKER.pack("seq")
_CHUNK_MAP = b"\x84"  # a map of four entries
_TEXT_KEY = _PACKER.pack("text")


def encode_chunk(seq: int, text: str) -> bytes:
    """The hot path: one chunk frame without building a model (same bytes as ``encode``)."""
    pack = _PACKER.pack
    return b"".join((_CHUNK_MAP, _CHUNK_HEAD, pack(seq), _TEXT_KEY, pack(text)))


def encode_done(
    seq: int,
    finish_reason: Literal["stop", "length"],
    completion_tokens: int,
    total_ms: float,
    first_token_ms: float | None = None,
    tokens_per_s: float | None = None,
    prompt_tokens: int | None = None,
    cost: float | None = None,
) -> bytes:
    """The closing frame of every answer, without building models (same bytes as ``encode``)."""
    timings: dict[str, float] = {}
    if first_token_ms is not None:
        timings["first_token_ms"] = first_token_ms
    timings["total_ms"] = total_ms
    if tokens_per_s is not None:
        timings["tokens_per_s"] = tokens_per_s
    usage: dict[str, int | float] = {"completion_tokens": completion_tokens}
    if prompt_tokens is not None:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    if cost is not None:
        usage["cost"] = cost
    return _PACKER.pack(
        {
            "v": PROTOCOL_VERSION,
            "type": "done",
            "seq": seq,
            "finish_reason": finish_reason,
            "usage": usage,
            "timings": timings,
        }
    )


def decode_request(data: bytes) -> ChatRequest:
    try:
        raw = _unpack(data)
    except MalformedFrame as err:  # a bad *request* is the asker's fault: bad_request, as documented
        raise BadRequest(f"not a ChatRequest: {err.message}") from err
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as err:
        raise BadRequest(f"not a ChatRequest: {_summary(err)}") from err


AnyFrame = StartFrame | ChunkFrame | HeartbeatFrame | ToolCallFrame | ToolResultFrame | DoneFrame | ErrorFrame


def validate_frame(raw: Any) -> AnyFrame:
    try:
        return _FRAME.validate_python(raw)
    except ValidationError as err:
        raise MalformedFrame(f"not a reply frame: {_summary(err)}") from err


def decode_frame(data: bytes) -> AnyFrame:
    return validate_frame(_unpack(data))


def _summary(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(p) for p in e["loc"]) or "message"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
