"""Webhook delivery against real HTTP servers on 127.0.0.1: the request Particle's webhook
reference describes, signatures and idempotency ids, retries (500, timeouts, 429 with
Retry-After), TLS with a self-signed certificate, responses back as hook-response events,
the SSRF guard, throttling and disabling, redelivery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from corral.events.models import Event
from corral.integrations import signing, tasks
from corral.integrations.models import Attempt, Delivery
from corral.settings import Settings
from devicekit import eventually
from helpers import add_role, audit_actions, bearer, new_user, owner_and_product
from hookkit import Answer, Target, hook_settings, serve


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return hook_settings(database_url, tmp_path)


@pytest.fixture
async def worker(app: Any) -> Any:
    w = app.state.runtime.integrations
    w.start()
    return w


async def create(client, token: str, body: dict[str, Any], base: str = "/v1/integrations"
                 ) -> dict[str, Any]:
    r = await client.post(base, headers=bearer(token), json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def publish(client, token: str, name: str, data: str | None = None,
                  path: str = "/v1/devices/events") -> None:
    r = await client.post(path, headers=bearer(token), json={"name": name, "data": data})
    assert r.status_code == 200, r.text


async def events(app: Any, prefix: str) -> list[Event]:
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(Event).order_by(Event.id))).scalars().all()
    return [e for e in rows if e.name.startswith(prefix)]


@contextlib.asynccontextmanager
async def failing_hook(client, app: Any, event: str, *, disable_after: int
                       ) -> AsyncIterator[tuple[str, Target, dict[str, Any]]]:
    """A user's webhook for ``event`` whose target answers 503: one attempt per event,
    throttled after the first failure, disabled after ``disable_after``. Yields the user's
    token, the target and the integration."""
    s = app.state.settings
    s.integrations_throttle_after, s.integrations_disable_min_failures = 1, disable_after
    s.integrations_disable_after_s, s.integrations_max_attempts = 0.0, 1
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.default = Answer(503, "down")
        yield ada, target, await create(client, ada, {"event": event, "url": target.url})


async def deliveries(app: Any) -> list[Delivery]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(Delivery).order_by(Delivery.id))).scalars())


async def test_webhook_default_form_signed_and_response_event(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.default = Answer(200, "thanks!")
        hook = await create(client, ada, {"integration_type": "Webhook", "event": "temp",
                                          "url": target.url, "requestType": "POST"})
        assert hook["ok"] is True and hook["signing_secret"].startswith("whsec_")
        assert hook["hookUrl"].endswith(f"/v1/integrations/{hook['id']}")
        await publish(client, ada, "temp/kitchen", "21.5")
        await publish(client, ada, "other", "x")  # no match: not the prefix
        [seen] = await target.wait(1)
        assert seen.method == "POST" and seen.path == "/hook"
        assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
        form = seen.form
        assert (form["event"], form["data"], form["coreid"]) == ("temp/kitchen", "21.5", "api")
        assert form["published_at"].endswith("Z")
        [stored] = [e for e in await events(app, "temp/kitchen")]
        assert seen.headers["webhook-id"] == signing.delivery_id(hook["id"], stored.id)
        assert signing.verify(hook["signing_secret"], seen.headers["webhook-id"],
                              int(seen.headers["webhook-timestamp"]), seen.body,
                              seen.headers["webhook-signature"])
        assert not signing.verify(hook["signing_secret"], seen.headers["webhook-id"],
                                  int(seen.headers["webhook-timestamp"]), seen.body + b"x",
                                  seen.headers["webhook-signature"])

        async def responded() -> bool:
            return bool(await events(app, "hook-response/"))

        await eventually(responded)
        [resp] = await events(app, "hook-response/")
        # a sandbox webhook's default topic: hook-response/<event>/<n>
        assert (resp.name, resp.data, resp.source) == ("hook-response/temp/kitchen/0",
                                                       "thanks!", "cloud")
        assert resp.owner_user_id == stored.owner_user_id and resp.device_id is None

        async def logged() -> bool:
            r = await client.get(f"/v1/integrations/{hook['id']}", headers=bearer(ada))
            return bool(r.json()["integration"]["logs"])

        await eventually(logged)
        r = await client.get(f"/v1/integrations/{hook['id']}", headers=bearer(ada))
        [entry] = r.json()["integration"]["logs"]
        assert entry["outcome"] == "success" and entry["status_code"] == 200
        assert entry["latency_ms"] >= 0 and "thanks!" in entry["response"]
        assert entry["request"].startswith(f"POST {target.url}")
        assert len(target.seen) == 1  # the other event did not match


async def test_json_template_query_headers_auth(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        hook = await create(client, ada, {
            "event": "env", "url": target.url + "/{{{PARTICLE_DEVICE_ID}}}",
            "requestType": "PUT",
            "json": {"t": "{{{temp}}}", "where": "{{room}}", "ok": "{{ok}}",
                     "first": "{{{list.0.v}}}"},
            "query": {"api_key": "s3cret-query-key", "n": "{{{PARTICLE_EVENT_NAME}}}"},
            "headers": {"Authorization": "Bearer very-secret-token", "X-Env": "prod"},
            "noDefaults": True})
        await publish(client, ada, "env", '{"temp":21.0,"room":"<k&n>","ok":true,'
                                          '"list":[{"v":"a"}]}')
        [seen] = await target.wait(1)
        import json

        assert seen.method == "PUT" and seen.path == "/hook/api"
        assert json.loads(seen.body) == {"t": "21", "where": "&lt;k&amp;n&gt;", "ok": "true",
                                         "first": "a"}
        assert seen.query == {"api_key": "s3cret-query-key", "n": "env"}
        assert seen.headers["authorization"] == "Bearer very-secret-token"
        assert seen.headers["content-type"] == "application/json"
        # secrets are never shown back in full
        r = await client.get(f"/v1/integrations/{hook['id']}", headers=bearer(ada))
        shown = r.json()["integration"]
        assert "very-secret-token" not in r.text and "s3cret-query-key" not in r.text
        assert shown["headers"]["Authorization"] == "Bear…"
        assert shown["query"]["api_key"] == "s3cr…" and shown["query"]["n"].startswith("{{{")
        assert "whsec_" in shown["signing_secret"] and hook["signing_secret"] not in r.text
        # an edit that sends the masked values back keeps the secrets
        edited = {k: v for k, v in shown.items() if k in (
            "event", "url", "requestType", "json", "query", "headers", "noDefaults")}
        r = await client.put(f"/v1/integrations/{hook['id']}", headers=bearer(ada),
                             json=edited)
        assert r.status_code == 200, r.text
        await publish(client, ada, "env", '{"temp":1}')
        second = (await target.wait(2))[1]
        assert second.headers["authorization"] == "Bearer very-secret-token"
        assert second.query["api_key"] == "s3cret-query-key"
        r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
        assert "very-secret-token" not in r.text and "s3cret-query-key" not in r.text


async def test_get_sends_defaults_as_query(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        await create(client, ada, {"event": "q", "url": target.url, "requestType": "GET"})
        await publish(client, ada, "q1", "v")
        [seen] = await target.wait(1)
        assert seen.method == "GET" and seen.body == b""
        assert (seen.query["event"], seen.query["data"], seen.query["coreid"]) == ("q1", "v", "api")


async def test_500_is_retried_with_the_same_idempotency_id(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.script = [Answer(500, "boom"), Answer(502, "bad gateway")]
        hook = await create(client, ada, {"event": "r", "url": target.url})
        await publish(client, ada, "r", "1")
        seen = await target.wait(3)
        assert len({s.headers["webhook-id"] for s in seen}) == 1
        assert len({s.body for s in seen}) == 1  # the same request each time

        async def done() -> bool:
            return [d.status for d in await deliveries(app)] == ["success"]

        await eventually(done)
        [d] = await deliveries(app)
        assert d.attempts == 3
        r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
        outcomes = [e["outcome"] for e in r.json()["log"]]
        assert outcomes == ["success", "retry", "retry"]
        # the first failure told the devices (hook-error); the success answered them
        errors = await events(app, "hook-error/")
        assert [e.name for e in errors] == ["hook-error/r/0"]
        assert errors[0].data == "error status 500 from 127.0.0.1"


async def test_timeout_is_retried(client, app, worker):
    worker.webhooks.timeout_s = 1.0  # the other tests allow 10 s (hookkit.hook_settings)
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.script = [Answer(200, "late", delay=3.0)]  # the timeout is 1 s
        hook = await create(client, ada, {"event": "slow", "url": target.url})
        await publish(client, ada, "slow", "1")
        seen = await target.wait(2, within=15)
        assert seen[1].at - seen[0].at >= 0.9

        async def done() -> bool:
            return [d.status for d in await deliveries(app)] == ["success"]

        await eventually(done, within=15)
        r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
        log = r.json()["log"]
        assert log[-1]["outcome"] == "retry" and "timed out after 1 s" in log[-1]["error"]
        assert log[0]["outcome"] == "success"


async def test_429_retry_after_is_honoured(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.script = [Answer(429, "slow down", headers={"Retry-After": "2"})]
        await create(client, ada, {"event": "rl", "url": target.url})
        await publish(client, ada, "rl", "1")
        seen = await target.wait(2, within=15)
        # the backoff alone would be 0.2 s at most here
        assert seen[1].at - seen[0].at >= 1.9


async def test_tls_self_signed_and_reject_unauthorized(client, app, worker, tmp_path):
    ada = await new_user(client, "ada@example.com")
    async with serve(tls_dir=tmp_path / "tls") as target:
        strict = await create(client, ada, {"event": "tls", "url": target.url})
        await publish(client, ada, "tls", "1")

        async def refused() -> bool:
            r = await client.get(f"/v1/integrations/{strict['id']}/log", headers=bearer(ada))
            return any("CERTIFICATE_VERIFY_FAILED" in (e["error"] or "")
                       or "certificate" in (e["error"] or "").lower() for e in r.json()["log"])

        await eventually(refused)
        assert target.seen == []  # no request got through
        r = await client.delete(f"/v1/integrations/{strict['id']}", headers=bearer(ada))
        assert r.status_code == 204
        await create(client, ada, {"event": "tls", "url": target.url,
                                   "rejectUnauthorized": False})
        await publish(client, ada, "tls", "2")
        [seen] = await target.wait(1)
        assert seen.form["data"] == "2"


async def test_ssrf_guard(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    worker.policy.networks.clear()  # as deployed: no CORRAL_INTEGRATIONS_ALLOW_HOSTS
    worker.policy.hosts.clear()
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest/meta-data",
                "http://10.1.2.3/", "http://[::1]:8080/", "http://[::ffff:127.0.0.1]/",
                "http://0.0.0.0/"):
        r = await client.post("/v1/integrations", headers=bearer(ada),
                              json={"event": "x", "url": url})
        assert r.status_code == 400, (url, r.text)
        assert "private" in r.json()["error_description"]
    for url in ("ftp://example.com/", "file:///etc/passwd", "http:///nohost",
                "http://{{{host}}}/x"):
        r = await client.post("/v1/integrations", headers=bearer(ada),
                              json={"event": "x", "url": url})
        assert r.status_code == 400, (url, r.text)
    async with serve() as target:
        # a name is judged when it is resolved, at send time: localhost is loopback
        hook = await create(client, ada, {"event": "x", "url": target.url.replace(
            "127.0.0.1", "localhost")})
        await publish(client, ada, "x", "1")

        async def failed() -> bool:
            return [d.status for d in await deliveries(app)] == ["failed"]

        await eventually(failed)
        [d] = await deliveries(app)
        assert d.attempts == 1 and "loopback" in (d.last_error or "")  # never retried
        assert target.seen == []
        r = await client.post(f"/v1/integrations/{hook['id']}/test", headers=bearer(ada))
        assert r.status_code == 200 and r.json()["pass"] is False
        assert "loopback" in r.json()["error"]


async def test_redirects_are_not_followed_by_default(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.handler = lambda seen: (Answer(302, "", headers={"Location": "/elsewhere"})
                                       if seen.path == "/hook" else Answer(200, "moved"))
        await create(client, ada, {"event": "a", "url": target.url})
        await publish(client, ada, "a", "1")

        async def failed() -> bool:
            return [d.status for d in await deliveries(app)] == ["failed"]

        await eventually(failed)
        assert [s.path for s in target.seen] == ["/hook"]
        await create(client, ada, {"event": "b", "url": target.url, "followRedirects": True})
        await publish(client, ada, "b", "1")
        await target.wait(3)
        assert [s.path for s in target.seen] == ["/hook", "/hook", "/elsewhere"]


async def test_test_route(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.script = [Answer(200, "pong"), Answer(404, "nope")]
        hook = await create(client, ada, {"event": "t", "url": target.url})
        r = await client.post(f"/v1/integrations/{hook['id']}/test", headers=bearer(ada),
                              json={"data": "hello"})
        assert r.status_code == 200, r.text
        assert r.json()["pass"] is True and r.json()["data"] == "pong"
        assert target.seen[0].form["data"] == "hello"
        assert target.seen[0].form["event"] == "t"
        r = await client.post(f"/v1/integrations/{hook['id']}/test", headers=bearer(ada))
        assert r.json() == {"pass": False, "data": None,
                            "error": "error status 404 from 127.0.0.1", "status_code": 404}
        assert target.seen[1].form["data"] == "test-event"
        r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
        assert [e["outcome"] for e in r.json()["log"]] == ["test", "test"]


async def test_product_webhook_response_topic_and_disable_after_failures(client, app, worker,
                                                                         mailbox):
    s = app.state.settings
    s.integrations_throttle_after, s.integrations_disable_min_failures = 2, 3
    s.integrations_disable_after_s, s.integrations_max_attempts = 0.0, 1
    token, product = await owner_and_product(client)
    base = f"/v1/products/{product['id']}/integrations"
    async with serve() as target:
        target.default = Answer(503, "down")
        hook = await create(client, token, {"event": "p", "url": target.url}, base=base)
        for i in range(3):
            await publish(client, token, "p", str(i), path=f"/v1/products/{product['id']}/events")
            await target.wait(i + 1)

        async def disabled() -> bool:
            r = await client.get(f"{base}/{hook['id']}", headers=bearer(token))
            return r.json()["integration"]["status"] == "disabled"

        await eventually(disabled)
        r = await client.get(f"{base}/{hook['id']}", headers=bearer(token))
        shown = r.json()["integration"]
        assert shown["disabled"] is True and "failed 3 times" in shown["disabled_reason"]
        assert [a.action for a in await audit_actions(app, "integration.")] == [
            "integration.created", "integration.disabled"]
        await app.state.runtime.mailer.deliver_due()
        assert any("disabled the integration" in subject for _, subject, _ in mailbox.sent)
        # while disabled, matching events are kept as skipped (not sent)
        await publish(client, token, "p", "while-off", path=f"/v1/products/{product['id']}/events")

        async def skipped() -> bool:
            return "skipped" in [d.status for d in await deliveries(app)]

        await eventually(skipped)
        assert len(target.seen) == 3
        # fixed: enable, redeliver what failed or was skipped
        target.default = Answer(200, "back")
        r = await client.put(f"{base}/{hook['id']}", headers=bearer(token),
                             json={"disabled": False})
        assert r.status_code == 200, r.text
        assert r.json()["integration"]["status"] == "active"
        r = await client.post(f"{base}/{hook['id']}/redeliver", headers=bearer(token), json={})
        assert r.json() == {"ok": True, "redelivered": 4}
        await target.wait(7)

        async def all_done() -> bool:
            return {d.status for d in await deliveries(app)} == {"success"}

        await eventually(all_done)
        # product webhooks answer on <device>/hook-response/<event>/<n> (API events: "api")
        names = {e.name for e in await events(app, "api/hook-response/")}
        assert names == {"api/hook-response/p/0"}
        r = await client.get(f"/v1/products/{product['id']}/metrics/integration",
                             headers=bearer(token), params={"bucket_size": 3600})
        assert r.status_code == 200, r.text
        totals: dict[str, int] = {}
        for bucket in r.json()["integrations"]:
            assert "time" in bucket
            for k in ("success", "failure", "sleep"):
                totals[k] = totals.get(k, 0) + bucket.get(k, 0)
        assert totals == {"success": 4, "failure": 0, "sleep": 0}


async def test_redeliver_one_event_keeps_its_idempotency_id(client, app, worker):
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        hook = await create(client, ada, {"event": "one", "url": target.url})
        await publish(client, ada, "one", "1")
        [first] = await target.wait(1)
        [ev] = await events(app, "one")

        async def done() -> bool:
            return [d.status for d in await deliveries(app)] == ["success"]

        await eventually(done)
        r = await client.post(f"/v1/integrations/{hook['id']}/redeliver", headers=bearer(ada),
                              json={"event_id": ev.id})
        assert r.status_code == 200 and r.json()["redelivered"] == 1
        second = (await target.wait(2))[1]
        assert second.headers["webhook-id"] == first.headers["webhook-id"]
        r = await client.post(f"/v1/integrations/{hook['id']}/redeliver", headers=bearer(ada),
                              json={"event_id": ev.id + 1000})
        assert r.status_code == 404


async def test_a_redelivery_made_while_the_event_is_in_flight_is_sent(client, app, worker):
    """A user redelivers an event whose request is still waiting for its answer. The
    recorder used to write that request's outcome over the redelivery's reset (status,
    attempts, due time), so the redelivery was never sent. Here the target holds its first
    answer until the redelivery is committed."""
    ada = await new_user(client, "ada@example.com")
    answered = asyncio.Event()
    async with serve() as target:
        target.script = [Answer(200, "first", hold=answered)]
        hook = await create(client, ada, {"event": "one", "url": target.url})
        await publish(client, ada, "one", "1")
        [first] = await target.wait(1)  # in flight: the answer is held
        [ev] = await events(app, "one")
        r = await client.post(f"/v1/integrations/{hook['id']}/redeliver", headers=bearer(ada),
                              json={"event_id": ev.id})
        assert r.status_code == 200 and r.json()["delivery"]["status"] == "pending", r.text
        answered.set()
        second = (await target.wait(2))[1]
        assert second.headers["webhook-id"] == first.headers["webhook-id"]

        async def done() -> bool:
            return [(d.status, d.attempts) for d in await deliveries(app)] == [("success", 1)]

        await eventually(done)
        await asyncio.sleep(0.3)  # a third request would have been sent by now
        assert len(target.seen) == 2


async def test_an_integration_disabled_while_a_request_is_in_flight_keeps_it_skipped(
        client, app, worker):
    """The user disables the integration while a request waits for its answer: its delivery
    is skipped at once. The request's late failure used to write "pending, retry later" over
    that, so re-enabling the integration sent the event again unasked."""
    ada = await new_user(client, "ada@example.com")
    answered = asyncio.Event()
    async with serve() as target:
        target.script = [Answer(500, "down", hold=answered)]
        target.default = Answer(200, "back")
        hook = await create(client, ada, {"event": "one", "url": target.url})
        await publish(client, ada, "one", "1")
        await target.wait(1)  # in flight: the answer is held
        r = await client.put(f"/v1/integrations/{hook['id']}", headers=bearer(ada),
                             json={"disabled": True})
        assert r.status_code == 200 and r.json()["integration"]["status"] == "disabled", r.text
        answered.set()

        async def logged() -> bool:  # the attempt is logged, and the delivery left alone
            r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
            return r.status_code == 200 and len(r.json()["log"]) == 1

        await eventually(logged)
        assert [d.status for d in await deliveries(app)] == ["skipped"]
        r = await client.put(f"/v1/integrations/{hook['id']}", headers=bearer(ada),
                             json={"disabled": False})
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.5)  # a retry would have been sent by now
        assert len(target.seen) == 1
        assert [d.status for d in await deliveries(app)] == ["skipped"]


async def test_tenancy_and_roles(client, app, worker):
    token, product = await owner_and_product(client)
    base = f"/v1/products/{product['id']}/integrations"
    hook = await create(client, token, {"event": "x", "url": "https://example.com/h",
                                        "auth": {"username": "u", "password": "hunter2hunter2"}},
                        base=base)
    eve = await new_user(client, "eve@example.com")
    r = await client.get(f"{base}/{hook['id']}", headers=bearer(eve))
    assert r.status_code == 404
    r = await client.get(f"/v1/integrations/{hook['id']}", headers=bearer(eve))
    assert r.status_code == 404  # not in her sandbox either
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", product, "View-only")
    r = await client.get(f"{base}/{hook['id']}", headers=bearer(viewer))
    assert r.status_code == 200 and "hunter2hunter2" not in r.text
    assert r.json()["integration"]["auth"] == {"username": "u", "password": "hunt…"}
    r = await client.delete(f"{base}/{hook['id']}", headers=bearer(viewer))
    assert r.status_code == 403
    r = await client.post(f"{base}/{hook['id']}/signing_secret", headers=bearer(viewer))
    assert r.status_code == 403
    r = await client.post(f"{base}/{hook['id']}/signing_secret", headers=bearer(token))
    assert r.status_code == 200 and r.json()["signing_secret"].startswith("whsec_")


async def test_bad_configurations(client, app):
    ada = await new_user(client, "ada@example.com")
    for body, where in [
        ({}, "event"),
        ({"event": "x"}, "url"),
        ({"event": "x", "url": "https://e.com", "requestType": "PATCH"}, "requestType"),
        ({"event": "x", "url": "https://e.com", "json": {"a": 1}, "form": {"b": "2"}},
         "mutually exclusive"),
        ({"event": "x", "url": "https://e.com", "json": "{{#open}}"}, "json"),
        ({"event": "x", "url": "https://e.com", "deviceID": "nope"}, "deviceID"),
        ({"event": "x", "url": "https://e.com", "headers": ["a"]}, "headers"),
        ({"event": "x", "url": "https://e.com", "integration_type": "AzureIotHub"},
         "integration_type"),
        ({"event": "x" * 65, "url": "https://e.com"}, "event"),
        ({"integration_type": "MQTT", "event": "x", "url": "https://e.com"}, "url"),
        ({"integration_type": "MQTT", "event": "x", "url": "mqtt://e.com", "qos": 2}, "qos"),
    ]:
        r = await client.post("/v1/integrations", headers=bearer(ada), json=body)
        assert r.status_code == 400, (body, r.text)
        assert where in r.json()["error_description"], (body, r.text)


async def test_response_reaches_the_subscribed_device_in_chunks_and_is_metered(client, app,
                                                                               worker):
    """A device's event triggers a product webhook; the target's 600-byte answer comes back
    as <device>/hook-response/<event>/0 and /1 (512 + 88 bytes) to the device that
    subscribed, each chunk one data operation; the webhook request itself is not one."""
    from sqlalchemy import text

    from sessionkit import ScriptedDevice, connect, import_device, wait_for

    dev = "0123456789abcdef0000ab01"
    token, product = await owner_and_product(client)
    await import_device(client, token, product["id"], dev)
    device = ScriptedDevice()
    session = await connect(app, dev, device)
    await session.subscribe(f"{dev}/hook-response/weather")
    async with serve() as target:
        target.default = Answer(200, "é" + "x" * 598)  # 599 characters, 600 bytes
        await create(client, token, {"event": "weather", "url": target.url},
                     base=f"/v1/products/{product['id']}/integrations")
        await session.publish("weather", "Denver")
        [seen] = await target.wait(1)
        assert seen.form["coreid"] == dev
        await wait_for(lambda: len(device.delivered) == 2, within=10)
    names = sorted(name for name, _ in device.delivered)
    assert names == [f"{dev}/hook-response/weather/0", f"{dev}/hook-response/weather/1"]
    sizes = sorted(len(data.encode()) for _, data in device.delivered)
    assert sizes == [88, 512]
    async with app.state.sessionmaker() as db:
        published, delivered = (await db.execute(text(
            "SELECT sum(events_published), sum(events_delivered) FROM usage_pending "
            "WHERE device_id = :d"), {"d": dev})).one()
    assert (published, delivered) == (1, 2)


async def test_worker_runs_only_while_it_holds_the_lease(client, app):
    """``run_while(held)``: the body a cluster lease runs. Nothing is delivered while the
    lease is elsewhere; the backlog goes out once it is held."""
    worker = app.state.runtime.integrations
    ada = await new_user(client, "ada@example.com")
    holds = False
    task = asyncio.get_running_loop().create_task(
        worker.run_while(lambda: holds, check_s=0.05))
    try:
        async with serve() as target:
            await create(client, ada, {"event": "lease", "url": target.url})
            await publish(client, ada, "lease", "1")
            await asyncio.sleep(0.5)
            assert target.seen == []
            holds = True
            await target.wait(1)
            holds = False
            await asyncio.sleep(0.3)
            await publish(client, ada, "lease", "2")
            await asyncio.sleep(0.5)
            assert len(target.seen) == 1
            holds = True
            await target.wait(2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failed_read_of_due_deliveries_neither_stalls_nor_repeats_them(
        client, app, worker, monkeypatch):
    """A lane whose read of due deliveries fails (the database busy) goes on after a pause.
    It used to end there; the next event then started a lane that knew nothing of the
    requests still waiting for their outcome to be written and sent them a second time."""
    from corral.integrations import tasks

    monkeypatch.setattr(tasks, "FLUSH_S", 2.0)  # outcomes reach the database late
    monkeypatch.setattr(tasks, "FILL_RETRY_S", 0.2, raising=False)
    real_fill = tasks.Lane._fill
    reads = 0

    async def failing_second_read(self: Any) -> float | None:
        nonlocal reads
        reads += 1
        if reads == 2:
            raise RuntimeError("database is locked")
        return await real_fill(self)

    monkeypatch.setattr(tasks.Lane, "_fill", failing_second_read)
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.default = Answer(200, "ok", delay=0.3)
        await create(client, ada, {"event": "once", "url": target.url})
        await publish(client, ada, "once", "1")
        await target.wait(1)

        async def read_failed() -> bool:
            return reads >= 2

        await eventually(read_failed)
        await asyncio.sleep(0.5)  # the first request has answered; its outcome is unwritten
        await publish(client, ada, "once", "2")
        await target.wait(2)

        async def both_recorded() -> bool:
            return [d.status for d in await deliveries(app)] == ["success", "success"]

        await eventually(both_recorded)
        await asyncio.sleep(0.5)  # a repeat would have been sent by now
        assert sorted(s.form["data"] for s in target.seen) == ["1", "2"]


async def test_a_lane_ending_as_it_disables_leaves_its_unrecorded_sends_to_its_successor(
        client, app, worker, monkeypatch):
    """The failure that disables an integration ends its lane before that outcome is
    written. An event arriving meanwhile starts a successor lane; it used to find the
    failed delivery still pending and send it a second time (seen in CI as a fourth
    request where three were due). The ended lane stays registered until its sends are
    recorded, so the successor inherits them."""
    from corral.integrations import tasks

    monkeypatch.setattr(tasks, "FLUSH_S", 2.0)  # outcomes reach the database late
    async with failing_hook(client, app, "once", disable_after=1) as (ada, target, hook):
        await publish(client, ada, "once", "1")
        await target.wait(1)
        await asyncio.sleep(0.3)  # the lane has ended (disabling); the outcome is unwritten
        assert hook["id"] in worker.lanes and worker.lanes[hook["id"]].done
        await publish(client, ada, "once", "2")  # a successor lane starts

        async def recorded() -> bool:
            return "pending" not in [d.status for d in await deliveries(app)]

        await eventually(recorded)
        await asyncio.sleep(0.5)  # a repeat would have been sent by now
        assert [x.form["data"] for x in target.seen].count("1") == 1, target.seen


async def test_the_disable_commits_with_the_failure_that_causes_it(client, app, worker,
                                                                   monkeypatch):
    """The recorder used to disable an integration as soon as its lane had decided to,
    in whichever batch it was writing, while the failure that decided it still waited for
    the next one. A user could then see the integration disabled, enable it and redeliver;
    the late failure overwrote the redelivered delivery (never sent again) and disabled the
    integration again (seen in CI as 3 of 7 and 6 of 7 requests). Here the first outcome's
    write is held until the lane has failed the second time and decided to disable."""
    from corral.integrations import tasks
    from corral.integrations.models import Integration

    real_write = tasks.Recorder._write
    writing, release = asyncio.Event(), asyncio.Event()
    after_first: list[tuple[bool, int]] = []

    async def held_write(self: Any, batch: list[Any]) -> None:
        first = not writing.is_set()
        if first:
            writing.set()
            await release.wait()
        await real_write(self, batch)
        if first:
            async with app.state.sessionmaker() as db:
                row = (await db.execute(select(Integration))).scalar_one()
                after_first.append((row.disabled, row.consecutive_failures))

    monkeypatch.setattr(tasks.Recorder, "_write", held_write)
    async with failing_hook(client, app, "twice", disable_after=2) as (ada, target, hook):
        await publish(client, ada, "twice", "1")
        await target.wait(1)
        await asyncio.wait_for(writing.wait(), 10)  # the first outcome's batch: held
        await publish(client, ada, "twice", "2")
        await target.wait(2)

        async def decided() -> bool:
            lane = worker.lanes.get(hook["id"])
            return lane is not None and lane.disabling

        await eventually(decided)
        release.set()

        async def disabled() -> bool:
            r = await client.get(f"/v1/integrations/{hook['id']}", headers=bearer(ada))
            return r.json()["integration"]["status"] == "disabled"

        await eventually(disabled)
        # the first outcome's batch recorded that outcome's health and did not disable
        assert after_first == [(False, 1)]
        assert [d.status for d in await deliveries(app)] == ["failed", "failed"]
        target.default = Answer(200, "back")
        r = await client.put(f"/v1/integrations/{hook['id']}", headers=bearer(ada),
                             json={"disabled": False})
        assert r.status_code == 200, r.text
        r = await client.post(f"/v1/integrations/{hook['id']}/redeliver",
                              headers=bearer(ada), json={})
        assert r.json() == {"ok": True, "redelivered": 2}
        await target.wait(4)

        async def all_done() -> bool:
            return [d.status for d in await deliveries(app)] == ["success", "success"]

        await eventually(all_done)
        r = await client.get(f"/v1/integrations/{hook['id']}", headers=bearer(ada))
        assert r.json()["integration"]["status"] == "active"


async def test_a_failure_after_a_batch_committed_does_not_log_it_twice(
        client, app, worker, monkeypatch):
    """Trimming the delivery log runs after the batch of outcomes committed. When it
    failed, the recorder used to put the batch back and write it again: the deliveries were
    guarded, but every attempt of the batch was logged twice."""
    app.state.settings.integrations_log_keep = 20  # a trim once 10 attempts are logged
    trims: list[str] = []
    real_trim = tasks.Recorder._trim

    async def trim_fails_once(self: Any, integration_id: str, keep: int) -> None:
        trims.append(integration_id)
        if len(trims) == 1:
            raise RuntimeError("the database went away after the commit")
        await real_trim(self, integration_id, keep)

    monkeypatch.setattr(tasks.Recorder, "_trim", trim_fails_once)
    ada = await new_user(client, "ada@example.com")
    async with serve() as target:
        target.default = Answer(200, "ok")
        hook = await create(client, ada, {"event": "one", "url": target.url})
        for i in range(10):
            await publish(client, ada, "one", str(i))

        async def delivered() -> bool:
            return [d.status for d in await deliveries(app)] == ["success"] * 10

        await eventually(delivered)

        async def trimmed() -> bool:
            return bool(trims)

        await eventually(trimmed)
        await asyncio.sleep(1.5)  # the recorder's retry after a failure comes 1 s later
        async with app.state.sessionmaker() as db:
            logged = (await db.execute(select(func.count(Attempt.id)).where(
                Attempt.integration_id == hook["id"]))).scalar_one()
        assert logged == 10
        assert len(target.seen) == 10
