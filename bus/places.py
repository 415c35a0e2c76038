"""Where Tekton keeps its files: the config file and the data dir (pure functions of the environment;
no pydantic here, so a one-shot aish finds them without loading bus.settings)."""

from __future__ import annotations

import os
from pathlib import Path


def config_file() -> Path:
    """Where the config file is: ``$TEKTON_CONFIG``, else ``$XDG_CONFIG_HOME/tekton/config.toml``."""
    explicit = os.environ.get("TEKTON_CONFIG")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "tekton" / "config.toml"


def default_data_dir() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "tekton"
