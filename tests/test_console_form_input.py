"""Console forms given hostile input answer with the form and its field errors (4xx), never a
500, and write nothing.

Found by posting odd values into every console form: JSON textareas parsed with a bare
``json.loads`` let a deeply nested document raise ``RecursionError`` (not a ``ValueError``,
so no form error: the page answered 500); one that nested just less deeply parsed, then
raised it when it was encoded for the database or read as a template; and they took
``NaN``/``Infinity``, which ``/v1`` refuses because PostgreSQL's JSON columns cannot store
them.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from corral.integrations.models import Integration
from corral.ledgers.models import LedgerDefinition, LedgerInstance
from helpers import ConsoleForms as Console
from helpers import console_session, owner_and_product, seed

DEVICE = "0123456789abcdef0123c0de"
DEEP_ARRAY = "[" * 5_000 + "]" * 5_000  # too deep for the parser (RecursionError)
DEEP_OBJECT = '{"a":' * 5_000 + "1" + "}" * 5_000
# parses, but too deep to encode again (or to walk as a template) from inside a request
NESTED = '{"a":' + "[" * 900 + "]" * 900 + "}"
TOO_DEEP = '{"a":' * 65 + "1" + "}" * 65  # one level past MAX_JSON_DEPTH (64)
AS_DEEP_AS_ALLOWED = '{"a":' * 64 + "1" + "}" * 64
NON_STANDARD = ['{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '{"a": 1e999}']


async def count(app: Any, model: Any) -> int:
    async with app.state.sessionmaker() as db:
        return int((await db.execute(select(func.count()).select_from(model))).scalar_one())


async def signed_in(app: Any, client: Any) -> tuple[Console, dict[str, Any]]:
    _, p = await owner_and_product(client)
    return Console(client, await console_session(app, "ada@example.com")), p


# --- ledgers: the instance editor and the definition's JSON Schema ---------------------------

LEDGERS = "/console/orgs/ada-personal/ledgers"


async def a_ledger(b: Console) -> None:
    r = await b.post(LEDGERS, name="settings", scope="Device", direction="CloudOnly",
                     description="", schema="")
    assert r.status_code == 303, r.text


@pytest.mark.parametrize("data", [DEEP_ARRAY, DEEP_OBJECT, NESTED, TOO_DEEP, *NON_STANDARD])
async def test_a_ledger_document_that_is_not_storable_json_is_a_field_error(app, client, data):
    b, p = await signed_in(app, client)
    await seed(app, {"id": DEVICE, "product_id": p["id"], "platform_id": 12})
    await a_ledger(b)
    r = await b.post(f"{LEDGERS}/settings/instance?scope={DEVICE}", data=data)
    assert r.status_code == 400, r.text[:300]
    assert "data is not valid JSON" in r.text
    assert await count(app, LedgerInstance) == 0
    # a valid document still saves
    r = await b.post(f"{LEDGERS}/settings/instance?scope={DEVICE}", data=AS_DEEP_AS_ALLOWED)
    assert r.status_code == 303, r.text[:300]
    assert await count(app, LedgerInstance) == 1


@pytest.mark.parametrize("schema", [DEEP_ARRAY, DEEP_OBJECT, NESTED,
                                    '{"type": "object", "maximum": NaN}'])
async def test_a_ledger_schema_that_is_not_storable_json_is_a_field_error(app, client, schema):
    b, _ = await signed_in(app, client)
    r = await b.post(LEDGERS, name="settings", scope="Device", direction="CloudOnly",
                     description="", schema=schema)
    assert r.status_code == 400, r.text[:300]
    assert "schema is not valid JSON" in r.text
    assert await count(app, LedgerDefinition) == 0


# --- integrations: the headers textarea, and the JSON template ------------------------------

HOOK = dict(integration_type="Webhook", name="hook", event="temp",
            url="https://hooks.example.com/in", requestType="POST", format="default",
            template="", headers="", topic="", qos="1", verify="on", sample="")


@pytest.mark.parametrize("headers", [DEEP_ARRAY, DEEP_OBJECT, '{"X-A": NaN}'])
@pytest.mark.parametrize("action", ["", "/preview"])
async def test_integration_headers_that_are_not_storable_json_are_a_field_error(
        app, client, headers, action):
    b, p = await signed_in(app, client)
    r = await b.post(f"/console/products/{p['slug']}/integrations{action}",
                     **{**HOOK, "headers": headers})
    assert r.status_code == 400, r.text[:300]
    assert "headers must be a JSON object" in r.text
    assert await count(app, Integration) == 0


@pytest.mark.parametrize("template", ["[" * 4_000 + "]" * 4_000, NESTED, TOO_DEEP])
@pytest.mark.parametrize("action", ["", "/preview"])
async def test_a_deeply_nested_json_template_is_a_field_error(app, client, template, action):
    """The JSON template is read by the integration's request model (``/v1``'s): JSON
    nested deeper than the parser goes, or deeper than MAX_JSON_DEPTH, is refused."""
    b, p = await signed_in(app, client)
    r = await b.post(f"/console/products/{p['slug']}/integrations{action}",
                     **{**HOOK, "format": "json", "template": template})
    assert r.status_code == 400, r.text[:300]
    assert "json nests more than 64 levels deep" in r.text
    assert await count(app, Integration) == 0
    # as deep as allowed: created
    r = await b.post(f"/console/products/{p['slug']}/integrations",
                     **{**HOOK, "format": "json", "template": AS_DEEP_AS_ALLOWED})
    assert r.status_code == 303, r.text[:300]
