"""The ledger parts of the MQTT topic contract (docs/mqtt.md "Ledgers") and the SDK's rule
for applying versions (corral.device.ledgers): pure, no sockets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from corral.device.ledgers import LedgerBook
from corral.transports.mqtt import topics

DID = "0123456789abcdef01234567"


@pytest.mark.parametrize(("topic", "kind", "arg"), [
    (f"devices/{DID}/ledgers/sync", "ledger_sync", ""),
    (f"devices/{DID}/ledgers/config/applied", "ledger_applied", "config"),
    (f"devices/{DID}/ledgers/status-2/set", "ledger_set", "status-2"),
])
def test_ledger_publish_topics(topic: str, kind: str, arg: str) -> None:
    assert topics.parse_publish(DID, topic) == topics.PublishTarget(kind, arg)  # type: ignore[arg-type]


@pytest.mark.parametrize("topic", [
    f"devices/{DID}/ledgers/config",  # the cloud's topic, not the device's
    f"devices/{DID}/ledgers/Config/applied",  # names are lower case
    f"devices/{DID}/ledgers/{'x' * 33}/set",  # at most 32 characters
    f"devices/{DID}/ledgers/config/applied/more",
    f"devices/{DID}/ledgers/config/get",
    f"devices/{'f' * 24}/ledgers/sync",  # another device's
])
def test_other_ledger_topics_are_refused(topic: str) -> None:
    assert topics.parse_publish(DID, topic) is None


def test_ledger_subscriptions() -> None:
    for f in ("ledgers/#", "ledgers/+"):
        assert topics.parse_filter(DID, f"devices/{DID}/{f}") == topics.SubscribeTarget("ledgers")
    assert topics.parse_filter(DID, f"devices/{DID}/ledgers/config") is None
    assert topics.ledger_topic(DID, "config") == f"devices/{DID}/ledgers/config"


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, rest: str, body: dict[str, Any]) -> None:
        self.messages.append((rest, body))


def doc(version: int, data: dict[str, Any]) -> bytes:
    return json.dumps({"name": "config", "version": version, "scope": "Product",
                       "data": data}).encode()


async def test_a_version_is_applied_once_and_never_replaced_by_an_older_one(tmp_path: Path
                                                                              ) -> None:
    sent = Sent()
    book = LedgerBook(sent, tmp_path / "ledgers.json")
    led = book.ledger("config")
    seen: list[int] = []
    led.on_change(lambda ledger: seen.append(ledger.version))
    assert led.get() == {} and book.have() == {}
    await book.received("config", doc(2, {"interval": 10}))
    assert led.get() == {"interval": 10} and seen == [2]
    await book.received("config", doc(1, {"interval": 99}))  # older: ignored, not acked
    await book.received("config", doc(2, {"interval": 10}))  # again: acked, not re-applied
    assert led.version == 2 and led.get() == {"interval": 10} and seen == [2]
    assert sent.messages == [("config/applied", {"version": 2}), ("config/applied", {"version": 2})]
    await book.received("config", b"not json")  # ignored
    await book.received("config", json.dumps({"version": "3", "data": {}}).encode())
    assert led.version == 2 and len(sent.messages) == 2
    # the store keeps it across a restart: the device asks only for what changed
    again = LedgerBook(Sent(), tmp_path / "ledgers.json")
    assert again.have() == {"config": 2}
    assert again.ledger("config").get() == {"interval": 10}


async def test_a_copy_is_handed_out_and_names_are_checked() -> None:
    book = LedgerBook(Sent())
    led = book.ledger("config")
    await book.received("config", doc(1, {"nested": {"a": 1}}))
    got = led.get()
    got["nested"]["a"] = 2
    assert led.get() == {"nested": {"a": 1}}
    with pytest.raises(ValueError):
        book.ledger("Not-Valid")
    with pytest.raises(ValueError):
        book.ledger("x" * 33)
