"""Settings shared by every Tekton process, loaded once and passed down as an object.

Priority: command-line arguments (init values), then the environment (``TEKTON_`` prefix), then a TOML
file (``$TEKTON_CONFIG`` or ``~/.config/tekton/config.toml``). The environment beats the file so that
one command can override a persistent setting, as with most Unix tools.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bus.errors import ConfigError
from bus.places import config_file, default_data_dir
from bus.subjects import DEFAULT_PREFIX, validate_prefix
from bus.usage import Budget, Period, Price


class TektonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEKTON_", extra="ignore")

    # One server, or the nodes of a cluster comma-separated (clients fail over between them).
    nats_url: str = "nats://127.0.0.1:4222"
    prefix: str = DEFAULT_PREFIX
    data_dir: Path = Field(default_factory=default_data_dir)
    # Client: how long a reply stream may stay silent (no token, no heartbeat) before we give up.
    idle_timeout_s: float = Field(default=10.0, gt=0)
    # Specialist: send a heartbeat after this long without any frame.
    heartbeat_s: float = Field(default=1.0, gt=0)
    # Specialist: the deadline of a request that brings none.
    request_timeout_s: float = Field(default=300.0, gt=0)
    # Specialist: requests one replica generates at once (more wait, with heartbeats).
    max_concurrency: int = Field(default=8, ge=1)
    # Specialist: "slots" keeps a full replica out of the queue group while another has room
    # (specialists/placement.py); "random" leaves the choice to the queue group alone.
    placement: Literal["slots", "random"] = "slots"
    # Specialist: on SIGTERM, how long in-flight streams may take to finish.
    drain_grace_s: float = Field(default=30.0, ge=0)
    # Run every specialist on this provider instead of the roster's (e.g. "scripted" in tests).
    provider: str | None = None
    # The default model of every specialist, ``provider:model`` (``ollama:qwen2.5:7b``,
    # ``anthropic:claude-3-5-haiku-latest``); None: the roster's (the bundled demo model).
    model: str | None = None
    # Specialist: where a GGUF file a request names (``-m local:PATH``) may be; the data dir's
    # ``models/`` and the specialist's own model's directory always are (docs/config.md).
    local_model_dirs: list[Path] = []
    # Specialist: how many models requests may have it keep besides its own (docs/config.md).
    request_models_max: int = Field(default=4, ge=0, le=64)
    # Model providers by name, each a table of that provider's options (``[providers.ollama]
    # base_url = ...``); ``type = "openai"`` makes a new name for any OpenAI-compatible server. The
    # environment (TEKTON_OPENAI_API_KEY, ...) beats these, as it beats the rest of the file.
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    roster: Path | None = None
    # nats-server's WebSocket listener: browser origins allowed to connect (None: the listener's own
    # http://localhost:PORT and http://127.0.0.1:PORT). JSON list in TEKTON_WS_ALLOWED_ORIGINS.
    ws_allowed_origins: list[str] | None = None
    # HTTP bridge: API tokens (JSON list; required unless it listens on localhost), requests per second
    # per token (or per client address without tokens) and the burst allowed, browser origins allowed
    # besides the bridge's own and loopback pages ("*": any), Host names it answers to (None: loopback
    # names when it listens on loopback, any elsewhere), the largest request body.
    http_tokens: list[str] | None = None
    http_rate_per_s: float = Field(default=50.0, gt=0)
    http_burst: float = Field(default=100.0, ge=1)
    http_allowed_origins: list[str] | None = None
    # Credentials file (see bus/auth.py; default: the data dir's file for this process's identity) and
    # the CA that signed the server's TLS certificate (default: the data dir's generated one for tls://).
    creds: Path | None = None
    tls_ca: Path | None = None
    # HTTP bridge: serve https with this certificate and key (`tekton up --tls` sets them).
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    http_allowed_hosts: list[str] | None = None
    http_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Gateway: how text is matched to specialists for @auto (see gateway/routing.py).
    routing_method: Literal["examples", "lexical", "embedding", "hybrid"] = "examples"
    # Gateway: who answers an @auto request that no specialist's profile matches.
    routing_generalist: str = "athena"
    # Gateway: a model that picks the specialist for @auto from their names and descriptions
    # (PROVIDER:MODEL, e.g. ollama:qwen2.5:7b), asked through the generalist (or any running
    # specialist); None: the embedding router alone. It falls back to that router on a timeout, an
    # error or an answer that names no running specialist.
    routing_model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:/@+-]{1,200}$")
    routing_model_timeout_s: float = Field(default=5.0, gt=0, le=120)
    # Gateway: a capability match below this score is not chosen.
    routing_threshold: float = Field(default=0.7, ge=0, le=1)
    # Gateway: operations of one bulk request running at once (a request may ask for fewer).
    bulk_max_concurrency: int = Field(default=16, ge=1, le=1024)
    # Gateway: sessions expire this long after their last change (the KV bucket's TTL); 0: they last
    # until deleted.
    session_ttl_s: float = Field(default=0.0, ge=0)
    # Gateway: turns kept in a stored session; older ones are dropped, oldest first.
    session_max_turns: int = Field(default=200, ge=2)
    # Gateway: the largest stored session value (bytes); at most the server's max_payload.
    session_max_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Runs (bus/runs.py): clients ask for durable runs (frames also kept in the runs stream).
    runs: bool = True
    # How long a finished run stays readable (the stream keeps frames request_timeout_s + this).
    runs_keep_s: float = Field(default=300.0, gt=0)
    # The runs stream's byte limit; the oldest frames go first when it is reached.
    runs_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    runs_storage: Literal["file", "memory"] = "file"
    # Specialist: a run nobody listens to any more keeps going this long for a client to come back.
    run_resume_window_s: float = Field(default=60.0, ge=0)
    # Gateway: a replica that has not said it is alive for this long is dead, and another takes over the
    # turns it was recording and the messages it had queued (gateway/leases.py); sweeps every half of it.
    gateway_lease_s: float = Field(default=6.0, gt=0)
    # Gateway: the sessions bucket's JetStream replicas (None: 3 on a cluster, 1 on a single server).
    session_replicas: int | None = Field(default=None, ge=1, le=5)
    # Gateway: tokens (prompt + completion) and USD each user may spend; None: no budget. Specialists
    # refuse the requests of a user at or over it (docs/observability.md). ``usage_budgets`` sets
    # them per user (``[usage_budgets.alice] tokens = 5000``, ``cost = 2.5``), over these defaults.
    # A period ("day", "week", "month", UTC; ``period = "day"`` per user) makes a budget per period.
    usage_budget_tokens: int | None = Field(default=None, ge=1)
    usage_budget_cost: float | None = Field(default=None, gt=0)
    usage_budget_period: Period | None = None
    usage_budgets: dict[str, Budget] = Field(default_factory=dict)
    # Specialist: what tokens cost, USD per million, by ``provider:model`` or ``provider``
    # (``[prices."openai:gpt-4o-mini"] input = 0.15, output = 0.6``); the ``done`` frame and the
    # usage book carry the cost of every answer a price covers.
    prices: dict[str, Price] = Field(default_factory=dict)
    # Specialist/gateway processes note their instances here for `tekton probe` (Kubernetes readiness).
    ready_file: Path | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return validate_prefix(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file()))


def load_settings(**overrides: object) -> TektonSettings:
    """Settings with the given command-line values on top (``None`` values mean "not given").

    A setting that cannot be used raises :class:`ConfigError`: one line naming where it came from."""
    given = {k: v for k, v in overrides.items() if v is not None}
    path = config_file()
    if path.exists() and not path.is_file():  # (pydantic-settings would skip it without a word)
        raise ConfigError(f"{path} is not a file: the config file is TOML")
    try:
        return TektonSettings(**given)  # type: ignore[arg-type]
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: the config file is TOML") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    except OSError as err:  # a directory, unreadable...
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except ValidationError as err:
        problem = err.errors(include_url=False)[0]
        field = str(problem["loc"][0]) if problem["loc"] else ""
        raise ConfigError(
            f"bad setting {field or '?'}: {problem['msg']} (from {_source(field, given, path)})"
        ) from None


def _source(field: str, given: dict[str, object], path: Path) -> str:
    """Where a setting's value came from, in the priority order of the sources."""
    if field in given:
        return "the command line"
    env = f"TEKTON_{field.upper()}"
    if any(k.upper() == env for k in os.environ):
        return f"${env}"
    return str(path)
