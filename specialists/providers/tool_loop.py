"""The OpenAI tools API's loop, for every provider that speaks it (the openai provider over HTTP, the
local provider to llama-cpp-python in its worker process).

The specialist's MCP tools are offered to the model as functions (``server__tool``, the tool's input
schema); each call the model makes is run (``tool_call``/``tool_result`` frames in the stream) and its
result goes back as a ``tool`` message, until the model answers in text. At most ``max_rounds`` rounds
of calls: the round after the last offers no tools, so it answers. A provider gives the loop one
``Round``: a completion over the conversation so far, yielding its text as it comes (also kept in
``text``), filling ``calls`` (index -> id, name, arguments) with the tool calls it makes, and ending
with the model's count if it has one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from bus.wire import Usage
from specialists.tools import RequestTools

# round(convo, offered functions, tool_choice (None: offer none), calls, text)
Round = Callable[
    [list[dict[str, Any]], list[dict[str, Any]], Any, dict[int, dict[str, str]], list[str]],
    AsyncIterator[str | Usage],
]


def functions(tools: RequestTools | None) -> list[dict[str, Any]]:
    """The request's MCP tools as OpenAI functions."""
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": tool.description or "",
                "parameters": tool.input_schema,
            },
        }
        for name, tool in (tools.functions() if tools else [])
    ]


async def tool_rounds(
    round_: Round,
    convo: list[dict[str, Any]],
    tools: RequestTools | None,
    *,
    tool_choice: str,
    max_rounds: int,
) -> AsyncIterator[str | Usage]:
    """The answer's text over every round, then the rounds' summed count (when the model counts)."""
    offered = functions(tools)
    # Each round's count: the model's, or (one that does not count, e.g. when streaming) its chunks, as
    # the specialist counts them for providers that report nothing.
    counts: list[Usage] = []
    counted = False
    for n in range(max_rounds + 1):
        offer = offered if n < max_rounds else []
        calls: dict[int, dict[str, str]] = {}
        text: list[str] = []
        choice = _choice(tool_choice if n == 0 else "auto", offer)
        async for piece in round_(convo, offer, choice, calls, text):
            if isinstance(piece, Usage):
                counts.append(piece)
                counted = True
            else:
                yield piece
        if len(counts) == n:  # none from the model for this round
            counts.append(Usage(completion_tokens=len(text)))
        if not calls:
            break
        assert tools is not None  # calls come only when tools were offered
        await run_calls(tools, convo, calls, "".join(text))
    if counted:
        yield _total(counts)


async def run_calls(
    tools: RequestTools, convo: list[dict[str, Any]], calls: dict[int, dict[str, str]], text: str
) -> None:
    """Run the model's tool calls and put them and their results into the conversation."""
    ordered = [calls[i] for i in sorted(calls)]
    for n, call in enumerate(ordered):
        call["id"] = call["id"] or f"call_{n}"
    convo.append(
        {
            "role": "assistant",
            "content": text,  # "" rather than null: some servers (llama-cpp-python's) want a string
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in ordered
            ],
        }
    )
    for call in ordered:
        result = await tools.answer(call["name"], call["arguments"])
        convo.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def _choice(choice: str, offer: list[dict[str, Any]]) -> Any:
    """The API's ``tool_choice`` for a round (None when it offers no tools)."""
    if not offer:
        return None
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _total(counts: list[Usage]) -> Usage:
    """The rounds' counts together (an answer with tool calls is several completions)."""
    prompts = [c.prompt_tokens for c in counts if c.prompt_tokens is not None]
    return Usage(
        prompt_tokens=sum(prompts) if prompts else None,
        completion_tokens=sum(c.completion_tokens for c in counts),
    )
