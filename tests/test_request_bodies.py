"""The one request reader (corral.kit.body): JSON, form and multipart bodies, Particle's nested
variants and both spellings read into the same model; errors in Particle's shape, never 422;
the OpenAPI document and the offline /docs page."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import AliasChoices, Field

from corral.kit.body import Flag, Int, RequestModel, StrList, from_body, validate
from corral.kit.errors import BadRequest
from helpers import assert_error, bearer, new_user


class Sample(RequestModel):
    NEST = "thing"
    name: str
    count: Int = 0
    on: Flag = False
    tags: StrList | None = None
    per_page: Int = Field(25, validation_alias=AliasChoices("per_page", "perPage"))


@pytest.mark.parametrize(("raw", "want"), [
    ({"name": "a"}, {"name": "a", "count": 0, "on": False, "tags": None, "per_page": 25}),
    ({"thing": {"name": "a", "count": "3"}}, {"name": "a", "count": 3}),
    ({"thing": '{"name": "a", "on": "yes"}'}, {"name": "a", "on": True}),
    ({"name": "a", "on": "", "count": ""}, {"on": False, "count": 0}),
    ({"name": "a", "on": "off", "tags": "x, y,,z"}, {"on": False, "tags": ["x", "y", "z"]}),
    ({"name": "a", "tags": ["x", "y"], "perPage": "5"}, {"tags": ["x", "y"], "per_page": 5}),
    ({"name": "a", "per_page": 7}, {"per_page": 7}),
])
def test_lenient_spellings(raw, want):
    got = from_body(Sample, raw).model_dump()
    assert {k: got[k] for k in want} == want


@pytest.mark.parametrize(("raw", "words"), [
    ({}, "name is required"),
    ({"name": ""}, "name is required"),
    ({"name": None}, "name is required"),
    ({"name": "a", "count": True}, "count"),
    ({"name": "a", "count": "three"}, "count"),
    ({"name": "a", "on": "sometimes"}, "on"),
    ({"name": "a", "tags": [1, {}]}, "tags"),
    ({"thing": 7}, "thing must be an object"),
    ({"thing": "{not json"}, "thing must be an object"),
])
def test_refusals_name_the_field(raw, words):
    with pytest.raises(BadRequest) as caught:
        from_body(Sample, raw)
    assert caught.value.code == "invalid_request"
    assert words in caught.value.description


def test_unknown_fields_when_forbidden():
    class Strict(RequestModel):
        model_config = {**RequestModel.model_config, "extra": "forbid"}
        a: int | None = None

    with pytest.raises(BadRequest) as caught:
        validate(Strict, {"a": 1, "zz": 2, "b": 3})
    assert caught.value.description.startswith("Unknown fields: b, zz")


async def test_json_form_multipart_and_nested_bodies_make_the_same_product(client):
    tok = await new_user(client, "ada@example.com")
    h = bearer(tok)
    sent = [
        {"json": {"name": "P1", "platform_id": 12, "tags": ["a", "b"]}},
        {"json": {"product": {"name": "P2", "platform_id": "12", "tags": "a,b"}}},
        {"data": {"name": "P3", "platform_id": "12", "tags": ["a", "b"]}},
        {"data": {"product[name]": "P4", "product[platform_id]": "12", "product[tags]": "a,b"}},
        {"data": {"product": json.dumps({"name": "P5", "platform_id": 12, "tags": ["a", "b"]})}},
        {"files": {"name": (None, "P6"), "platform_id": (None, "12"), "tags": (None, "a,b")}},
    ]
    for n, kwargs in enumerate(sent, start=1):
        r = await client.post("/v1/user/products", headers=h, **kwargs)
        assert r.status_code == 200, (kwargs, r.text)
        p = r.json()["product"]
        assert (p["name"], p["platform_id"], p["tags"]) == (f"P{n}", 12, ["a", "b"]), kwargs


async def test_bad_bodies_answer_particles_shape_never_422(client):
    h = bearer(await new_user(client, "ada@example.com"))
    cases = [
        ({"json": {"name": "x", "platform_id": "twelve"}}, "platform_id"),
        ({"json": {"name": "x" * 101}}, "name"),
        ({"data": {"name": "x", "platform_id": "-1"}}, "platform_id"),
        ({"json": {"product": ["x"]}}, "product must be an object"),
        ({"json": {"name": "x", "settings": {"event_rate_burst": 0}}}, "settings.event_rate_burst"),
        ({"json": {"name": "bad\u0000name"}}, "NUL"),
    ]
    for kwargs, words in cases:
        r = await client.post("/v1/user/products", headers=h, **kwargs)
        body = assert_error(r, 400)
        assert r.status_code != 422 and words in body["error_description"], (kwargs, body)
    r = await client.post("/v1/user/products", headers={**h, "Content-Type": "application/json"},
                          content=b"[1, 2]")
    assert_error(r, 400, "invalid_json")


async def test_the_caller_is_judged_before_the_body(client):
    r = await client.post("/v1/user/products", json={"name": 7})  # no token, bad body
    assert r.status_code == 401, r.text


async def test_openapi_documents_bodies_and_errors(client):
    doc = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "Error" in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            for status, answer in op["responses"].items():
                if status.startswith("4"):
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (method, path, status)
    create = doc["paths"]["/v1/orgs/{org}/products"]["post"]
    content = create["requestBody"]["content"]
    # multipart is documented only where a route takes a file (a generated client otherwise
    # sends every field twice)
    assert set(content) == {"application/json", "application/x-www-form-urlencoded"}
    imports = doc["paths"]["/v1/products/{product}/devices"]["post"]["requestBody"]["content"]
    assert set(imports) == {"application/json", "application/x-www-form-urlencoded",
                            "multipart/form-data"}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ProductCreate"}
    assert {"400", "401", "402", "403", "404", "413"} <= set(create["responses"])
    schema = doc["components"]["schemas"]["ProductCreate"]
    assert schema["required"] == ["name"]
    platform = schema["properties"]["platform_id"]["anyOf"][0]
    assert platform == {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


async def test_docs_page_is_served_without_the_internet(client):
    r = await client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    urls = re.findall(r"""(?:src|href)=["']([^"']+)""", r.text) + \
        re.findall(r"""url: ?["']([^"']+)""", r.text)
    assert urls, r.text
    for url in urls:
        assert url.startswith("/"), f"/docs loads {url} from elsewhere"
        if url.startswith("/docs/assets/"):
            asset = await client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 100, url
