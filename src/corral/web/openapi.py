"""The OpenAPI document (``/openapi.json``) and the interactive docs (``/docs``, offline).

FastAPI documents paths, path parameters and the answers routes declare (``responses=``,
see :func:`corral.kit.responses.answers`). This module adds what corral's own request path
knows and FastAPI cannot see:

* the body or query model each route reads (:func:`corral.kit.body.body` /
  :func:`~corral.kit.body.query`): a body as ``application/json``,
  ``application/x-www-form-urlencoded`` and ``multipart/form-data``, a query model as
  parameters;
* the errors every route can answer, from what it depends on: 400 (bad input, also a NUL
  in the path or query), 401/403 (it needs a token; some callers, such as API users on
  routes for people, are refused), 402/403/404 (a tenant guard: the
  organization's subscription is inactive, the role or scopes do not allow it, the tenant is
  not visible), 404 (a path names something), 413 (it takes a body), 429 (the API's rate
  limit, on every ``/v1`` and ``/oauth`` route); all with Particle's
  error schema. FastAPI's 422 is never answered (``corral.web.errors`` maps validation to
  400), so it is dropped.

The docs page loads Swagger UI from the ``swagger-ui-bundle-v2`` package, served under
``/docs/assets``: nothing is fetched from the internet.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.staticfiles import StaticFiles

from corral.auth.deps import auth_ctx
from corral.auth.guards import Guard
from corral.kit.body import BODY_TYPES, readers
from corral.kit.responses import ERROR_TEXT
from corral.web.ratelimit import LIMITED_PREFIXES

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "description": "Particle's error shape. /v1 errors carry `ok: false`; OAuth's (the token "
                   "endpoint, and a missing or bad token: 401) have no `ok`. Some errors add "
                   "fields (e.g. `required`, the permission a 403 lacked).",
    "properties": {
        "ok": {"type": "boolean", "const": False},
        "error": {"type": "string", "description": "A machine-readable code"},
        "error_description": {"type": "string", "description": "What went wrong, for people"},
    },
    "required": ["error"],
    "additionalProperties": True,
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}


# pydantic leaves a bound it cannot place on a union member (``Int | None`` with
# ``Field(ge=0)``) under its own name; JSON Schema spells them so:
BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(node: Any) -> Any:
    if isinstance(node, dict):
        out = {BOUNDS.get(k, k) if k in BOUNDS and isinstance(v, int | float) else k:
               _json_schema_bounds(v) for k, v in node.items()}
        for union in ("anyOf", "oneOf"):  # a bound beside a union holds for its numbers
            if union in out and any(k in out for k in BOUNDS.values()):
                bounds = {k: out.pop(k) for k in list(out) if k in BOUNDS.values()}
                out[union] = [{**m, **bounds} if m.get("type") in ("integer", "number") else m
                              for m in out[union]]
        return out
    if isinstance(node, list):
        return [_json_schema_bounds(v) for v in node]
    return node


def _model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """``model``'s JSON schema registered under components; a reference to it."""
    schema = _json_schema_bounds(model.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="validation"))
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components.setdefault(model.__name__, schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = _json_schema_bounds(model.model_json_schema(mode="validation"))
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    out = []
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        spelled = [c for c in choices if isinstance(c, str)] if choices else [
            alias if isinstance(alias, str) else field.alias or name]
        key = spelled[0]
        prop = dict(props.get(key) or props.get(name) or {})
        prop.pop("title", None)
        description = field.description or prop.pop("description", "") or ""
        if len(spelled) > 1:
            description = (description + " " if description else "") + \
                f"(also spelled {', '.join(spelled[1:])})"
        param: dict[str, Any] = {"name": key, "in": "query", "required": key in required
                                 or name in required, "schema": prop}
        if description:
            param["description"] = description
        out.append(param)
    return out


def _error_statuses(route: APIRoute, has_body: bool) -> set[int]:
    statuses = {400}  # bad input; a NUL in the path or query is refused on every route
    if has_body:
        statuses.add(413)
    calls = []
    stack = [route.dependant]
    while stack:
        d = stack.pop()
        if d.call is not None:
            calls.append(d.call)
        stack.extend(d.dependencies)
    if any(c is auth_ctx for c in calls):
        statuses.update((401, 403))  # 403: e.g. a route for people, called by an API user
    if any(isinstance(c, Guard) for c in calls):
        statuses.update((401, 403, 404))  # every guard needs a caller
        if any(isinstance(c, Guard) and c.scope in ("org", "product") for c in calls):
            statuses.add(402)
    if route.dependant.path_params:
        statuses.add(404)
    if route.path.startswith(LIMITED_PREFIXES):
        statuses.add(429)  # the API's rate limit (corral.web.ratelimit), on every route
    return statuses


def _only_the_model(answer: dict[str, Any]) -> None:
    """FastAPI merges a route's declared answer model into the schema it infers from the
    return annotation (``dict[str, Any]``: any object); keep the model's alone."""
    schema = answer.get("content", {}).get("application/json", {}).get("schema")
    if not isinstance(schema, dict):
        return
    if "$ref" in schema or "anyOf" in schema:
        for key in ("type", "additionalProperties", "title"):
            schema.pop(key, None)
    elif schema.get("type") == "array":
        schema.pop("additionalProperties", None)


def build(app: FastAPI, routes: list[BaseRoute]) -> dict[str, Any]:
    """The whole document; ``routes`` are the API's routes (``corral.web.app.routers()``)."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes, tags=app.openapi_tags)
    components: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["Error"] = ERROR_SCHEMA
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        found = readers(route.dependant)
        for method in route.methods:
            op = doc["paths"].get(route.path_format, {}).get(method.lower())
            if op is None:
                continue
            has_body = False
            for reader in found:
                model = reader.request_model
                if reader.request_in == "body":
                    has_body = True
                    ref = _model_schema(model, components)
                    media = getattr(reader, "request_media", BODY_TYPES)
                    op["requestBody"] = {"required": False, "content": {
                        ctype: {"schema": ref} for ctype in media}}
                else:
                    names = {p["name"] for p in op.get("parameters", ())}
                    op.setdefault("parameters", []).extend(
                        p for p in _query_parameters(model) if p["name"] not in names)
            if "requestBody" in op:
                has_body = True
            responses: dict[str, Any] = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in sorted(_error_statuses(route, has_body)):
                responses.setdefault(str(status), {"description": ERROR_TEXT[status]})
            for status, answer in responses.items():
                declared = route.responses.get(int(status)) or route.responses.get(status)
                if status.startswith("2") and declared and declared.get("model") is not None:
                    _only_the_model(answer)
                if status.startswith(("4", "5")):
                    answer.setdefault("content", {"application/json": {"schema": ERROR_REF}})
                    answer["content"].setdefault("application/json", {"schema": ERROR_REF})
    return doc


def install(app: FastAPI, routes: list[BaseRoute], *, docs_url: str = "/docs") -> None:
    """Serve ``/openapi.json`` from :func:`build` (made once) and the docs page with local
    assets."""
    from swagger_ui_bundle import swagger_ui_path

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    _serve_once(app)
    assets = f"{docs_url}/assets"
    app.mount(assets, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get(docs_url, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png")


def _serve_once(app: FastAPI) -> None:
    """``/openapi.json`` as bytes serialized once, in place of FastAPI's route, which
    serialized the whole document (~600 KB) on every request: 8-22 ms of the event loop each
    time (``bench_asgi.py``'s ``/openapi.json`` row), on a route anyone may call. Byte for
    byte what FastAPI's ``JSONResponse`` sends; a request under a ``root_path`` (a proxy's
    prefix, which FastAPI adds to ``servers``) still gets a document made for it."""
    url = app.openapi_url or "/openapi.json"
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != url]
    made: list[bytes] = []

    async def openapi_json(request: Request) -> Response:
        doc = app.openapi()
        root_path = request.scope.get("root_path", "").rstrip("/")
        if root_path and app.root_path_in_servers and root_path not in {
                s.get("url") for s in doc.get("servers", [])}:
            return JSONResponse({**doc, "servers": [{"url": root_path},
                                                    *doc.get("servers", [])]})
        if not made:
            made.append(bytes(JSONResponse(doc).body))
        return Response(made[0], media_type="application/json")

    app.router.routes.insert(0, Route(url, openapi_json, include_in_schema=False))
