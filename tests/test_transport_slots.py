"""Handshake slots shared between peer addresses (corral.transports.slots)."""

from __future__ import annotations

import asyncio

import pytest

from corral.transports.slots import AddressSlots


async def test_one_address_gets_at_most_its_share_and_others_go_first():
    slots = AddressSlots(4, 2)
    await slots.acquire("a")
    await slots.acquire("a")
    third = asyncio.ensure_future(slots.acquire("a"))
    await asyncio.sleep(0)
    assert not third.done() and slots.held == 2  # "a" is at its cap; two slots stay free
    await slots.acquire("b")
    await slots.acquire("c")
    late_d = asyncio.ensure_future(slots.acquire("d"))
    await asyncio.sleep(0)
    assert slots.held == 4 and slots.waiting == 2
    slots.release("b")  # "a" waited first but is at its cap: "d" gets it
    await asyncio.sleep(0)
    assert late_d.done() and not third.done()
    slots.release("a")
    await asyncio.sleep(0)
    assert third.done() and slots.by_address == {"a": 2, "c": 1, "d": 1}


async def test_a_cancelled_wait_gives_nothing_back_and_leaves_no_waiter():
    slots = AddressSlots(1, 1)
    await slots.acquire("a")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await slots.acquire("b")
    assert slots.waiting == 0 and slots.held == 1
    slots.release("a")
    assert slots.held == 0 and slots.by_address == {}
    async with slots.hold("b"):
        assert slots.held == 1
    assert slots.held == 0


async def test_many_waiters_from_one_address_are_served_in_order():
    slots = AddressSlots(8, 4)
    order: list[int] = []

    async def one(i: int) -> None:
        async with slots.hold("storm"):
            order.append(i)
            await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(2000)))
    assert order == list(range(2000)) and slots.held == 0 and slots.waiting == 0


def test_bad_sizes():
    with pytest.raises(ValueError):
        AddressSlots(0, 1)
    assert AddressSlots(4, 10).per_address == 4
