"""Console pages whose templates read a key that only some shapes of their data carry.

The console renders with StrictUndefined: a template that reads a key the object it was given
lacks raises, and the page answers 500 (the Fleet health page did, over ``vitals.sampled``).
Each test here reaches such a page the way a user would, with the shape that lacked the key
(or, for the device list's sort, the spelling of a value the template did not expect).
"""

from __future__ import annotations

from helpers import ConsoleForms as Console
from helpers import bearer, console_session, owner_and_product, seed
from test_firmware_api import upload

DEVICE = "0123456789abcdef0123c0de"


async def test_the_integrations_list_shows_an_mqtt_integration(app, client):
    """An MQTT integration's list item has no ``requestType`` (a webhook's field: the API's
    list leaves it out, the CLI reads it as optional); the list template asked for it."""
    tok, p = await owner_and_product(client)
    b = Console(client, await console_session(app, "ada@example.com"))
    base = f"/console/products/{p['slug']}/integrations"
    r = await b.post(base, integration_type="MQTT", name="to the broker", event="temp",
                     url="mqtt://broker.example.com:1883", requestType="POST",
                     format="default", template="", headers="", topic="corral/{{{PARTICLE_EVENT_NAME}}}",
                     qos="1", verify="on", sample='{"temp": 21.5}')
    assert r.status_code == 303, r.text
    # the API's list item of an MQTT integration: no requestType (Particle's shape)
    listed = (await client.get(f"/v1/products/{p['id']}/integrations",
                               headers=bearer(tok))).json()
    assert [("requestType" in i, i["integration_type"]) for i in listed] == [(False, "MQTT")]
    r = await b.get(base)
    assert r.status_code == 200, r.text
    assert "to the broker" in r.text and "mqtt://broker.example.com:1883" in r.text
    # a webhook next to it still shows its method
    r = await b.post(base, integration_type="Webhook", name="to the server", event="temp",
                     url="https://hooks.example.com/in", requestType="PUT", format="default",
                     template="", headers="", topic="", qos="1", verify="on", sample="")
    assert r.status_code == 303, r.text
    r = await b.get(base)
    assert r.status_code == 200, r.text
    assert "PUT <code>https://hooks.example.com/in</code>" in r.text


async def test_the_release_preview_shows_a_device_its_cohort_targets(app, client):
    """A device whose target comes from its cohort's release (resolver source ``cohort``)
    appears in a release preview when that version is released as a phased rollout; the
    preview's target labels had every source but ``cohort``."""
    tok, p = await owner_and_product(client)
    await seed(app, {"id": DEVICE, "product_id": p["id"], "firmware_version": 1})
    assert (await upload(client, tok, p, 3)).status_code == 201
    cohorts = f"/v1/products/{p['slug']}/cohorts"
    r = await client.post(cohorts, headers=bearer(tok),
                          json={"name": "early", "firmware_version": 3})
    assert r.status_code == 201, r.text
    r = await client.put(f"{cohorts}/early/devices", headers=bearer(tok), json={"add": [DEVICE]})
    assert r.status_code == 200, r.text
    # the API's dry run names the source the console labels
    r = await client.put(f"/v1/products/{p['id']}/firmware/release", headers=bearer(tok), json={
        "version": 3, "product_default": True, "dry_run": True, "rollout": {"percent": 50}})
    assert r.status_code == 200, r.text
    assert [d["before"]["source"] for d in r.json()["devices"]] == ["cohort"]

    b = Console(client, await console_session(app, "ada@example.com"))
    r = await b.get(f"/console/products/{p['slug']}/firmware/3/release", preview="1",
                    product_default="on", mode="standard", rollout="percent", amount="50")
    assert r.status_code == 200, r.text
    assert f'href="/console/products/{p["slug"]}/devices/{DEVICE}"' in r.text
    assert "v3 <span class=\"muted small\">(cohort release" in r.text


async def test_the_device_list_takes_a_sort_without_its_direction(app, client):
    """``?sort=deviceName`` (no ``:asc``/``:desc``) is a sort the list accepts (the direction
    defaults to desc, as ``/v1``'s ``sortDir``), but the filters echoed to the template kept
    the bare name, and the column headers split it into attribute and direction."""
    tok, p = await owner_and_product(client)
    await seed(app, {"id": DEVICE, "product_id": p["id"], "platform_id": 12, "name": "probe"})
    b = Console(client, await console_session(app, "ada@example.com"))
    r = await b.get(f"/console/products/{p['slug']}/devices", sort="deviceName")
    assert r.status_code == 200, r.text
    assert f'aria-sort="descending"><a href="/console/products/{p["slug"]}/devices?sort=deviceName%3Aasc"' \
        in r.text
    assert '<option value="deviceName:desc" selected>' in r.text
