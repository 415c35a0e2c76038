"""The roster: which specialists exist, read from one data file (``deploy/roster.toml``)."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bus.errors import BusError
from bus.prompts import PROMPT_NAME, PromptTemplate
from bus.subjects import validate_name
from bus.wire import ChatOptions
from specialists.tools import McpServerSpec


class RosterError(BusError):
    pass


class SpecialistSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    system_prompt: str
    primary: list[str] = Field(min_length=1)
    capabilities: dict[str, float]
    keywords: list[str] = []
    examples: list[str] = []  # requests it is for, in varied phrasings (text routing learns from them)
    context_window: int = Field(default=2048, ge=1)
    cost_per_1k_tokens: float = Field(default=0.0, ge=0)
    features: list[str] = ["streaming"]
    provider: str
    provider_options: dict[str, Any] = Field(default_factory=dict)
    options: ChatOptions = ChatOptions()
    # MCP servers whose tools this specialist may call (specialists/tools.py), by name.
    mcp_servers: dict[str, McpServerSpec] = {}
    # Named prompt templates it offers, by name (bus/prompts.py; served as MCP prompts).
    prompts: dict[str, PromptTemplate] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("prompts")
    @classmethod
    def _prompt_names(cls, value: dict[str, PromptTemplate]) -> dict[str, PromptTemplate]:
        for name in value:
            if not re.match(PROMPT_NAME, name):
                raise ValueError(f"prompt name {name!r} must be lowercase letters, digits, '-' or '_'")
        return value

    @field_validator("capabilities")
    @classmethod
    def _scores(cls, value: dict[str, float]) -> dict[str, float]:
        for cap, score in value.items():
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"capability {cap!r} has score {score}, outside 0..1")
        return value

    @model_validator(mode="after")
    def _primary_are_capabilities(self) -> SpecialistSpec:
        missing = [p for p in self.primary if p not in self.capabilities]
        if missing:
            raise ValueError(f"primary capabilities without a score: {', '.join(missing)}")
        return self

    def micro_metadata(self, provider: str, model: str) -> dict[str, str]:
        """What ``$SRV.INFO`` tells the world about this specialist (micro metadata values are strings)."""
        return {
            "tekton_role": "specialist",
            "primary": json.dumps(self.primary),
            "capabilities": json.dumps(self.capabilities),
            "provider": provider,
            "model": model,
            "max_tokens": str(self.options.max_tokens or ""),
            "keywords": json.dumps(self.keywords),
            "context_window": str(self.context_window),
            "cost_per_1k_tokens": str(self.cost_per_1k_tokens),
            "features": json.dumps(self.features),
        }

    def endpoint_metadata(self) -> dict[str, str]:
        """What only ``$SRV.INFO`` carries (on the chat endpoint): the example requests text routing
        learns from. Kept out of the service metadata, which every PING and STATS answer repeats."""
        meta = {"examples": json.dumps(self.examples, ensure_ascii=False)}
        if self.prompts:
            prompts = {name: p.model_dump(exclude_defaults=True) for name, p in self.prompts.items()}
            meta["prompts"] = json.dumps(prompts, ensure_ascii=False)
        return meta


def default_roster_path() -> Path:
    return Path(str(resources.files("deploy") / "roster.toml"))


def load_roster(path: Path | None = None, provider_override: str | None = None) -> dict[str, SpecialistSpec]:
    path = path or default_roster_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise RosterError(f"cannot read roster {path}: {err}") from err
    except UnicodeDecodeError:
        raise RosterError(f"cannot read roster {path}: not UTF-8 text") from None
    defaults = data.get("defaults", {})
    roster: dict[str, SpecialistSpec] = {}
    for name, entry in (data.get("specialists") or {}).items():
        merged = {
            "provider": defaults.get("provider", "local"),
            "provider_options": defaults.get("provider_options", {}),
            **{k: defaults[k] for k in ("context_window", "cost_per_1k_tokens", "features") if k in defaults},
            **entry,
            "name": name,
        }
        merged["options"] = {**defaults.get("options", {}), **entry.get("options", {})}
        if provider_override:
            merged["provider"] = provider_override
            merged["provider_options"] = {}
        try:
            roster[name] = SpecialistSpec.model_validate(merged)
        except ValidationError as err:
            raise RosterError(f"roster {path}: specialist {name!r} is invalid: {err}") from err
    if not roster:
        raise RosterError(f"roster {path} lists no specialists")
    return roster
