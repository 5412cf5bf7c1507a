"""Request models of the integration routes (Particle's field names, JSON or form bodies).

Particle's clients spell a few fields differently (``deviceID``, ``deviceid``, ``deviceId``;
``auth`` as ``{username, password}``, ``{user, pass}`` or ``{bearer}``) and a form-encoded
body cannot nest objects, so an object field may also come as a JSON string.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corral.integrations import templates
from corral.kit.body import Int, RequestModel, Timestamp
from corral.kit.errors import BadRequest
from corral.kit.responses import Answer
from corral.kit.text import MAX_JSON_DEPTH, bounded_loads, json_depth

WEBHOOK = "Webhook"
MQTT = "MQTT"
TYPES = {"webhook": WEBHOOK, "mqtt": MQTT}
DEVICE_ID = re.compile(r"^[0-9a-fA-F]{24}$")
TEMPLATE_MAX = 16_384
METHODS = ("GET", "POST", "PUT", "DELETE")
DEFAULT_MQTT_TOPIC = "corral/{{{PARTICLE_DEVICE_ID}}}/{{{PARTICLE_EVENT_NAME}}}"


def _object(value: Any, field: str) -> Any:
    """An object field, possibly sent as JSON text (form bodies cannot nest)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text[0] in "{[":
            try:
                return bounded_loads(text)
            except ValueError:
                raise ValueError(f"{field} must be a JSON object") from None
    return value


def _bool(value: Any) -> Any:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("", "0", "false", "no", "off"):
            return False
        if low in ("1", "true", "yes", "on"):
            return True
    return value


def _text_map(value: Any, field: str) -> dict[str, str] | None:
    value = _object(value, field)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be an object of names to values")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > 256:
            raise ValueError(f"{field}: names are text of 1 to 256 characters")
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, int | float):
            v = str(v)
        if not isinstance(v, str) or len(v) > TEMPLATE_MAX:
            raise ValueError(f"{field}: values are text of at most {TEMPLATE_MAX} characters")
        out[k] = v
    return out


def _template(value: Any) -> Any:
    try:
        templates.check(value)
    except templates.TemplateError as exc:
        raise ValueError(str(exc)) from None
    return value


class Auth(BaseModel):
    """HTTP basic credentials or a bearer token (both are secrets: shown masked)."""

    model_config = ConfigDict(extra="forbid")

    username: str | None = Field(default=None, max_length=1024)
    password: str | None = Field(default=None, max_length=1024)
    bearer: str | None = Field(default=None, max_length=4096)

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, value: Any) -> Any:
        value = _object(value, "auth")
        if isinstance(value, dict):
            value = dict(value)
            if "user" in value:
                value.setdefault("username", value.pop("user"))
            if "pass" in value:
                value.setdefault("password", value.pop("pass"))
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Auth:
        if self.bearer and (self.username or self.password):
            raise ValueError("auth is either username/password or bearer")
        return self


class Common(BaseModel):
    """Fields every integration type has."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    integration_type: str = WEBHOOK
    event: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    device_id: str | None = None
    disabled: bool = False

    @model_validator(mode="before")
    @classmethod
    def _device_spellings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)
            for alias in ("deviceID", "deviceid", "deviceId", "device"):
                if alias in value:
                    got = value.pop(alias)
                    if value.get("device_id") in (None, ""):
                        value["device_id"] = got
        return value

    @field_validator("integration_type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> Any:
        if value in (None, ""):
            return WEBHOOK
        if not isinstance(value, str) or value.lower() not in TYPES:
            raise ValueError("integration_type must be Webhook or MQTT")
        return TYPES[value.lower()]

    @field_validator("event")
    @classmethod
    def _event(cls, value: str) -> str:
        if not value.isprintable() or value != value.strip():
            raise ValueError("event is a prefix of printable characters")
        return value

    @field_validator("device_id", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        if not isinstance(value, str) or not DEVICE_ID.fullmatch(value):
            raise ValueError("deviceID must be a 24-character hex device ID")
        return value.lower()

    @field_validator("disabled", mode="before")
    @classmethod
    def _disabled(cls, value: Any) -> Any:
        return _bool(value)


class WebhookConfig(Common):
    """A webhook (Particle's ``integration_type: Webhook``)."""

    url: str = Field(min_length=1, max_length=2048)
    requestType: str = "POST"
    json_: dict[str, Any] | list[Any] | str | None = Field(default=None, alias="json")
    form: dict[str, str] | None = None
    body: str | None = Field(default=None, max_length=TEMPLATE_MAX)
    query: dict[str, str] | None = None
    headers: dict[str, str] | None = None
    auth: Auth | None = None
    responseTopic: str | None = Field(default=None, max_length=256)
    errorResponseTopic: str | None = Field(default=None, max_length=256)
    responseTemplate: str | None = Field(default=None, max_length=TEMPLATE_MAX)
    noDefaults: bool = False
    rejectUnauthorized: bool = True
    followRedirects: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip()
        # the scheme and host cannot come from a template: the target is decided here
        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname \
                or "{{" in (parts.netloc or ""):
            raise ValueError("url must be an http:// or https:// URL with a fixed host")
        _template(value)
        return value

    @field_validator("requestType", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        if value in (None, ""):
            return "POST"
        if not isinstance(value, str) or value.upper() not in METHODS:
            raise ValueError("requestType must be GET, POST, PUT or DELETE")
        return value.upper()

    @field_validator("json_", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        if isinstance(value, str):
            if len(value) > TEMPLATE_MAX:
                raise ValueError(f"json is at most {TEMPLATE_MAX} characters")
            try:  # a JSON text is an object; anything else is a template of one
                parsed = json.loads(value)
                if isinstance(parsed, dict | list):
                    value = parsed
            except RecursionError:
                raise ValueError(f"json nests more than {MAX_JSON_DEPTH} levels deep") from None
            except ValueError:
                pass
        elif not isinstance(value, dict | list):
            raise ValueError("json must be an object or a template text")
        if not isinstance(value, str) and json_depth(value) > MAX_JSON_DEPTH:
            raise ValueError(f"json nests more than {MAX_JSON_DEPTH} levels deep")
        if len(json.dumps(value)) > 4 * TEMPLATE_MAX:
            raise ValueError("json is too large")
        return _template(value)

    @field_validator("form", "query", "headers", mode="before")
    @classmethod
    def _maps(cls, value: Any, info: Any) -> Any:
        return _template(_text_map(value, info.field_name))

    @field_validator("body", "responseTopic", "errorResponseTopic", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise ValueError("must be text")
        return _template(value)

    @field_validator("responseTemplate", mode="before")
    @classmethod
    def _response_template(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        if isinstance(value, dict | list):  # Particle's docs show an object too
            value = json.dumps(value)
        if not isinstance(value, str):
            raise ValueError("responseTemplate must be text")
        return _template(value)

    @field_validator("noDefaults", "rejectUnauthorized", "followRedirects", mode="before")
    @classmethod
    def _flags(cls, value: Any) -> Any:
        return _bool(value)

    @model_validator(mode="after")
    def _one_body(self) -> WebhookConfig:
        if sum(x is not None for x in (self.json_, self.form, self.body)) > 1:
            raise ValueError("json, form and body are mutually exclusive")
        return self

    def settings(self) -> dict[str, Any]:
        """What is stored in ``Integration.settings`` (Particle's names; unset left out)."""
        out: dict[str, Any] = {"url": self.url, "requestType": self.requestType,
                               "noDefaults": self.noDefaults,
                               "rejectUnauthorized": self.rejectUnauthorized,
                               "followRedirects": self.followRedirects}
        for key, value in (("json", self.json_), ("form", self.form), ("body", self.body),
                           ("query", self.query), ("headers", self.headers),
                           ("responseTopic", self.responseTopic),
                           ("errorResponseTopic", self.errorResponseTopic),
                           ("responseTemplate", self.responseTemplate)):
            if value is not None:
                out[key] = value
        if self.auth is not None:
            out["auth"] = self.auth.model_dump(exclude_none=True)
        return out


class MqttConfig(Common):
    """Forwarding to an external MQTT broker (corral's ``integration_type: MQTT``)."""

    url: str = Field(min_length=1, max_length=2048)  # mqtt://host[:port] or mqtts://...
    topic: str = Field(default=DEFAULT_MQTT_TOPIC, min_length=1, max_length=1024)
    payload: str | None = Field(default=None, max_length=TEMPLATE_MAX)
    qos: Literal[0, 1] = 1
    retain: bool = False
    auth: Auth | None = None
    clientId: str | None = Field(default=None, max_length=128)
    rejectUnauthorized: bool = True
    ca: str | None = Field(default=None, max_length=65_536)  # PEM, to trust a private CA

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme.lower() not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("url must be mqtt://host[:port] or mqtts://host[:port]")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("url has a bad port") from None
        if parts.username or parts.password:
            raise ValueError("put broker credentials in auth, not in the url")
        return value.strip()

    @field_validator("topic", "payload", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be text")
        return _template(value)

    @field_validator("qos", mode="before")
    @classmethod
    def _qos(cls, value: Any) -> Any:
        if value in (None, ""):
            return 1
        if isinstance(value, str) and value.strip() in ("0", "1"):
            return int(value)
        return value

    @field_validator("retain", "rejectUnauthorized", mode="before")
    @classmethod
    def _flags(cls, value: Any) -> Any:
        return _bool(value)

    @model_validator(mode="after")
    def _auth(self) -> MqttConfig:
        if self.auth is not None and self.auth.bearer:
            raise ValueError("MQTT auth is a username and password")
        return self

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "topic": self.topic, "qos": self.qos,
                               "retain": self.retain,
                               "rejectUnauthorized": self.rejectUnauthorized}
        for key, value in (("payload", self.payload), ("clientId", self.clientId),
                           ("ca", self.ca)):
            if value is not None:
                out[key] = value
        if self.auth is not None:
            out["auth"] = self.auth.model_dump(exclude_none=True)
        return out


Config = WebhookConfig | MqttConfig


def parse_config(body: dict[str, Any], *, default_type: str | None = None) -> Config:
    """The body of a create or edit as a config model; 400 with the first problem."""
    kind = body.get("integration_type") or default_type or WEBHOOK
    model: type[WebhookConfig] | type[MqttConfig] = (
        MqttConfig if isinstance(kind, str) and kind.lower() == "mqtt" else WebhookConfig)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "json_") or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "is required"
        raise BadRequest(f"{where}: {msg}", code="invalid_request") from None


class IntegrationRequest(RequestModel):
    """A create or an edit (``PUT`` replaces the configuration). What this model names is
    what every type has; the rest depends on ``integration_type`` (:class:`WebhookConfig`,
    :class:`MqttConfig`: Particle's field names) and is checked by :func:`parse_config`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    integration_type: str | None = Field(None, description="Webhook (default) or MQTT")
    event: str | None = Field(None, description="the event-name prefix that triggers it")
    url: str | None = Field(None, description="http(s):// target, or mqtt(s)://host[:port]")
    name: str | None = None
    deviceID: str | None = None
    disabled: Any = None

    def fields(self) -> dict[str, Any]:
        """What was sent, in the clients' spellings."""
        return {**self.model_dump(exclude_unset=True), **(self.model_extra or {})}


class RedeliverRequest(RequestModel):
    """``event_id``: one stored event; else every failed or skipped delivery created in
    [``since``, ``until``) (ISO 8601 times)."""

    event_id: Int | None = Field(None, ge=1)
    since: Timestamp | None = None
    until: Timestamp | None = None


class TestRequest(RequestModel):
    """``POST .../integrations/:id/test``: the test event's data and device."""

    data: str = Field(default="test-event", max_length=16_384)
    device_id: str | None = None

    @field_validator("device_id", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        if value in (None, "", "api"):
            return None
        if not isinstance(value, str) or not DEVICE_ID.fullmatch(value):
            raise ValueError("device_id must be a 24-character hex device ID")
        return value.lower()

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, value: Any) -> Any:
        if value in (None, ""):
            return "test-event"
        if isinstance(value, dict | list):
            return json.dumps(value)
        return value


class PageQuery(RequestModel):
    """``limit`` (at most 500) entries before the id ``before``, newest first."""

    limit: Int = Field(50, ge=1, le=500)
    before: Int | None = Field(None, ge=1, le=2**63 - 1)


class DeliveryQuery(PageQuery):
    status: Literal["pending", "success", "failed", "skipped"] | None = None


class MetricsQuery(RequestModel):
    """Particle's integration traffic metrics query."""

    start_date: Timestamp | None = Field(None, description="Default: a day before end_date")
    end_date: Timestamp | None = Field(None, description="Default: now")
    bucket_size: Int = Field(900, ge=16, le=31 * 86_400, description="Seconds")
    product_fw: Int | None = Field(None, ge=0, le=65_535)
    device_os_version: str | None = Field(None, max_length=32)
    device_group: str | None = Field(None, max_length=64)


# --- answers ---------------------------------------------------------------------------------

class IntegrationCreated(Answer):
    ok: bool
    id: str
    event: str
    name: str | None
    created_at: str | None
    integration_type: str
    hookUrl: str
    signing_secret: str


class IntegrationListItem(Answer):
    id: str
    event: str
    created_at: str | None
    integration_type: str
    disabled: bool


class IntegrationObject(Answer):
    id: str
    integration_type: str
    event: str
    disabled: bool
    status: str
    signing_secret: str | None
    hookUrl: str


class IntegrationAnswer(Answer):
    integration: IntegrationObject


class WebhookAnswer(IntegrationObject):
    ok: bool


class TestAnswer(Answer):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    passed: bool = Field(alias="pass")
    data: str | None
    error: str | None
    status_code: int | None


class AttemptObject(Answer):
    id: int
    at: str | None
    outcome: str
    status_code: int | None
    latency_ms: int | None


class LogAnswer(Answer):
    log: list[AttemptObject]


class DeliveryObject(Answer):
    id: int
    event_id: int
    status: str
    attempts: int
    idempotency_id: str


class DeliveriesAnswer(Answer):
    deliveries: list[DeliveryObject]


class RedeliverAnswer(Answer):
    ok: bool
    redelivered: int
    delivery: DeliveryObject | None = None


class SigningSecretAnswer(Answer):
    ok: bool
    signing_secret: str


class MetricsAnswer(Answer):
    integrations: list[dict[str, Any]]
