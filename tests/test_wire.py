import msgpack
import pytest
from pydantic import ValidationError

from bus.bulk import BulkRequest
from bus.discovery import Discover
from bus.errors import (
    BadRequest,
    DeadlineExceeded,
    MalformedFrame,
    PayloadTooLarge,
    SpecialistError,
    from_wire,
)
from bus.sessions import CreateSession, ErrorReply, SessionChat, SessionRef
from bus.subjects import cancel_subject, chat_subject, queue_group, validate_name
from bus.wire import (
    ChatMessage,
    ChatRequest,
    ChunkFrame,
    DoneFrame,
    ErrorFrame,
    Timings,
    Usage,
    decode_frame,
    decode_request,
    encode,
    encode_chunk,
    encode_request,
)

pytestmark = pytest.mark.fast


def test_request_round_trip() -> None:
    request = ChatRequest(messages=[ChatMessage(role="user", content="héllo")], timeout_ms=1500)
    back = decode_request(encode_request(request))
    assert back == request
    assert back.v == 1 and len(back.id) == 32


def test_request_rejects_unknown_fields_and_bad_ids() -> None:
    raw = {"v": 1, "id": "abc", "messages": [{"role": "user", "content": "x"}], "surprise": 1}
    with pytest.raises(BadRequest, match="surprise"):
        decode_request(msgpack.packb(raw))
    raw = {"v": 1, "id": "a.b", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(BadRequest, match="id"):
        decode_request(msgpack.packb(raw))
    with pytest.raises(BadRequest, match="messages"):
        decode_request(msgpack.packb({"v": 1, "messages": []}))
    with pytest.raises(BadRequest):
        decode_request(msgpack.packb({"v": 2, "messages": [{"role": "user", "content": "x"}]}))


def test_not_msgpack_is_a_bad_request_or_a_malformed_frame() -> None:
    # A request that is not msgpack is the asker's fault (bad_request, as docs/protocol.md says); a
    # reply frame that is not msgpack is the answerer's (malformed_frame).
    with pytest.raises(BadRequest, match="not msgpack"):
        decode_request(b"\xc1\xc1 not msgpack")
    with pytest.raises(MalformedFrame):
        decode_frame(b"\xc1")


def test_gateway_requests_and_replies_carry_v() -> None:
    for model in (CreateSession(), SessionRef(session="x"), Discover(), ErrorReply(code="c", message="m")):
        assert msgpack.unpackb(encode(model))["v"] == 1
    # A foreign client that follows the doc and sends v is understood; another version is not.
    assert SessionRef.model_validate({"v": 1, "session": "x"}).session == "x"
    with pytest.raises(ValidationError):
        SessionRef.model_validate({"v": 2, "session": "x"})


@pytest.mark.parametrize("inbox", ["_INBOX.>", "_INBOX.*", "*", ">", "a..b", "a b", ".a", "a."])
def test_a_wildcard_or_broken_inbox_is_refused(inbox: str) -> None:
    request = ChatRequest(messages=[ChatMessage(role="user", content="x")])
    with pytest.raises(ValidationError, match="inbox"):
        SessionChat(session="s", inbox=inbox, request=request)
    with pytest.raises(ValidationError, match="inbox"):
        BulkRequest(operations=[], inbox=inbox)
    assert SessionChat(session="s", inbox="_INBOX.abc.1", request=request).inbox == "_INBOX.abc.1"


def test_frames_round_trip_and_fast_chunk_matches_model() -> None:
    assert encode_chunk(3, "tok") == encode(ChunkFrame(seq=3, text="tok"))
    done = DoneFrame(
        seq=9, finish_reason="stop", usage=Usage(completion_tokens=8), timings=Timings(total_ms=1.5)
    )
    assert decode_frame(encode(done)) == done
    err = ErrorFrame(seq=1, code="deadline_exceeded", message="late", retryable=False)
    assert decode_frame(encode(err)) == err


def test_foreign_frame_type_is_malformed() -> None:
    with pytest.raises(MalformedFrame, match="type"):
        decode_frame(msgpack.packb({"v": 1, "type": "gossip", "seq": 0}))


def test_payload_limit() -> None:
    request = ChatRequest(messages=[ChatMessage(role="user", content="x" * 2000)])
    with pytest.raises(PayloadTooLarge, match="max_payload of 1,024 bytes"):
        encode_request(request, limit=1024)
    assert len(encode_request(request, limit=4096)) < 4096


def test_error_codes_map_back_to_classes() -> None:
    assert isinstance(from_wire("deadline_exceeded", "late", False), DeadlineExceeded)
    err = from_wire("model_missing", "no model", False)
    assert isinstance(err, SpecialistError) and err.code == "model_missing"
    assert from_wire("something-new", "?", True).retryable


def test_subjects() -> None:
    assert chat_subject("apollo") == "tekton.ai.apollo.chat"
    assert chat_subject("apollo", prefix="dev") == "dev.ai.apollo.chat"
    assert queue_group("apollo") == "tekton.ai.apollo"
    assert cancel_subject("abc", "alice") == "tekton.cancel.alice.abc"
    for bad in ["Apollo", "a.b", "-x", "x-", "", "a b", "a*"]:
        with pytest.raises(ValueError):
            validate_name(bad)
