"""Payment providers: the fake's switches, and the Stripe adapter's exact requests and its
mapping of Stripe's answers (httpx.MockTransport, no network)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import httpx
import pytest

from corral.billing.providers import (
    FakeProvider,
    ProviderError,
    StripeProvider,
    make_provider,
)
from corral.settings import Settings


async def _charge(p: FakeProvider | StripeProvider, key: str, method: str = "pm_card_visa",
                  customer: str = "cus_1"):
    return await p.charge(customer=customer, method=method, amount_cents=58_800,
                          currency="usd", idempotency_key=key, description="corral invoice X")


async def test_fake_declines_on_demand_and_repeats_by_idempotency_key():
    p = FakeProvider()
    cus = await p.create_customer(org_id=7, name="Acme", email="a@example.com")
    pm = await p.attach_method(customer=cus, method="pm_card_visa")
    assert pm.ref == "pm_card_visa" and pm.label.endswith("4242")

    assert (await _charge(p, "k1", customer=cus)).succeeded
    p.decline_next(2)
    r2, r3 = await _charge(p, "k2", customer=cus), await _charge(p, "k3", customer=cus)
    assert (r2.status, r2.decline_code) == ("declined", "card_declined")
    assert r3.status == "declined"
    assert (await _charge(p, "k4", customer=cus)).succeeded
    # the same key answers the first result and takes no money again
    assert (await _charge(p, "k2", customer=cus)).status == "declined"
    assert (await _charge(p, "k1", customer=cus)).succeeded
    assert [c.idempotency_key for c in p.charges] == ["k1", "k2", "k3", "k4"]
    assert len(p.succeeded) == 2

    p.decline_always = True
    assert (await _charge(p, "k5", customer=cus)).status == "declined"
    p.reset()
    assert (await _charge(p, "k6", customer=cus)).succeeded

    p.fail_next()
    assert (await _charge(p, "k7", customer=cus)).status == "error"
    assert (await _charge(p, "k7", customer=cus)).succeeded  # same key asked again: charged once
    assert (await _charge(p, "k8", method="pm_card_chargeDeclinedInsufficientFunds",
                          customer=cus)).decline_code == "insufficient_funds"


async def test_fake_refuses_unknown_customers_and_tokens():
    p = FakeProvider()
    with pytest.raises(ProviderError):
        await p.attach_method(customer="cus_nope", method="pm_card_visa")
    cus = await p.create_customer(org_id=1, name="A", email=None)
    with pytest.raises(ProviderError):
        await p.attach_method(customer=cus, method="4242424242424242")


def test_provider_setting(tmp_path):
    assert isinstance(make_provider(Settings(data_dir=tmp_path)), FakeProvider)
    with pytest.raises(ValueError, match="STRIPE_API_KEY"):
        make_provider(Settings(data_dir=tmp_path, payment_provider="stripe"))
    assert isinstance(make_provider(Settings(data_dir=tmp_path, payment_provider="stripe",
                                             stripe_api_key="sk_test_x")), StripeProvider)


class StripeStub:
    """Records requests; answers from a queue of (status, json)."""

    def __init__(self, *answers: tuple[int, dict]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.answers.pop(0)
        return httpx.Response(status, json=body)


def form(request: httpx.Request) -> dict[str, str]:
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


def stripe(stub: StripeStub) -> StripeProvider:
    return StripeProvider("sk_test_123", transport=httpx.MockTransport(stub))


async def test_stripe_customer_attach_and_charge_requests():
    stub = StripeStub(
        (200, {"id": "cus_A1", "object": "customer"}),
        (200, {"id": "pm_1", "object": "payment_method", "type": "card",
               "card": {"brand": "visa", "last4": "4242"}}),
        (200, {"id": "pi_1", "object": "payment_intent", "status": "succeeded"}),
    )
    p = stripe(stub)
    try:
        assert await p.create_customer(org_id=9, name="Acme Inc", email="ada@example.com") == "cus_A1"
        pm = await p.attach_method(customer="cus_A1", method="pm_1")
        assert (pm.ref, pm.label) == ("pm_1", "visa •••• 4242")
        r = await p.charge(customer="cus_A1", method="pm_1", amount_cents=4900, currency="usd",
                           idempotency_key="corral-CRL-000009-0001-1", description="corral invoice")
    finally:
        await p.aclose()
    assert r.succeeded and r.ref == "pi_1"

    c, a, pi = stub.requests
    for req in stub.requests:
        assert req.method == "POST"
        assert req.headers["authorization"] == "Bearer sk_test_123"
        assert req.url.host == "api.stripe.com"
    assert c.url.path == "/v1/customers"
    assert form(c) == {"name": "Acme Inc", "email": "ada@example.com",
                       "metadata[corral_org_id]": "9"}
    assert "idempotency-key" not in c.headers
    assert a.url.path == "/v1/payment_methods/pm_1/attach"
    assert form(a) == {"customer": "cus_A1"}
    assert pi.url.path == "/v1/payment_intents"
    assert pi.headers["idempotency-key"] == "corral-CRL-000009-0001-1"
    assert form(pi) == {"amount": "4900", "currency": "usd", "customer": "cus_A1",
                        "payment_method": "pm_1", "confirm": "true", "off_session": "true",
                        "description": "corral invoice"}


@pytest.mark.parametrize(("status", "body", "want"), [
    (402, {"error": {"type": "card_error", "code": "card_declined",
                     "decline_code": "insufficient_funds",
                     "message": "Your card has insufficient funds.",
                     "payment_intent": {"id": "pi_9", "status": "requires_payment_method"}}},
     ("declined", "insufficient_funds", "pi_9", "Your card has insufficient funds.")),
    (402, {"error": {"type": "card_error", "code": "expired_card",
                     "message": "Your card has expired."}},
     ("declined", "expired_card", None, "Your card has expired.")),
    (200, {"id": "pi_3", "status": "requires_action"},
     ("declined", "authentication_required", "pi_3", None)),
    (500, {"error": {"type": "api_error", "message": "Something went wrong"}},
     ("error", None, None, "Something went wrong")),
    (429, {"error": {"type": "invalid_request_error", "message": "Too many requests"}},
     ("error", None, None, "Too many requests")),
])
async def test_stripe_maps_declines_and_errors(status, body, want):
    p = stripe(StripeStub((status, body)))
    try:
        r = await p.charge(customer="cus_A1", method="pm_1", amount_cents=100, currency="usd",
                           idempotency_key="k", description="d")
    finally:
        await p.aclose()
    got = (r.status, r.decline_code, r.ref, r.message if want[3] is not None else None)
    assert got == want


async def test_stripe_unreachable_is_an_error_not_a_decline():
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no route", request=request)

    p = StripeProvider("sk_test_123", transport=httpx.MockTransport(boom))
    try:
        r = await p.charge(customer="c", method="m", amount_cents=1, currency="usd",
                           idempotency_key="k", description="d")
        assert r.status == "error" and "unreachable" in (r.message or "")
        with pytest.raises(ProviderError):
            await p.create_customer(org_id=1, name="x", email=None)
    finally:
        await p.aclose()


async def test_stripe_attach_refusal_raises_with_stripes_message():
    p = stripe(StripeStub((400, {"error": {"type": "invalid_request_error",
                                           "message": "No such PaymentMethod: 'pm_x'"}})))
    try:
        with pytest.raises(ProviderError) as info:
            await p.attach_method(customer="cus_A1", method="pm_x")
    finally:
        await p.aclose()
    assert info.value.message == "No such PaymentMethod: 'pm_x'"
    assert json.dumps(info.value.code) == '"payment_method_invalid"'
