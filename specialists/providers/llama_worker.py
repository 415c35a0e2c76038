"""The local model's own process: ``python -m specialists.providers.llama_worker CONFIG_JSON``.

llama.cpp is native code: a bad instruction (SIGILL on a CPU that advertises AMX but does not allow
it), an out-of-memory kill or a segfault ends the whole process it runs in. So the model runs here,
alone, and the specialist that owns it talks to it over stdin/stdout; when it dies, only its own
requests fail (with a clear error) and the specialist starts a new one.

Frames both ways are msgpack maps behind a 4-byte big-endian length:
- in:  ``{"op": "gen", "id", "messages", "kwargs"}``, ``{"op": "cancel", "id"}``
- out: ``{"op": "ready", "model"}`` once loaded (or ``{"op": "failed", "message"}`` and exit 1), then per
  request ``{"op": "text", "id", "text"}``... and one ``{"op": "end", "id", "tokens", "prompt_tokens"}`` or
  ``{"op": "error", "id", "message"}``.

A request with ``"tools"`` (a round of a conversation with tools, OpenAI's shapes) is answered in
llama-cpp-python's ``chatml-function-calling`` format: with tools offered (and ``"tool_choice"``) it is
not streamed (that format cannot stream a tool choice): one ``text`` frame with the message's text if
any, one ``{"op": "calls", "id", "calls": [{"id", "name", "arguments"}]}`` if the model called tools,
then ``end``; with ``"tools": []`` (the answer after the calls) it streams like any request.

Requests are served one at a time, in order (one llama.cpp context is not reentrant); a cancel stops the
current one at its next token or drops a queued one.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from bus.signals import die_with_parent

_HEADER = struct.Struct(">I")


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    body = stream.read(_HEADER.unpack(header)[0])
    frame: dict[str, Any] = msgpack.unpackb(body)
    return frame


def pack_frame(frame: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(frame)
    return _HEADER.pack(len(body)) + body


def cpu_advertises_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load(config: dict[str, Any]) -> Any:
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    if config.get("no_extra_bufts"):
        # Extra buffer types are where llama.cpp's AMX kernels live, and some virtual machines advertise
        # AMX without allowing it (SIGILL). A portable build (dev.sh) has no AMX code; this keeps a
        # native build alive on such a CPU too. Llama() has no option for it, so the model parameters
        # it starts from are changed, in this process only.
        defaults = low_level.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_bufts

    class CountingLlama(llama_cpp.Llama):
        """Remembers how many tokens the last prompt had: a streamed chat completion reports no usage,
        but its chat handler passes the formatted prompt to create_completion as tokens."""

        prompt_tokens: int | None = None

        def create_completion(self, prompt: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(prompt, list):
                self.prompt_tokens = len(prompt)
            else:
                self.prompt_tokens = len(self.tokenize(prompt.encode("utf-8"), special=True))
            return super().create_completion(prompt, *args, **kwargs)

    return CountingLlama(
        model_path=config["model_path"],
        n_ctx=config["n_ctx"],
        # Prompt processing too (llama-cpp-python's default there is every core, whatever n_threads):
        # two models each spinning more threads than their share slow both down.
        n_threads=config["threads"] or os.cpu_count() or 2,
        n_threads_batch=config["threads"] or os.cpu_count() or 2,
        seed=config["seed"],
        verbose=False,
    )


class Worker:
    def __init__(self, llm: Any, out: BinaryIO):
        self.llm = llm
        self.out = out
        self.requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()

    def send(self, frame: dict[str, Any]) -> None:
        self.out.write(pack_frame(frame))
        self.out.flush()

    def read_input(self, stream: BinaryIO) -> None:
        """Reader thread: queue requests, note cancels at once (the generating thread checks them)."""
        while (frame := read_frame(stream)) is not None:
            if frame.get("op") == "cancel":
                with self.lock:
                    self.cancelled.add(frame["id"])
            elif frame.get("op") == "gen":
                self.requests.put(frame)
        self.requests.put(None)  # our specialist is gone

    def is_cancelled(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.cancelled

    def serve(self) -> None:
        while (request := self.requests.get()) is not None:
            request_id = request["id"]
            tokens = 0
            self.llm.prompt_tokens = None
            try:
                if self.is_cancelled(request_id):
                    pass
                elif request.get("tools"):
                    tokens = self.tool_round(request)
                else:
                    parts = self.chat(request["messages"], request["kwargs"], request.get("tools"))
                    for part in parts:
                        if self.is_cancelled(request_id):
                            break
                        text = part["choices"][0]["delta"].get("content")
                        if text:
                            tokens += 1
                            self.send({"op": "text", "id": request_id, "text": text})
            except Exception as err:  # a bad request is that request's error, not the worker's end
                self.send({"op": "error", "id": request_id, "message": f"{type(err).__name__}: {err}"})
            else:
                self.send(
                    {"op": "end", "id": request_id, "tokens": tokens, "prompt_tokens": self.llm.prompt_tokens}
                )
            with self.lock:
                self.cancelled.discard(request_id)

    def chat(self, messages: list[dict[str, Any]], kwargs: dict[str, Any], tools: Any, **more: Any) -> Any:
        """A chat completion: in the model's own chat format, or (``tools`` not None) in the function
        calling one, whose template shows the model its tools, its calls and (see below) their results."""
        if tools is None:
            return self.llm.create_chat_completion(messages=messages, stream=True, **kwargs)
        from llama_cpp.llama_chat_format import chatml_function_calling

        kwargs = dict(kwargs)
        if (seed := kwargs.pop("seed", None)) is not None:  # that handler takes no seed
            self.llm.set_seed(seed)
        more.setdefault("stream", True)
        return chatml_function_calling(
            llama=self.llm, messages=results_as_turns(messages), tools=tools or None, **kwargs, **more
        )

    def tool_round(self, request: dict[str, Any]) -> int:
        """A round that offers tools, not streamed; its completion tokens."""
        done = self.chat(
            request["messages"],
            request["kwargs"],
            request["tools"],
            tool_choice=request.get("tool_choice") or "auto",
            stream=False,
        )
        message = done["choices"][0]["message"]
        if message.get("content"):
            self.send({"op": "text", "id": request["id"], "text": message["content"]})
        calls = [
            {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message.get("tool_calls") or []
        ]
        if calls:
            self.send({"op": "calls", "id": request["id"], "calls": calls})
        usage = done.get("usage") or {}
        if usage.get("prompt_tokens") is not None:
            self.llm.prompt_tokens = usage["prompt_tokens"]
        return int(usage.get("completion_tokens", 0))


def results_as_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for llama-cpp-python's ``chatml-function-calling`` template, which writes a
    ``tool`` message's role and drops its content (the model would never see a result): each result
    goes to the model as a turn of its own, ``functions.NAME result:`` and the text."""
    names = {
        call["id"]: call["function"]["name"]
        for message in messages
        if message["role"] == "assistant"
        for call in message.get("tool_calls") or []
    }
    return [
        {
            "role": "user",
            "content": f"functions.{names.get(m.get('tool_call_id'), 'tool')} result:\n{m['content']}",
        }
        if m["role"] == "tool"
        else m
        for m in messages
    ]


def main() -> int:
    die_with_parent()
    config = json.loads(sys.argv[1])
    # Our frames own the pipe on fd 1; whatever llama.cpp prints (C stdout) goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        llm = load(config)
    except Exception as err:
        out.write(pack_frame({"op": "failed", "message": f"{type(err).__name__}: {err}"}))
        out.flush()
        return 1
    worker = Worker(llm, out)
    worker.send({"op": "ready", "model": Path(config["model_path"]).stem})
    threading.Thread(target=worker.read_input, args=(sys.stdin.buffer,), daemon=True).start()
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
