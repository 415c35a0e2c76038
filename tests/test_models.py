"""Models by name: `-m PROVIDER:MODEL` per call and per stage, a default model in the config file,
providers configured in the config file, the demo model's note, `aish list` and `tekton models`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aish_client.render import Renderer
from aish_client.runner import DEMO_NOTE, _StageOutput
from bus.settings import TektonSettings
from bus.wire import ChatRequest, StartFrame, decode_request, encode_request
from specialists.models import ModelPool, build, resolve
from specialists.providers.base import ProviderContext, ProviderError, SharedResources
from specialists.providers.openai_compat import OllamaOptions
from tests.helpers import child_env, in_process_specialists, run_aish

pytestmark = pytest.mark.anyio


def events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.fast
def test_a_model_name_picks_provider_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = TektonSettings(
        providers={
            "groq": {"type": "openai", "base_url": "https://example.test/v1", "api_key": "k"},
            "openai": {"api_key": "from-file", "timeout_s": 9},
        }
    )
    ollama = resolve("ollama:qwen2.5:7b", settings)
    assert (ollama.provider, ollama.kind, ollama.options) == ("ollama", "ollama", {"model": "qwen2.5:7b"})
    groq = resolve("groq:llama-3.1-8b", settings)
    assert groq.kind == "openai" and groq.options["base_url"] == "https://example.test/v1"
    assert groq.options["model"] == "llama-3.1-8b"
    # The environment beats the file, key by key.
    monkeypatch.setenv("TEKTON_OPENAI_API_KEY", "from-env")
    openai = resolve("openai:gpt-4o-mini", settings)
    assert "api_key" not in openai.options and openai.options["timeout_s"] == 9
    monkeypatch.setenv("TEKTON_OPENAI_BASE_URL", "https://elsewhere.test/v1")
    assert resolve("groq:x", settings).options["base_url"] == "https://example.test/v1"  # its own table
    # A bare name is a model of the specialist's own provider; a provider alone, its default model.
    assert resolve("qwen2.5:7b", settings, own_provider="ollama").options == {"model": "qwen2.5:7b"}
    assert resolve("anthropic", settings).options == {}
    with pytest.raises(ProviderError, match="unknown provider 'olama'"):
        resolve("olama:qwen", settings, own_provider="local")


@pytest.mark.fast
def test_ollama_is_found_at_its_usual_address_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert OllamaOptions().base_url == "http://127.0.0.1:11434/v1" and OllamaOptions().api_key is None
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:11500")
    assert OllamaOptions().base_url == "http://127.0.0.1:11500/v1"


@pytest.mark.fast
def test_the_request_carries_the_model_only_when_one_is_named() -> None:
    plain = ChatRequest(messages=[{"role": "user", "content": "x"}])  # type: ignore[list-item]
    assert b"model" not in encode_request(plain)  # what older specialists accept, byte for byte
    named = plain.model_copy(update={"model": "ollama:qwen2.5:7b"})
    assert decode_request(encode_request(named)).model == "ollama:qwen2.5:7b"
    with pytest.raises(ValueError, match="model must be"):
        ChatRequest(messages=[{"role": "user", "content": "x"}], model="two words")  # type: ignore[list-item]


async def test_model_per_call_and_per_stage(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo", "athena"):
        done = await run_aish(settings, "--json", "-m", "scripted:per-call", "apollo", "hi")
        assert done.returncode == 0, done.stderr
        start = events(done.stdout)[0]
        assert start["event"] == "start" and start["provider"] == "scripted" and start["model"] == "per-call"
        # Per stage, in a pipeline: each stage its own model; a stage without one takes -m's.
        done = await run_aish(
            settings, "--json", "-m", "scripted:default", "-c", 'echo "x" | apollo -m scripted:first | athena'
        )
        assert done.returncode == 0, done.stderr
        starts = [e for e in events(done.stdout) if e["event"] == "start"]
        assert [(s["specialist"], s["model"]) for s in starts] == [("apollo", "first"), ("athena", "default")]
        # Without -m: the specialist's own model.
        done = await run_aish(settings, "--json", "apollo", "hi")
        assert events(done.stdout)[0]["model"] == "scripted"


async def test_a_model_whose_provider_has_no_key_is_one_clear_line(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"):
        done = await run_aish(settings, "-m", "anthropic:claude-3-5-haiku-latest", "apollo", "hi")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "no API key" in done.stderr and "Traceback" not in done.stderr


async def test_a_bad_model_name_is_a_usage_error(settings: TektonSettings) -> None:
    done = await run_aish(settings, "-m", "two words", "apollo", "hi")
    assert done.returncode == 2 and "not a model name" in done.stderr
    done = await run_aish(settings, "-c", "apollo -m | athena")
    assert done.returncode == 2 and "expected a model after -m" in done.stderr


def _roster(tmp_path: Path) -> Path:
    roster = tmp_path / "roster.toml"
    roster.write_text(
        """
[defaults]
provider = "scripted"

[specialists.apollo]
description = "code"
system_prompt = "You are Apollo."
primary = ["code-analysis"]
capabilities = { code-analysis = 0.9 }
"""
    )
    return roster


async def test_a_default_model_in_the_config_file(settings: TektonSettings, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('model = "scripted:from-config"\n')
    own = settings.model_copy(update={"provider": None, "roster": _roster(tmp_path)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEKTON_CONFIG", str(config))
        own = own.model_copy(update={"model": TektonSettings().model})
    assert own.model == "scripted:from-config"
    async with in_process_specialists(own, "apollo"):
        done = await run_aish(own, "--json", "apollo", "hi")
        assert events(done.stdout)[0]["model"] == "from-config", done.stderr
        listed = await run_aish(own, "list")
    assert "scripted:from-config" in listed.stdout


@pytest.mark.fast
def test_the_demo_model_says_what_it_is_once(tmp_path: Path) -> None:
    demo = StartFrame(specialist="apollo", instance="i", provider="local", model="SmolLM2-135M-Instruct.Q4_1")
    seen = []
    for _ in range(2):  # two runs of aish
        err = io.StringIO()
        renderer = Renderer(io.StringIO(), err)
        renderer.notes_dir = tmp_path
        for _ in range(2):
            _StageOutput(renderer, "apollo", True, None).started(demo)
        seen.append(err.getvalue())
    assert seen == [DEMO_NOTE + "\n", ""]
    other = io.StringIO()
    renderer = Renderer(io.StringIO(), other)
    _StageOutput(renderer, "apollo", True, None).started(demo.model_copy(update={"provider": "ollama"}))
    assert other.getvalue() == ""


def test_tekton_models_lists_each_provider(settings: TektonSettings, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    # Nothing listens on port 9: the provider is listed with the reason it offers nothing.
    config.write_text('[providers.mybox]\ntype = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n')
    done = subprocess.run(
        [sys.executable, "-m", "tekton", "models", "--timeout", "3"],
        env=child_env(settings, TEKTON_CONFIG=str(config), OLLAMA_HOST="127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("default: local")
    # The bundled demo model, as a path -m takes (local:/…/SmolLM2-135M-Instruct.Q4_1.gguf).
    assert any(line.startswith("local      local:/") and "SmolLM2-135M" in line for line in lines)
    assert any(line.startswith("mybox") and "cannot reach http://127.0.0.1:9/v1" in line for line in lines)
    assert any(line.startswith("ollama") and "cannot reach" in line for line in lines)
    assert any(line.startswith("anthropic") and "no API key" in line for line in lines)
    assert not any(line.startswith("scripted") for line in lines)


@pytest.mark.fast
@pytest.mark.anyio
async def test_a_request_names_model_files_only_in_the_model_directories_and_few_of_them(
    tmp_path: Path,
) -> None:
    """Any user on the bus may name a model: a file outside the specialist's model directories (or no
    GGUF) is refused in one answer whether it exists or not (before, `local:/etc/shadow` was opened
    by the model process), a file is keyed by its real path (before, each spelling of one path
    started another model process), and at most request_models_max are kept."""
    settings = TektonSettings(data_dir=tmp_path, request_models_max=2)
    own = resolve(None, settings, own_provider="scripted")
    context = ProviderContext("apollo", SharedResources())
    pool = ModelPool(settings, own, build(own, context), context)
    (tmp_path / "models").mkdir()
    gguf = tmp_path / "models" / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "elsewhere.gguf").write_bytes(b"GGUF")
    said = set()
    for path in ("/etc/passwd", "/nonexistent.gguf", tmp_path / "elsewhere.gguf", tmp_path / "models"):
        with pytest.raises(ProviderError) as refused:
            await pool.get(f"local:{path}")
        said.add(refused.value.message)
    assert len(said) == 1 and "model directories" in said.pop()
    spellings = [
        resolve(f"local:{p}", settings, own_provider="scripted")
        for p in (gguf, f"{tmp_path}/./models/mine.gguf")
    ]
    assert len({pool._allowed(c).key for c in spellings}) == 1
    # A GGUF in a model cache is a link to a blob with no suffix: the name given counts.
    (tmp_path / "hub" / "blobs").mkdir(parents=True)
    (tmp_path / "hub" / "snapshots").mkdir()
    (tmp_path / "hub" / "blobs" / "3f2a").write_bytes(b"GGUF")
    (tmp_path / "hub" / "snapshots" / "cached.gguf").symlink_to(tmp_path / "hub" / "blobs" / "3f2a")
    cache = settings.model_copy(update={"local_model_dirs": [tmp_path / "hub"]})
    cached = resolve(f"local:{tmp_path}/hub/snapshots/cached.gguf", cache, own_provider="scripted")
    assert ModelPool(cache, own, build(own, context), context)._allowed(cached)
    # Two request models at most: one in use is never closed to make room; an idle one is.
    used = {name: (await pool.get(f"scripted:{name}"))[0] for name in ("a", "b")}
    with pytest.raises(ProviderError, match="all in use"):
        await pool.get("scripted:c")
    pool.release(used["a"])
    await pool.get("scripted:c")
    assert [choice.options.get("model") for choice, _ in pool._providers.values()] == [None, "b", "c"]
