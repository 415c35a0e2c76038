"""A specialist calling the tools of an MCP server its roster entry names (a real MCP server over
stdio, started by the specialist); the calls and results travel as typed frames and aish shows them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bus.client import Bus
from bus.errors import BusError
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ToolCallFrame, ToolResultFrame
from tests.helpers import env, in_process_specialists, run_aish

pytestmark = pytest.mark.anyio

CALC = Path(__file__).parent / "data" / "mcp_calc.py"


def roster_with_calc(tmp_path: Path) -> Path:
    roster = tmp_path / "roster.toml"
    roster.write_text(
        f"""
[specialists.apollo]
description = "Code analysis"
primary = ["code-analysis"]
capabilities = {{ code-analysis = 0.9 }}
system_prompt = "You are Apollo."
provider = "scripted"

[specialists.apollo.mcp_servers.calc]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(CALC))}]
"""
    )
    return roster


async def test_tool_calls_and_results_are_frames_in_the_stream(
    settings: TektonSettings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"roster": roster_with_calc(tmp_path)})
    tool = json.dumps({"server": "calc", "tool": "add", "arguments": {"a": 2, "b": 40}})
    with env(TEKTON_SCRIPTED_TOOL=tool):
        async with in_process_specialists(settings, "apollo") as services, Bus.connect(settings) as bus:
            assert [t.name for t in services["apollo"].tools.tools["calc"]] == ["add", "explode"]
            seen: list[object] = []
            async with bus.stream("apollo", [ChatMessage(role="user", content="sum it")]) as s:
                s.on_tool = seen.append
                text = "".join([t async for t in s])
            assert text == "apollo heard: sum it add said: 42"
            [call, result] = s.tool_frames
            assert seen == [call, result]
            assert isinstance(call, ToolCallFrame) and isinstance(result, ToolResultFrame)
            assert (call.server, call.tool, call.arguments) == ("calc", "add", {"a": 2, "b": 40})
            assert (result.id, result.text, result.is_error) == (call.id, "42", False)

            shown = await run_aish(settings, "apollo", "sum it")
            assert shown.returncode == 0, shown.stderr
            assert shown.stdout == "apollo heard: sum it add said: 42\n"
            assert '⚙ calc.add {"a": 2, "b": 40}' in shown.stderr and "→ 42" in shown.stderr


async def test_a_failing_tool_is_that_request_s_error(settings: TektonSettings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"roster": roster_with_calc(tmp_path)})
    with env(TEKTON_SCRIPTED_TOOL=json.dumps({"server": "calc", "tool": "explode"})):
        async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
            for _ in range(2):  # and the specialist lives on
                async with bus.stream("apollo", [ChatMessage(role="user", content="boom")]) as s:
                    with pytest.raises(
                        BusError, match=r"tool 'calc\.explode' failed: Error executing tool explode"
                    ):
                        async for _ in s:
                            pass
                assert [type(f).__name__ for f in s.tool_frames] == ["ToolCallFrame", "ToolResultFrame"]
                assert s.tool_frames[1].is_error  # type: ignore[union-attr]
