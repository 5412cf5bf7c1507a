"""Request bodies and query strings, read into pydantic models: one reader for every route.

Particle's clients send a body as JSON, as form fields (``application/x-www-form-urlencoded``)
or as ``multipart/form-data``; particle-cli nests some of them (``{"product": {...}}``, or
form keys such as ``product[settings][quarantine]``), and the clients spell some names two
ways (``per_page`` / ``perPage``). :func:`body` reads any of these into one
:class:`RequestModel`, :func:`query` reads the query string into one. Whatever does not
validate answers in Particle's shape, 400 ``{"ok": false, "error": "invalid_request",
"error_description": "..."}``, never FastAPI's 422. NUL characters are refused anywhere in a
body (PostgreSQL cannot store them); ``access_token`` (a credential, read by
:mod:`corral.auth.deps`) never reaches a model; body sizes are limited before any of this
runs (:class:`corral.web.middleware.BodyLimit`).

How a route takes input (every domain the same way)::

    # <domain>/schemas.py: request models (and response models)
    class ProductChange(RequestModel):
        NEST = "product"                   # also accepted nested under "product"
        name: str | None = Field(None, max_length=200)
        tags: StrList | None = None        # a JSON list, repeated fields, or "a,b"
        quarantine: Flag = False           # true/false, 1/0, yes/no, on/off; "" is false

    # <domain>/api.py: the route stays thin. The guard comes first: FastAPI resolves
    # dependencies in order, so the caller is authenticated and allowed before the body
    # is judged (a Viewer gets 403, not 400, whatever it sends).
    @router.put("/v1/products/{product}", responses=answers(ProductAnswer, 409))
    async def update_product(pc: ProductCtx = Depends(ProductGuard("products:update")),
                             req: ProductChange = body(ProductChange)):
        return await service.update_product(pc.db, ..., req=req)

    # <domain>/service.py: rules on typed input
    async def update_product(db, *, ..., req: ProductChange) -> ...:
        if "name" in req.model_fields_set: ...   # a partial update: what was sent

Rules the reader applies before validation, so models stay plain:

* a form field sent once is a string, sent more than once a list of strings;
* a blank value (``""``) counts as ``null``, and ``null`` for a field that cannot be null
  means "not given" (its default applies; a required field is missing). A model that must
  tell blank from absent declares ``BLANK_IS_NULL = False``;
* a model with ``NEST = "key"`` takes its fields from ``body[key]`` when the body has that
  key (an object, or, in a form, its JSON text), otherwise from the body itself;
* ``a[b][c]`` keys become nested objects (qs style, as Express parses forms);
* unknown fields are ignored unless the model sets ``extra="forbid"`` (then 400 names them).

Services receive the model; they never see the raw body. ``corral.web.openapi`` finds these
readers on each route and documents the model as the body of ``application/json``,
``application/x-www-form-urlencoded`` and ``multipart/form-data`` (or as query parameters).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, ClassVar, TypeVar, get_args

from fastapi import Depends, Request
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    model_validator,
)
from starlette.datastructures import UploadFile

from corral.kit.errors import BadRequest, PayloadTooLarge
from corral.kit.text import MAX_JSON_DEPTH, bounded_loads, json_depth
from corral.kit.text import reject_json_constant as _reject_constant

M = TypeVar("M", bound="RequestModel")

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
BODY_TYPES = ("application/json", *FORM_TYPES)
# what the document lists for a body without files: JSON and a form (multipart is accepted
# too, but documenting it for plain fields makes generated clients send every field twice)
FIELD_TYPES = ("application/json", "application/x-www-form-urlencoded")


class RequestModel(BaseModel):
    """The base of every request model (a body or a query string)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    NEST: ClassVar[str | None] = None  # Particle's nested variant: {"<NEST>": {...fields}}
    # the error code a refusal names when its first problem is this field (default
    # invalid_request), e.g. {"role": "invalid_role"}
    ERROR_CODES: ClassVar[dict[str, str]] = {}
    BLANK_IS_NULL: ClassVar[bool] = True  # "" counts as null (a blank form field)

    @model_validator(mode="before")
    @classmethod
    def _blanks(cls, data: Any) -> Any:
        """A null (or blank) value of a field that cannot be null means "not given": the
        field's default applies, or, for a required field, it is missing."""
        if not isinstance(data, dict):
            return data
        fields = _not_nullable(cls)
        out: dict[str, Any] = {}
        for key, value in data.items():
            if value == "" and cls.BLANK_IS_NULL:
                value = None
            if value is None and key in fields:
                continue
            out[key] = value
        return out

    def sent(self, *names: str) -> bool:
        """Whether any of ``names`` was in the request (partial updates)."""
        return any(n in self.model_fields_set for n in names)


_NOT_NULLABLE: dict[type[BaseModel], frozenset[str]] = {}


def _not_nullable(cls: type[BaseModel]) -> frozenset[str]:
    """The names (and every accepted alias) of ``cls``'s fields that do not accept null."""
    names = _NOT_NULLABLE.get(cls)
    if names is None:
        found: set[str] = set()
        for name, field in cls.model_fields.items():
            if field.annotation is Any or type(None) in get_args(field.annotation):
                continue
            found.add(name)
            alias = field.validation_alias
            if isinstance(alias, str):
                found.add(alias)
            elif isinstance(alias, AliasChoices):
                found.update(c for c in alias.choices if isinstance(c, str))
            if field.alias:
                found.add(field.alias)
        names = _NOT_NULLABLE[cls] = frozenset(found)
    return names


class EmptyBody(RequestModel):
    """A route that takes no fields (anything sent is ignored)."""


# --- types with Particle's lenient spellings -------------------------------------------------

def _flag(value: Any) -> Any:
    if value is None:
        return False
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("must be a boolean (true or false)")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("must be a boolean (true or false)")


def _str_list(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _json_text(value: Any) -> Any:
    if isinstance(value, str):  # a form carries an object as its JSON text
        try:
            return bounded_loads(value)
        except ValueError:
            raise ValueError("must be an object") from None
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]
"""A boolean: JSON true/false, or ``1/0``, ``true/false``, ``yes/no``, ``on/off``; blank is false."""
StrList = Annotated[list[str], BeforeValidator(_str_list)]
"""A list of strings: a JSON list, a repeated form field, or one comma-separated string."""
Int = Annotated[int, BeforeValidator(_no_bool)]
"""An integer, from JSON or from decimal text; ``true``/``false`` are not integers."""
Number = Annotated[float, BeforeValidator(_no_bool)]
"""A number, from JSON or from decimal text; ``true``/``false`` are not numbers."""
JsonText = BeforeValidator(_json_text)
"""For a nested model field: in a form, the object arrives as its JSON text
(``settings: Annotated[ProductSettings, JsonText] | None``)."""
JsonObject = Annotated[dict[str, Any], JsonText]
"""An object, or (in a form) its JSON text."""


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


Timestamp = Annotated[dt.datetime, AfterValidator(_utc)]
"""An ISO 8601 time (``Z`` or an offset; none means UTC), as an aware datetime."""


# --- reading ---------------------------------------------------------------------------------

def check_no_nul(value: Any) -> None:
    """Text with NUL characters is refused: PostgreSQL cannot store it, and no field needs it."""
    if isinstance(value, str):
        if "\x00" in value:
            raise BadRequest("NUL characters are not allowed", code="invalid_request")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_no_nul(k)
            check_no_nul(v)
    elif isinstance(value, list):
        for v in value:
            check_no_nul(v)




def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def uploaded_file(request: Request, text: str | None, limit: int) -> bytes | str | None:
    """The content of the multipart ``file`` (an uploaded file, at most ``limit`` bytes),
    else ``text`` (the model's ``file`` field: a plain form or JSON field of that name)."""
    if content_type(request) == "multipart/form-data":
        value = (await request.form()).get("file")  # parsed once, by the body reader
        if isinstance(value, UploadFile):
            data = await value.read(limit + 1)
            if len(data) > limit:
                raise PayloadTooLarge(f"The file is larger than {limit:,} bytes")
            return data
    return text


def multi_dict(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Form or query items as a dict: a key sent once is its value, more often a list."""
    out: dict[str, Any] = {}
    for key, value in items:
        if key == "access_token" or isinstance(value, UploadFile):
            continue  # a credential, not a field; files are read by their routes
        if key in out:
            prev = out[key]
            out[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[key] = value
    return out


def unbracket(data: dict[str, Any]) -> dict[str, Any]:
    """Turn keys like ``product[settings][quarantine]`` into nested objects (qs style)."""
    if not any("[" in k for k in data):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        parts = [p.rstrip("]") for p in key.split("[")] if "[" in key else [key]
        if len(parts) > MAX_JSON_DEPTH:  # as a JSON body's depth: past it, encoders recurse out
            raise BadRequest(f"A form field's name nests more than {MAX_JSON_DEPTH} levels",
                             code="invalid_request")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


def json_object_body(raw: bytes) -> dict[str, Any]:
    """A JSON request body that must be an object. 400 (``invalid_json``) when it is not
    JSON, not an object, or nests deeper than ``MAX_JSON_DEPTH``: a document that parses
    can still be too deep for the answer's or the database's encoder (a 500 otherwise)."""
    try:
        parsed = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest("Request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(parsed, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    if json_depth(parsed) > MAX_JSON_DEPTH:
        raise BadRequest(f"Request body nests more than {MAX_JSON_DEPTH} levels of objects "
                         "and arrays", code="invalid_json")
    return parsed


async def raw_body(request: Request) -> dict[str, Any]:
    """The body as a dict (``{}`` for none), from JSON or a form. 400 on malformed JSON, a
    body that is not an object, or NUL characters."""
    ctype = content_type(request)
    if ctype in FORM_TYPES:
        form = await request.form()
        data = unbracket(multi_dict(form.multi_items()))
    else:
        raw = await request.body()
        if not raw.strip():
            return {}
        parsed = json_object_body(raw)
        parsed.pop("access_token", None)
        data = unbracket(parsed)
    check_no_nul(data)
    return data


def describe_errors(exc: ValidationError, where: str = "") -> str:
    """One line for Particle's ``error_description``: the first few problems, by field."""
    parts: list[str] = []
    unknown: list[str] = []
    for e in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in e.get("loc", ()))
        if e.get("type") == "extra_forbidden":
            unknown.append(loc)
            continue
        msg = str(e.get("msg", "is not valid")).removeprefix("Value error, ")
        if not loc:
            parts.append(msg)
        elif e.get("type") == "missing":
            parts.append(f"{where}{loc} is required")
        else:
            parts.append(f"{where}{loc}: {msg}")
    if unknown:
        parts.insert(0, f"Unknown fields: {', '.join(sorted(unknown)[:10])}")
    return "; ".join(parts[:5]) or "The request is not valid"


def validate(model: type[M], data: dict[str, Any], where: str = "") -> M:
    """``data`` as ``model``; 400 ``invalid_request`` naming the fields that do not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        first = problems[0].get("loc", ("",))
        code = model.ERROR_CODES.get(str(first[0]) if first else "", "invalid_request")
        # ``errors`` lists the problems by field (the console places them next to its inputs)
        raise BadRequest(describe_errors(exc, where), code=code, errors=[
            {"loc": [str(x) for x in e.get("loc", ())],
             "msg": str(e.get("msg", "")).removeprefix("Value error, ")}
            for e in problems[:20]]) from None


def from_body(model: type[M], data: dict[str, Any]) -> M:
    """``data`` (a raw body) as ``model``, Particle's nested variant included."""
    nest = model.NEST
    if nest is not None and nest in data:
        inner = data[nest]
        if isinstance(inner, str):
            try:
                inner = bounded_loads(inner)
            except ValueError:
                inner = None
        if not isinstance(inner, dict):
            raise BadRequest(f"{nest} must be an object", code="invalid_request")
        data = inner
    return validate(model, data)


def body(model: type[M], *, files: bool = False) -> Any:
    """A dependency: the request body (JSON or form, nested or flat) as ``model``. ``files``:
    the route also takes an uploaded file (its document lists ``multipart/form-data``)."""

    async def read_body_model(request: Request) -> M:
        return from_body(model, await raw_body(request))

    read_body_model.request_model = model  # type: ignore[attr-defined]  # for the OpenAPI document
    read_body_model.request_in = "body"  # type: ignore[attr-defined]
    read_body_model.request_media = BODY_TYPES if files else FIELD_TYPES  # type: ignore[attr-defined]
    return Depends(read_body_model)


def query(model: type[M]) -> Any:
    """A dependency: the query string as ``model`` (a repeated parameter is a list)."""

    # async although it awaits nothing: FastAPI runs a plain function dependency on its
    # thread pool, a thread hand-off per request (~5 % of a device list's CPU, bench B1)
    async def read_query_model(request: Request) -> M:
        data = multi_dict(request.query_params.multi_items())
        return validate(model, data)

    read_query_model.request_model = model  # type: ignore[attr-defined]
    read_query_model.request_in = "query"  # type: ignore[attr-defined]
    return Depends(read_query_model)


def documented_body(model: type[M], media: tuple[str, ...] = BODY_TYPES
                    ) -> Callable[[], Awaitable[None]]:
    """A dependency that reads nothing: it names the body model of a route that reads its
    body itself (``/oauth/token``: form only, OAuth's errors), for the OpenAPI document."""

    async def document_body() -> None:  # async: see query()
        return None

    document_body.request_model = model  # type: ignore[attr-defined]
    document_body.request_in = "body"  # type: ignore[attr-defined]
    document_body.request_media = media  # type: ignore[attr-defined]
    return document_body


def readers(dependant: Any) -> list[Callable[..., Any]]:
    """The body and query readers among a route's dependencies (for the OpenAPI document)."""
    found: list[Callable[..., Any]] = []
    stack = [dependant]
    while stack:
        d = stack.pop()
        call = getattr(d, "call", None)
        if call is not None and hasattr(call, "request_model"):
            found.append(call)
        stack.extend(getattr(d, "dependencies", ()))
    return found


# --- the hand parsing being retired: domains move to models (above) one by one --------------

async def read_body(request: Request) -> dict[str, Any]:
    """Return the body as a dict; empty for no body. 400 on malformed JSON, a non-object, or
    text containing NUL characters. Uploaded files are left to their readers."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        out: dict[str, Any] = {}
        for key in form:
            values = form.getlist(key)
            out[key] = values[0] if len(values) == 1 else list(values)
        out.pop("access_token", None)
        check_no_nul({k: v for k, v in out.items() if isinstance(v, str | list)})
        return out
    raw = await request.body()
    if not raw.strip():
        return {}
    data = json_object_body(raw)
    data.pop("access_token", None)
    check_no_nul(data)
    return data


def as_bool(value: Any, *, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (None, ""):
        return False
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"{field} must be a boolean")


def as_str(value: Any, *, field: str, required: bool = False, max_len: int = 1000,
           default: str | None = None) -> str | None:
    if value is None or value == "":
        if required:
            raise BadRequest(f"{field} is required", code="invalid_request")
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    if len(value) > max_len:
        raise BadRequest(f"{field} is at most {max_len} characters")
    return value


def as_int(value: Any, *, field: str, required: bool = False, lo: int | None = None,
           hi: int | None = None, default: int | None = None) -> int | None:
    if value is None or value == "":
        if required:
            raise BadRequest(f"{field} is required", code="invalid_request")
        return default
    if isinstance(value, bool):
        raise BadRequest(f"{field} must be an integer")
    try:
        n = int(value) if isinstance(value, int) else int(str(value).strip(), 10)
    except ValueError as exc:
        raise BadRequest(f"{field} must be an integer") from exc
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise BadRequest(f"{field} must be between {lo} and {hi}")
    return n


def as_str_list(value: Any, *, field: str, max_items: int = 1000, max_len: int = 200) -> list[str]:
    """A list of strings from a JSON list, a repeated form field, or a comma-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise BadRequest(f"{field} must be a list of strings")
    if len(items) > max_items:
        raise BadRequest(f"{field} has more than {max_items} items")
    for it in items:
        if not isinstance(it, str) or not it or len(it) > max_len:
            raise BadRequest(f"{field} must be a list of non-empty strings")
    return list(items)
