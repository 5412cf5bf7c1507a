"""The CLI's configuration: settings (``CORRAL_*`` with command-line options on top) and the
stored login, ``$XDG_CONFIG_HOME/corral/config.json``, readable only by its owner."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from corral.cli.output import fail
from corral.settings import Settings


def settings_from(**overrides: Any) -> Settings:
    """``CORRAL_*`` settings with the command-line options that were given on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        fail(f"Invalid setting: {exc}", code=2)


def load(path: Path) -> dict[str, Any]:
    """The stored config, or ``{}`` when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(path: Path, data: dict[str, Any]) -> None:
    """Write atomically with mode 0600 (the file holds a bearer token)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask; be explicit
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
