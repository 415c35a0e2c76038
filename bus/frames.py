"""The wire's byte level without models: the msgpack codec, the version, the id and model patterns, and
the hot path's chunk check. No pydantic here, so a one-shot client (bus/lite.py) can read frames without
paying for it; bus/wire.py builds the validated models on top of these.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgpack

from bus.errors import BadRequest, MalformedFrame, PayloadTooLarge

PROTOCOL_VERSION: Literal[1] = 1
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A model as a request names it: ``provider:model`` (``ollama:qwen2.5:7b``) or a bare model name for the
# specialist's own provider. Printable, no spaces.
MODEL_RE = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,200}$")


def _pack(obj: Any, limit: int | None, what: str) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except UnicodeEncodeError as err:  # a lone surrogate ("\ud800") from a JSON client, say
        raise BadRequest(f"{what} has text that is not valid Unicode ({err.reason} at {err.start})") from err
    if limit is not None and len(data) > limit:
        raise PayloadTooLarge(len(data), limit, what)
    return data


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises a handful of unrelated types
        raise MalformedFrame(f"not msgpack: {str(err) or type(err).__name__}") from err


def pack_request(request: dict[str, Any], limit: int | None = None) -> bytes:
    """A chat request given as the map :func:`bus.wire.encode_request` would send (``v``, ``id``,
    ``messages``, ``options``, optional ``timeout_ms``/``model``)."""
    return _pack(request, limit, "the request")


_CHUNK_KEYS = frozenset({"v", "type", "seq", "text"})


def unpack_frame(data: bytes) -> Any:
    """msgpack-decode a reply frame (validate it with :func:`chunk_fields` / ``bus.wire.validate_frame``)."""
    return _unpack(data)


def chunk_fields(raw: Any) -> tuple[int, str] | None:
    """The hot path: ``(seq, text)`` if ``raw`` is a well-formed chunk frame, else None.

    Checks exactly what the ChunkFrame model would (keys, version, types) without building it;
    anything else goes through ``bus.wire.validate_frame``.
    """
    if (
        type(raw) is dict
        and raw.keys() == _CHUNK_KEYS
        and raw["type"] == "chunk"
        and raw["v"] == PROTOCOL_VERSION
    ):
        seq, text = raw["seq"], raw["text"]
        if type(seq) is int and seq >= 0 and type(text) is str:
            return seq, text
    return None
