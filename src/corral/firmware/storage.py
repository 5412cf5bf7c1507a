"""Firmware binaries on disk: stored once per content under
``<data_dir>/firmware/<sha[:2]>/<sha256>`` (the database holds the metadata)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from corral.firmware.models import ProductFirmware
from corral.settings import Settings


def firmware_dir(settings: Settings) -> Path:
    return settings.data_dir / "firmware"


def blob_path(settings: Settings, sha256: str) -> Path:
    """Where the binary with this SHA-256 lives (content-addressed: one file per content)."""
    return firmware_dir(settings) / sha256[:2] / sha256


def store_blob(settings: Settings, data: bytes, sha256: str) -> Path:
    """Write ``data`` under its digest (atomically; an existing copy is kept)."""
    path = blob_path(settings, sha256)
    if path.is_file() and path.stat().st_size == len(data):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_blob(settings: Settings, fw: ProductFirmware) -> bytes:
    return blob_path(settings, fw.sha256).read_bytes()
