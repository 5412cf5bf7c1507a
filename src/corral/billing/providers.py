"""Payment providers: one protocol, a shipped in-memory fake and a Stripe adapter.

Chosen by ``CORRAL_PAYMENT_PROVIDER`` (``fake`` | ``stripe``). A provider answers a charge
with a :class:`ChargeResult`: ``succeeded``, ``declined`` (the card said no: counts as a
failed attempt) or ``error`` (the provider could not be asked: not the customer's fault,
retried later with the same idempotency key). Methods may raise :class:`ProviderError` for
a payment method the provider refuses to store (the API answers 402 with its message).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

from corral.settings import Settings

ChargeStatus = Literal["succeeded", "declined", "error"]


@dataclass(frozen=True)
class PaymentMethod:
    ref: str
    label: str  # e.g. "visa •••• 4242"


@dataclass(frozen=True)
class ChargeResult:
    status: ChargeStatus
    ref: str | None = None
    decline_code: str | None = None
    message: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class ProviderError(Exception):
    """The provider refused a request (e.g. an invalid card token)."""

    def __init__(self, message: str, *, code: str = "payment_method_invalid") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class PaymentProvider(Protocol):
    name: str

    async def create_customer(self, *, org_id: int, name: str, email: str | None) -> str:
        """A new customer; returns its reference."""
        ...

    async def attach_method(self, *, customer: str, method: str) -> PaymentMethod:
        """Attach a payment method token (from the provider's client-side library) to the
        customer and make it the one charged."""
        ...

    async def charge(self, *, customer: str, method: str, amount_cents: int, currency: str,
                     idempotency_key: str, description: str) -> ChargeResult:
        """Charge off-session. The same ``idempotency_key`` never charges twice."""
        ...


# --- the fake ----------------------------------------------------------------------------------

# tokens that mimic Stripe's test cards, so the demo and the docs can show a decline
FAKE_DECLINING_METHODS = {
    "pm_card_chargeDeclined": "generic_decline",
    "pm_card_chargeDeclinedInsufficientFunds": "insufficient_funds",
    "pm_card_chargeDeclinedExpiredCard": "expired_card",
}


@dataclass
class FakeCharge:
    customer: str
    method: str
    amount_cents: int
    currency: str
    idempotency_key: str
    description: str
    result: ChargeResult


@dataclass
class FakeProvider:
    """In-memory provider for tests and the demo. ``decline_next(n)`` makes the next ``n``
    charges decline, ``decline_always = True`` every charge, ``fail_next(n)`` answers
    ``error`` (provider unreachable). A repeated idempotency key returns the first result."""

    name: str = "fake"
    decline_always: bool = False
    decline_code: str = "card_declined"
    charges: list[FakeCharge] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    _decline: int = 0
    _errors: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _by_key: dict[str, ChargeResult] = field(default_factory=dict)

    def decline_next(self, n: int = 1) -> None:
        self._decline += n

    def fail_next(self, n: int = 1) -> None:
        self._errors += n

    def reset(self) -> None:
        self.decline_always = False
        self._decline = self._errors = 0

    @property
    def succeeded(self) -> list[FakeCharge]:
        """Charges that took money (repeats of an idempotency key are not recorded)."""
        return [c for c in self.charges if c.result.succeeded]

    async def create_customer(self, *, org_id: int, name: str, email: str | None) -> str:
        ref = f"cus_fake{next(self._ids)}"
        self.customers[ref] = {"org_id": org_id, "name": name, "email": email, "method": None}
        return ref

    async def attach_method(self, *, customer: str, method: str) -> PaymentMethod:
        if customer not in self.customers:
            if not customer.startswith("cus_fake"):
                raise ProviderError("No such customer", code="provider_error")
            # made by another process's fake (the demo set-up, a server before a restart):
            # this one's memory starts empty
            self.customers[customer] = {"org_id": None, "name": None, "email": None,
                                        "method": None}
        if not method.startswith(("pm_", "tok_")) or len(method) > 100:
            raise ProviderError(f"No such PaymentMethod: {method!r}")
        self.customers[customer]["method"] = method
        brand = "visa"
        last4 = "0002" if method in FAKE_DECLINING_METHODS else "4242"
        return PaymentMethod(ref=method, label=f"{brand} •••• {last4}")

    async def charge(self, *, customer: str, method: str, amount_cents: int, currency: str,
                     idempotency_key: str, description: str) -> ChargeResult:
        if idempotency_key in self._by_key:
            return self._by_key[idempotency_key]
        if self._errors:
            self._errors -= 1
            # not remembered under the key: the request "never reached" the provider
            return ChargeResult("error", message="fake provider unavailable")
        n = next(self._ids)
        if method in FAKE_DECLINING_METHODS:
            result = ChargeResult("declined", ref=f"pi_fake{n}",
                                  decline_code=FAKE_DECLINING_METHODS[method],
                                  message="Your card was declined.")
        elif self.decline_always or self._decline:
            if self._decline:
                self._decline -= 1
            result = ChargeResult("declined", ref=f"pi_fake{n}", decline_code=self.decline_code,
                                  message="Your card was declined.")
        else:
            result = ChargeResult("succeeded", ref=f"pi_fake{n}")
        self._by_key[idempotency_key] = result
        self.charges.append(FakeCharge(customer, method, amount_cents, currency,
                                       idempotency_key, description, result))
        return result


# --- Stripe ------------------------------------------------------------------------------------

STRIPE_API = "https://api.stripe.com"


class StripeProvider:
    """Stripe's REST API over httpx: customers, PaymentMethod attach, and PaymentIntents
    created with ``confirm=true`` and ``off_session=true`` (the customer is not present at a
    renewal). Requests are form-encoded; charges carry an ``Idempotency-Key`` header."""

    name = "stripe"

    def __init__(self, api_key: str, *, base_url: str = STRIPE_API,
                 transport: httpx.AsyncBaseTransport | None = None,
                 timeout_s: float = 30.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url, transport=transport, timeout=timeout_s,
            headers={"Authorization": f"Bearer {api_key}"})

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, data: dict[str, str],
                    headers: dict[str, str] | None = None) -> httpx.Response:
        return await self._client.post(path, data=data, headers=headers)

    @staticmethod
    def _error(r: httpx.Response) -> dict[str, Any]:
        try:
            body = r.json()
        except ValueError:
            return {}
        err = body.get("error") if isinstance(body, dict) else None
        return err if isinstance(err, dict) else {}

    async def create_customer(self, *, org_id: int, name: str, email: str | None) -> str:
        data = {"name": name, "metadata[corral_org_id]": str(org_id)}
        if email:
            data["email"] = email
        try:
            r = await self._post("/v1/customers", data)
        except httpx.HTTPError as exc:
            raise ProviderError(f"Stripe is unreachable: {exc}", code="provider_error") from exc
        if r.status_code != 200:
            raise ProviderError(self._error(r).get("message") or f"Stripe answered {r.status_code}",
                                code="provider_error")
        return str(r.json()["id"])

    async def attach_method(self, *, customer: str, method: str) -> PaymentMethod:
        try:
            r = await self._post(f"/v1/payment_methods/{method}/attach", {"customer": customer})
        except httpx.HTTPError as exc:
            raise ProviderError(f"Stripe is unreachable: {exc}", code="provider_error") from exc
        if r.status_code != 200:
            err = self._error(r)
            raise ProviderError(err.get("message") or f"Stripe answered {r.status_code}",
                                code="payment_method_invalid")
        pm = r.json()
        card = pm.get("card") or {}
        label = (f"{card.get('brand', 'card')} •••• {card.get('last4', '????')}" if card
                 else str(pm.get("type", "payment method")))
        return PaymentMethod(ref=str(pm["id"]), label=label)

    async def charge(self, *, customer: str, method: str, amount_cents: int, currency: str,
                     idempotency_key: str, description: str) -> ChargeResult:
        data = {"amount": str(amount_cents), "currency": currency, "customer": customer,
                "payment_method": method, "confirm": "true", "off_session": "true",
                "description": description}
        try:
            r = await self._post("/v1/payment_intents", data,
                                 headers={"Idempotency-Key": idempotency_key})
        except httpx.HTTPError as exc:
            return ChargeResult("error", message=f"Stripe is unreachable: {exc}")
        if r.status_code == 200:
            pi = r.json()
            if pi.get("status") == "succeeded":
                return ChargeResult("succeeded", ref=pi.get("id"))
            if pi.get("status") == "processing":
                # bank debits settle later; corral only offers cards, so treat it as an error
                # to be asked again (same key) rather than as money received
                return ChargeResult("error", ref=pi.get("id"),
                                    message="payment is still processing")
            # requires_action / requires_payment_method: the bank wants the customer present
            return ChargeResult("declined", ref=pi.get("id"),
                                decline_code="authentication_required",
                                message="The payment needs the card holder's authentication.")
        err = self._error(r)
        if r.status_code == 402 or err.get("type") == "card_error":
            intent = err.get("payment_intent") or {}
            return ChargeResult(
                "declined", ref=intent.get("id") if isinstance(intent, dict) else None,
                decline_code=err.get("decline_code") or err.get("code") or "card_declined",
                message=err.get("message") or "Your card was declined.")
        return ChargeResult("error", message=err.get("message")
                            or f"Stripe answered HTTP {r.status_code}")


def make_provider(settings: Settings) -> PaymentProvider:
    if settings.payment_provider == "stripe":
        if not settings.stripe_api_key:
            raise ValueError("CORRAL_PAYMENT_PROVIDER=stripe needs CORRAL_STRIPE_API_KEY")
        return StripeProvider(settings.stripe_api_key)
    return FakeProvider()
