"""Models by name: ``provider:model`` (``ollama:qwen2.5:7b``, ``anthropic:claude-3-5-haiku-latest``).

A provider name is an installed provider (the ``tekton.providers`` entry points: local, openai, ollama,
anthropic) or a table of the config file (``[providers.NAME]``, ``type = "openai"`` for any
OpenAI-compatible server). Options come from the roster, then the config file's table, with the
environment beating the file (``TEKTON_OPENAI_API_KEY``...), as everywhere else in Tekton.

A specialist keeps one provider per model it has been asked for (:class:`ModelPool`), so a request
naming a model is served by that model with the specialist's own persona.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from bus.settings import TektonSettings
from specialists.providers.base import (
    Provider,
    ProviderContext,
    ProviderError,
    create_provider,
    provider_class,
    provider_names,
)

# The providers `tekton models` asks; scripted is for tests and says nothing useful.
LISTED_EXCLUDE = {"scripted"}


@dataclass(frozen=True)
class ModelChoice:
    """A resolved model: the provider name a user sees, its entry point, and the options to build it."""

    provider: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.provider, repr(sorted(self.options.items()))


def _model_field(kind: str) -> str | None:
    """Which option of a provider names its model (``model``; ``model_path`` for a GGUF file)."""
    fields = provider_class(kind).Options.model_fields
    return next((f for f in ("model", "model_path") if f in fields), None)


def known_providers(settings: TektonSettings) -> list[str]:
    return sorted({*provider_names(), *settings.providers})


def provider_options(
    name: str, settings: TektonSettings, base: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The entry-point kind of provider ``name`` and its options: ``base`` (the roster's), then the config
    file's ``[providers.NAME]`` table for every option the environment does not set."""
    table = dict(settings.providers.get(name, {}))
    kind = str(table.pop("type", name))
    try:
        cls = provider_class(kind)
    except ProviderError:
        known = ", ".join(known_providers(settings))
        raise ProviderError(f"unknown provider {name!r} (known: {known})") from None
    prefix = str(cls.Options.model_config.get("env_prefix", ""))
    options = dict(base or {})
    env = {k.upper() for k in os.environ}
    for key, value in table.items():
        # TEKTON_OPENAI_* name the `openai` provider itself, not a server of that type under another
        # name: there the table wins.
        if name != kind or f"{prefix}{key}".upper() not in env:
            options[key] = value
    return kind, options


def resolve(
    spec: str | None,
    settings: TektonSettings,
    *,
    own_provider: str = "local",
    own_options: Mapping[str, Any] | None = None,
) -> ModelChoice:
    """The provider and options that serve model ``spec`` for a specialist whose own provider is
    ``own_provider``. ``provider:model`` picks a provider; a bare name is a model of the own provider."""
    if not spec:
        kind, options = provider_options(own_provider, settings, own_options)
        return ModelChoice(own_provider, kind, options)
    head, sep, rest = spec.partition(":")
    if head in known_providers(settings):  # `ollama:qwen2.5:7b`, or `ollama` for its default model
        provider, model = head, rest
        base: Mapping[str, Any] = (own_options or {}) if head == own_provider else {}
    else:
        provider, model = own_provider, spec
        base = own_options or {}
    kind, options = provider_options(provider, settings, base)
    field_name = _model_field(kind)
    if model:
        if field_name is None:
            raise ProviderError(f"provider {provider!r} takes no model name (asked for {spec!r})")
        if field_name == "model_path" and not model.startswith(("/", ".", "~")) and sep:
            known = ", ".join(known_providers(settings))
            raise ProviderError(
                f"unknown provider {head!r} in model {spec!r}: write PROVIDER:MODEL with one of {known}"
            )
        options[field_name] = os.path.expanduser(model) if field_name == "model_path" else model
    return ModelChoice(provider, kind, options)


def _bundled_model_path(kind: str) -> Path | None:
    """The bundled demo model, for a specialist on the local provider (its default model)."""
    if kind != "local":
        return None
    from specialists.providers.local import bundled_model_path

    return bundled_model_path()


def build(choice: ModelChoice, context: ProviderContext) -> Provider:
    return create_provider(choice.kind, choice.options, context)


class ModelPool:
    """One specialist's providers by model: its own, plus one per model a request has named."""

    def __init__(
        self, settings: TektonSettings, own: ModelChoice, provider: Provider, context: ProviderContext
    ):
        self.settings = settings
        self.own = own
        self.context = context
        self._providers: dict[tuple[str, str], tuple[ModelChoice, Provider]] = {own.key: (own, provider)}
        self._lock = anyio.Lock()

    async def get(self, spec: str | None) -> tuple[ModelChoice, Provider]:
        """The provider for model ``spec`` (None: the specialist's own), built on first use. At most
        ``request_models_max`` besides the own one are kept: the one used longest ago is closed."""
        if not spec:
            return self._providers[self.own.key]
        choice = resolve(spec, self.settings, own_provider=self.own.provider, own_options=self._own_base())
        choice = self._allowed(choice)
        async with self._lock:
            found = self._providers.pop(choice.key, None)
            if found is None:
                if self.settings.request_models_max == 0:
                    raise ProviderError("this specialist serves only its own model (request_models_max = 0)")
                while len(self._providers) > self.settings.request_models_max:
                    oldest = next(k for k in self._providers if k != self.own.key)
                    await self._providers.pop(oldest)[1].aclose()
                # A constructor may load a model file: keep it off the event loop.
                found = (choice, await anyio.to_thread.run_sync(build, choice, self.context))
            self._providers[choice.key] = found  # the newest last
        return found

    def _allowed(self, choice: ModelChoice) -> ModelChoice:
        """``choice``, unless it is a model file a request may not name: any machine's user may ask, so
        a file is a GGUF in the data dir's ``models/``, the own model's directory or
        ``local_model_dirs``, named by its real path (one model process per file however spelt)."""
        path = choice.options.get("model_path") if _model_field(choice.kind) == "model_path" else None
        if path is None:
            return choice
        real = Path(path).resolve()
        own = self.own.options.get("model_path") or _bundled_model_path(self.own.kind)
        dirs = [self.settings.data_dir / "models", *self.settings.local_model_dirs]
        dirs += [Path(own).resolve().parent] if own else []
        inside = any(real.is_relative_to(d.resolve()) for d in dirs)
        if not (inside and real.suffix.lower() == ".gguf" and real.is_file()):  # one answer for all: no
            raise ProviderError(  # telling a file that exists from one that does not
                "a request may name only a GGUF file in the specialist's model directories (its data "
                "dir's models/, its own model's, local_model_dirs)"
            )
        return ModelChoice(choice.provider, choice.kind, {**choice.options, "model_path": str(real)})

    def _own_base(self) -> dict[str, Any]:
        field_name = _model_field(self.own.kind)
        return {k: v for k, v in self.own.options.items() if k != field_name}

    async def aclose(self) -> None:
        for _, provider in self._providers.values():
            await provider.aclose()


async def list_models(settings: TektonSettings, within: float = 5.0) -> list[tuple[str, list[str], str]]:
    """What each provider offers: ``(provider, [model, ...], note)``; note says why a list is empty."""
    results: list[tuple[str, list[str], str]] = []

    async def one(name: str) -> None:
        try:
            kind, options = provider_options(name, settings)
            cls = provider_class(kind)
            lister = getattr(cls, "list_models", None)
            if lister is None:
                results.append((name, [], "this provider does not list its models"))
                return
            with anyio.fail_after(within):
                models = list(await lister(cls.Options(**options)))
            results.append((name, models, "" if models else "no models"))
        except TimeoutError:
            results.append((name, [], f"no answer within {within:g} s"))
        except ProviderError as err:
            results.append((name, [], err.message))
        except Exception as err:  # a bad option in the config file, say: one line, the others still run
            results.append((name, [], f"{type(err).__name__}: {err}".splitlines()[0]))

    async with anyio.create_task_group() as tg:
        for name in known_providers(settings):
            if name not in LISTED_EXCLUDE:
                tg.start_soon(one, name)
    return sorted(results)
