"""FastAPI's own OpenTelemetry hook is off unless asked for (CORRAL_HTTP_TELEMETRY): on,
every request looks up the global providers (bench/README B1)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider

from corral.settings import Settings
from corral.web.app import create_app


def test_fastapi_telemetry_follows_the_setting(settings: Settings,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # a process whose OpenTelemetry tracer provider is configured (not the API's proxy)
    monkeypatch.setattr(trace, "get_tracer_provider", NoOpTracerProvider)
    off = create_app(settings)
    assert not off._native_telemetry.enabled()  # type: ignore[attr-defined]
    on = create_app(settings.model_copy(update={"http_telemetry": True}))
    assert on._native_telemetry.enabled()  # type: ignore[attr-defined]
