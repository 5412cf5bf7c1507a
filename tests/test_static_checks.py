"""Lint and strict typing are part of the suite, so CI enforces them (DESIGN §4.10)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(BIN)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency"
    r = _run(ruff, "check", "src", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_mypy_strict_on_core_layers():
    r = _run(sys.executable, "-m", "mypy", "--strict", "src/corral/kit", "src/corral/bus",
             "src/corral/transports", "src/corral/events", "src/corral/sessions",
             "src/corral/metering", "src/corral/device", "src/corral/integrations",
             "src/corral/cluster")
    assert r.returncode == 0, r.stdout + r.stderr
