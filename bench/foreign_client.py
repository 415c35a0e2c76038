"""A Tekton client written only from docs/protocol.md: nats-py and msgpack, nothing from this repo.

    python -m bench.foreign_client NATS_URL SPECIALIST "question" [--max-tokens N]

It is the reference foreign client: what any team can write from the protocol document. The hot-path
bench (bench/hot_path.py) measures it against the specialists and against a raw nats-py floor
service publishing the same frames. Keep it free of imports from bus/, specialists/, gateway/.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nats
from nats.aio.client import Client


class ProtocolError(Exception):
    pass


@dataclass
class Answer:
    text: list[str] = field(default_factory=list)
    chunks: int = 0
    sent_at: float = 0.0
    first_chunk_at: float | None = None
    done_at: float | None = None
    done: dict[str, Any] | None = None


async def ask(
    nc: Client,
    specialist: str,
    question: str,
    *,
    prefix: str = "tekton",
    user: str = "anonymous",
    max_tokens: int | None = None,
    idle_timeout: float = 10.0,
    keep_text: bool = True,
) -> Answer:
    """One chat request; the answer's frames checked as the protocol says (seq, one closing frame)."""
    request: dict[str, Any] = {
        "v": 1,
        "id": uuid.uuid4().hex,
        "messages": [{"role": "user", "content": question}],
    }
    if max_tokens is not None:
        request["options"] = {"max_tokens": max_tokens}
    answer = Answer()
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    expected = 0
    last_seen = time.monotonic()

    async def on_frame(msg: Any) -> None:
        nonlocal expected, last_seen
        if finished.done():
            return
        last_seen = time.monotonic()
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            finished.set_exception(ProtocolError(f"{specialist} is not running"))
            return
        frame = msgpack.unpackb(msg.data)
        if frame.get("v") != 1 or frame.get("seq") != expected:
            finished.set_exception(ProtocolError(f"lost a frame: expected seq {expected}, got {frame}"))
            return
        expected += 1
        kind = frame["type"]
        if kind == "chunk":
            if answer.first_chunk_at is None:
                answer.first_chunk_at = time.perf_counter()
            answer.chunks += 1
            if keep_text:
                answer.text.append(frame["text"])
        elif kind == "done":
            answer.done_at = time.perf_counter()
            answer.done = frame
            finished.set_result(None)
        elif kind == "error":
            finished.set_exception(ProtocolError(f"{frame['code']}: {frame['message']}"))

    inbox = nc.new_inbox()
    # A long answer arrives faster than a slow reader takes it: let the subscription hold it all.
    sub = await nc.subscribe(inbox, cb=on_frame, pending_msgs_limit=-1, pending_bytes_limit=-1)
    try:
        answer.sent_at = time.perf_counter()
        await nc.publish(f"{prefix}.ai.{specialist}.chat", msgpack.packb(request), reply=inbox)
        while not finished.done():
            try:
                await asyncio.wait_for(asyncio.shield(finished), idle_timeout)
            except TimeoutError:
                if time.monotonic() - last_seen >= idle_timeout:
                    raise ProtocolError(f"nothing from {specialist} for {idle_timeout} s") from None
        finished.result()
    finally:
        if not finished.done():  # we stop listening early: tell the specialist to stop generating
            finished.cancel()
            await nc.publish(f"{prefix}.cancel.{user}.{request['id']}", b"")
        await sub.unsubscribe()
    return answer


async def _main(args: argparse.Namespace) -> int:
    nc = await nats.connect(args.url)
    try:
        answer = await ask(nc, args.specialist, args.question, max_tokens=args.max_tokens)
    except ProtocolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    print("".join(answer.text))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("specialist")
    parser.add_argument("question")
    parser.add_argument("--max-tokens", type=int)
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
