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
        self._busy: dict[tuple[str, str], int] = {}  # requests using each request-named model now
        self._lock = anyio.Lock()

    async def get(self, spec: str | None) -> tuple[ModelChoice, Provider]:
        """The provider for model ``spec`` (None: the specialist's own), built on first use; the
        caller gives it back with :meth:`release`. At most ``request_models_max`` are kept besides the
        own one: to make room, the one used longest ago that no request is using is closed."""
        if not spec:
            return self._providers[self.own.key]
        choice = resolve(spec, self.settings, own_provider=self.own.provider, own_options=self._own_base())
        if self._names_a_file(choice):
            choice = self._allowed(choice)
            if choice.options["model_path"] == self._own_path():  # the own model, however spelt
                return self._providers[self.own.key]
        async with self._lock:
            found = self._providers.pop(choice.key, None)
            if found is None:
                extra = [k for k in self._providers if k != self.own.key]
                if len(extra) >= self.settings.request_models_max:
                    idle = [k for k in extra if not self._busy.get(k)]
                    if not idle:
                        raise ProviderError(
                            f"this specialist serves at most {self.settings.request_models_max} models "
                            "besides its own, all in use now (request_models_max): ask again soon"
                        )
                    await self._providers.pop(idle[0])[1].aclose()
                # A constructor may load a model file: keep it off the event loop.
                found = (choice, await anyio.to_thread.run_sync(build, choice, self.context))
            self._providers[choice.key] = found  # the newest last
            self._busy[choice.key] = self._busy.get(choice.key, 0) + 1
        return found

    def release(self, choice: ModelChoice) -> None:
        """A request is done with the provider :meth:`get` gave it for ``choice``."""
        if (left := self._busy.get(choice.key, 0) - 1) > 0:
            self._busy[choice.key] = left
        else:
            self._busy.pop(choice.key, None)

    def _names_a_file(self, choice: ModelChoice) -> bool:
        """Whether the request named ``choice``'s model file itself (not one set by whoever started
        the specialist: its provider's table in the config file, its options)."""
        if _model_field(choice.kind) != "model_path" or choice.options.get("model_path") is None:
            return False
        configured = resolve(
            choice.provider, self.settings, own_provider=self.own.provider, own_options=self._own_base()
        )
        return configured.options.get("model_path") != choice.options["model_path"]

    def _own_path(self) -> str | None:
        """The own model's file, as its real path (the local provider's, default or configured)."""
        path = getattr(self._providers[self.own.key][1], "path", None)
        return str(Path(path).resolve()) if path else None

    def _allowed(self, choice: ModelChoice) -> ModelChoice:
        """``choice``, unless it is a model file a request may not name: any machine's user may ask, so
        a file is a GGUF in the data dir's ``models/``, the own model's directory or
        ``local_model_dirs``, named by its real path (one model process per file however spelt)."""
        path = choice.options["model_path"]
        given, real = Path(path), Path(path).resolve()  # (a GGUF in a model cache links to a blob)
        own = self._own_path()
        dirs = [self.settings.data_dir / "models", *self.settings.local_model_dirs]
        dirs += [Path(own).parent] if own else []
        inside = any(real.is_relative_to(d.resolve()) for d in dirs)
        if not (inside and given.suffix.lower() == ".gguf" and real.is_file()):  # one answer for all: no
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
