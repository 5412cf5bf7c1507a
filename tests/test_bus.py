"""The bus contract, run against both implementations (the in-process bus and NATS on
127.0.0.1:4222): subject matching, fan-out, queue groups, ordering, isolation,
request/reply, overflow and shutdown; then what only the in-process bus has (its index)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.bus import (
    Bus,
    BusClosed,
    BusError,
    BusTimeout,
    InProcessBus,
    Message,
    NoResponders,
    Subscription,
    matches,
    validate_pattern,
    validate_subject,
)
from corral.bus.inprocess import InProcessSubscription, SubjectIndex
from corral.bus.nats import NatsBus
from natskit import namespace, need_nats

WAIT = 5.0  # upper bound for every wait; tests finish long before it


class Inbox:
    """A handler that records messages and lets a test wait for a count."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)
        self._changed.set()

    async def wait_for(self, n: int) -> list[Message]:
        async def until() -> None:
            while len(self.messages) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), WAIT)
        return self.messages

    @property
    def subjects(self) -> list[str]:
        return [m.subject for m in self.messages]


async def drain(bus: AnyBus) -> None:
    """Wait (bounded) until every message sent so far is delivered and every subscription
    worker is idle with an empty queue."""
    if isinstance(bus, NatsBus):
        await asyncio.wait_for(bus.flush(), WAIT)
        return

    def idle(sub: InProcessSubscription) -> bool:
        return sub._worker is None or sub._worker.done()

    async def until() -> None:
        while not all(idle(s) for s in bus._subs):  # noqa: ASYNC110 (yield to the workers)
            await asyncio.sleep(0)

    await asyncio.wait_for(until(), WAIT)


AnyBus = InProcessBus | NatsBus
KINDS = ["inprocess", "nats"]


async def new_bus(kind: str, **kw: int) -> AnyBus:
    if kind == "nats":
        return await NatsBus.connect(need_nats(), namespace=namespace(), **kw)
    return InProcessBus(**kw)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def bus(kind: str):
    b = await new_bus(kind)
    yield b
    await b.close()


# --- matching ---------------------------------------------------------------------------

MATCH_TABLE = [
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b.c", "a.b.c.d", False),
    ("a.b.c", "a.x.c", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.c", False),
    ("a.*.c", "a.b.x.c", False),
    ("a.*.c", "a.b.c.d", False),
    ("a.*", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "a", False),
    ("a.>", "b.a", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b", False),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_TABLE)
def test_matches_table(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_TABLE)
async def test_delivery_follows_match_table(
    bus: AnyBus, pattern: str, subject: str, expected: bool
) -> None:
    got = Inbox()
    control = Inbox()
    await bus.subscribe(pattern, got)
    await bus.subscribe(subject, control)  # the literal subject always receives
    await bus.publish(subject, b"x")
    await control.wait_for(1)
    await drain(bus)
    assert len(got.messages) == (1 if expected else 0)


def reference_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(tok))
    return re.compile(r"\.".join(parts))


TOKENS = st.sampled_from(["a", "b", "c-1", "_x"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    toks = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=5))
    if not toks or draw(st.booleans()):
        toks.append(">")
    return ".".join(toks)


@settings(max_examples=300, deadline=None)
@given(pattern=patterns(), subject=SUBJECTS)
def test_matches_equals_reference_regex(pattern: str, subject: str) -> None:
    validate_pattern(pattern)
    validate_subject(subject)
    expected = reference_regex(pattern).fullmatch(subject) is not None
    assert matches(pattern, subject) is expected


class _FakeSub:
    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.queue = None


@settings(max_examples=200, deadline=None)
@given(pats=st.lists(patterns(), min_size=0, max_size=8), subject=SUBJECTS)
def test_index_agrees_with_matches(pats: list[str], subject: str) -> None:
    index = SubjectIndex()
    subs = [_FakeSub(p) for p in pats]
    for s in subs:
        index.add(s)  # type: ignore[arg-type]
    got = sorted(id(s) for s in index.match(subject))
    assert got == sorted(id(s) for s in subs if matches(s.pattern, subject))
    for s in subs:
        assert index.remove(s)  # type: ignore[arg-type]
    assert index.count == 0
    assert index.patterns() == []
    assert index.match(subject) == []


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject", ["", ".", "a.", ".a", "a..b", "a b", "a/b", "a.*", "a.>", "*", ">", "é", 7]
)
async def test_invalid_subjects_rejected(bus: AnyBus, subject: str) -> None:
    with pytest.raises(ValueError):
        await bus.publish(subject, b"")
    with pytest.raises(ValueError):
        await bus.request(subject, b"", timeout=1)


@pytest.mark.parametrize(
    "pattern", ["", "a.", "a..b", "a*", "a.b*", "a.>.b", ">.a", "> ", "a.>>", "a/b"]
)
async def test_invalid_patterns_rejected(bus: AnyBus, pattern: str) -> None:
    with pytest.raises(ValueError):
        await bus.subscribe(pattern, Inbox())
    assert bus.subscription_count == 0


async def test_invalid_queue_name_and_payload_rejected(bus: AnyBus) -> None:
    with pytest.raises(ValueError):
        await bus.subscribe("a", Inbox(), queue="bad name")
    with pytest.raises(TypeError):
        await bus.publish("a", "text")  # type: ignore[arg-type]
    assert bus.subscription_count == 0


# --- fan-out and payloads ---------------------------------------------------------------


async def test_fan_out_to_every_plain_subscriber(bus: AnyBus) -> None:
    inboxes = [Inbox() for _ in range(5)]
    for i, inbox in enumerate(inboxes):
        await bus.subscribe(["dev.1.ev", "dev.*.ev", "dev.>", ">", "dev.1.ev"][i], inbox)
    other = Inbox()
    await bus.subscribe("dev.2.ev", other)
    await bus.publish("dev.1.ev", {"n": 1})
    for inbox in inboxes:
        [msg] = await inbox.wait_for(1)
        assert msg.subject == "dev.1.ev"
        assert msg.reply is None
    await drain(bus)
    assert other.messages == []


async def test_dict_payload_is_compact_utf8_json(bus: AnyBus) -> None:
    inbox = Inbox()
    await bus.subscribe("a", inbox)
    await bus.publish("a", {"name": "températ", "v": [1, 2]})
    await bus.publish("a", b"\x00raw")
    first, second = await inbox.wait_for(2)
    assert first.data == '{"name":"températ","v":[1,2]}'.encode()
    assert first.json() == {"name": "températ", "v": [1, 2]}
    assert second.data == b"\x00raw"


async def test_publish_without_subscribers_is_fine(bus: AnyBus) -> None:
    await bus.publish("nobody.listens", b"x")


async def test_bus_satisfies_protocols(bus: AnyBus) -> None:
    sub = await bus.subscribe("a", Inbox())
    assert isinstance(bus, Bus)
    assert isinstance(sub, Subscription)


# --- queue groups -----------------------------------------------------------------------


async def test_queue_group_shares_load_exactly_once(bus: AnyBus) -> None:
    workers = [Inbox() for _ in range(3)]
    for w in workers:
        await bus.subscribe("job.*", w, queue="workers")
    plain = Inbox()
    await bus.subscribe("job.*", plain)
    other_group = Inbox()
    await bus.subscribe("job.*", other_group, queue="auditors")
    n = 300
    for i in range(n):
        await bus.publish("job.run", {"i": i})
    await plain.wait_for(n)
    await other_group.wait_for(n)
    await drain(bus)
    seen = [m.json()["i"] for w in workers for m in w.messages]
    assert sorted(seen) == list(range(n))  # each exactly once within the group
    counts = [len(w.messages) for w in workers]
    assert max(counts) - min(counts) <= 1, counts  # round-robin: balanced
    assert [m.json()["i"] for m in plain.messages] == list(range(n))


async def test_same_queue_name_on_different_patterns_are_different_groups(
    bus: AnyBus,
) -> None:
    a, b = Inbox(), Inbox()
    await bus.subscribe("job.run", a, queue="q")
    await bus.subscribe("job.*", b, queue="q")
    await bus.publish("job.run", b"x")
    await a.wait_for(1)
    await b.wait_for(1)


async def test_queue_group_member_leaving_keeps_group_working(bus: AnyBus) -> None:
    a, b = Inbox(), Inbox()
    sa = await bus.subscribe("w", a, queue="q")
    await bus.subscribe("w", b, queue="q")
    await sa.unsubscribe()
    for _ in range(4):
        await bus.publish("w", b"x")
    await b.wait_for(4)
    assert a.messages == []


# --- ordering, isolation ----------------------------------------------------------------


async def test_order_kept_per_subscription_under_10k_messages(bus: AnyBus) -> None:
    inboxes = [Inbox() for _ in range(3)]
    await bus.subscribe("seq.>", inboxes[0])
    await bus.subscribe("seq.*", inboxes[1])
    await bus.subscribe("seq.n", inboxes[2])
    n = 10_000
    for i in range(n):
        await bus.publish("seq.n", i.to_bytes(4, "big"))
        if i % 997 == 0:
            await asyncio.sleep(0)  # interleave publisher and workers too
    for inbox in inboxes:
        msgs = await inbox.wait_for(n)
        assert [int.from_bytes(m.data, "big") for m in msgs] == list(range(n))


async def test_slow_handler_blocks_nobody(bus: AnyBus) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def stuck(msg: Message) -> None:
        started.set()
        await gate.wait()

    stuck_sub = await bus.subscribe("t", stuck)
    fast = Inbox()
    await bus.subscribe("t", fast)
    await bus.publish("t", b"0")
    await asyncio.wait_for(started.wait(), WAIT)
    for i in range(1, 50):
        await asyncio.wait_for(bus.publish("t", str(i).encode()), WAIT)
    msgs = await fast.wait_for(50)
    assert [m.data for m in msgs] == [str(i).encode() for i in range(50)]
    assert stuck_sub.pending == 49
    # close() cancels the stuck worker instead of hanging on it.
    await asyncio.wait_for(bus.close(), WAIT)
    assert stuck_sub.pending == 0


async def test_failing_handler_is_logged_and_isolated(
    bus: AnyBus, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[bytes] = []

    async def broken(msg: Message) -> None:
        calls.append(msg.data)
        raise RuntimeError("boom")

    await bus.subscribe("f", broken)
    ok = Inbox()
    await bus.subscribe("f", ok)
    with caplog.at_level(logging.ERROR, logger="corral.bus.inprocess"):
        for i in range(3):
            await bus.publish("f", bytes([i]))  # never raises into the publisher
        await ok.wait_for(3)
        await drain(bus)
    assert calls == [b"\x00", b"\x01", b"\x02"]  # the broken subscription keeps going
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 3
    assert failures[0].exc_info is not None and "boom" in str(failures[0].exc_info[1])


# --- request / reply --------------------------------------------------------------------


async def test_request_reply(bus: AnyBus) -> None:
    async def double(msg: Message) -> None:
        assert msg.reply is not None
        await msg.respond({"result": msg.json()["x"] * 2})

    await bus.subscribe("calc.double", double)
    reply = await bus.request("calc.double", {"x": 21}, timeout=WAIT)
    assert reply.json() == {"result": 42}
    # Concurrent requests each get their own answer.
    replies = await asyncio.gather(
        *(bus.request("calc.double", {"x": i}, timeout=WAIT) for i in range(20))
    )
    assert [r.json()["result"] for r in replies] == [2 * i for i in range(20)]
    assert bus._replies == {}


async def test_request_through_queue_group_first_reply_wins(bus: AnyBus) -> None:
    answered: list[str] = []

    def responder(name: str):
        async def handle(msg: Message) -> None:
            answered.append(name)
            await msg.respond(name.encode())

        return handle

    await bus.subscribe("svc", responder("a"), queue="g")
    await bus.subscribe("svc", responder("b"), queue="g")
    got = [(await bus.request("svc", b"", timeout=WAIT)).data for _ in range(4)]
    assert got == [b"a", b"b", b"a", b"b"]
    assert answered == ["a", "b", "a", "b"]


async def test_request_without_responders(bus: AnyBus) -> None:
    await bus.subscribe("other", Inbox())
    with pytest.raises(NoResponders):
        await bus.request("svc.none", b"", timeout=WAIT)
    assert bus._replies == {}


async def test_request_timeout(bus: AnyBus) -> None:
    silent = Inbox()
    await bus.subscribe("svc.silent", silent)
    with pytest.raises(BusTimeout) as err:
        await bus.request("svc.silent", b"", timeout=0.02)
    assert isinstance(err.value, TimeoutError)
    assert len(silent.messages) == 1
    # A late reply to the abandoned inbox goes nowhere and harms nothing.
    await silent.messages[0].respond(b"late")
    assert bus._replies == {}


async def test_respond_without_reply_subject_fails(bus: AnyBus) -> None:
    inbox = Inbox()
    await bus.subscribe("x", inbox)
    await bus.publish("x", b"")
    [msg] = await inbox.wait_for(1)
    with pytest.raises(ValueError):
        await msg.respond(b"")


async def test_close_fails_pending_request(bus: AnyBus) -> None:
    silent = Inbox()
    await bus.subscribe("svc.silent", silent)
    pending = asyncio.create_task(bus.request("svc.silent", b"", timeout=WAIT))
    await silent.wait_for(1)
    await bus.close()
    with pytest.raises(BusClosed):
        await asyncio.wait_for(pending, WAIT)


# --- unsubscribe, overflow, close -------------------------------------------------------


async def test_unsubscribe_stops_delivery(bus: AnyBus) -> None:
    a, b = Inbox(), Inbox()
    sa = await bus.subscribe("u.*", a)
    await bus.subscribe("u.*", b)
    await bus.publish("u.1", b"")
    await a.wait_for(1)
    await asyncio.wait_for(sa.unsubscribe(), WAIT)
    await asyncio.wait_for(sa.unsubscribe(), WAIT)  # idempotent
    await bus.publish("u.2", b"")
    await b.wait_for(2)
    await drain(bus)
    assert a.subjects == ["u.1"]
    assert sa._worker is None or sa._worker.done()
    assert bus.subscription_count == 1
    if isinstance(bus, InProcessBus):
        assert bus._index.patterns() == ["u.*"]


async def test_unsubscribe_from_own_handler(bus: AnyBus) -> None:
    got: list[bytes] = []
    holder: list[InProcessSubscription] = []

    async def once(msg: Message) -> None:
        got.append(msg.data)
        await holder[0].unsubscribe()

    holder.append(await bus.subscribe("o", once))
    await bus.publish("o", b"1")
    await bus.publish("o", b"2")
    await drain(bus)
    assert got == [b"1"]
    assert bus.subscription_count == 0


async def test_overflow_drops_oldest_and_counts(kind: str) -> None:
    bus = await new_bus(kind, max_pending=5)
    gate = asyncio.Event()
    started = asyncio.Event()
    got: list[int] = []

    async def slow(msg: Message) -> None:
        got.append(msg.data[0])
        started.set()
        await gate.wait()

    sub = await bus.subscribe("o", slow)
    fast = Inbox()
    fast_sub = await bus.subscribe("o", fast)
    await bus.publish("o", bytes([0]))
    await asyncio.wait_for(started.wait(), WAIT)  # message 0 is in the handler
    for i in range(1, 11):
        await bus.publish("o", bytes([i]))
        await fast.wait_for(i + 1)  # the fast subscriber keeps up meanwhile
    assert sub.dropped == 5
    assert sub.pending == 5
    gate.set()
    await drain(bus)
    assert got == [0, 6, 7, 8, 9, 10]  # the oldest were dropped
    assert fast_sub.dropped == 0
    assert len(await fast.wait_for(11)) == 11
    await bus.close()


async def test_close_stops_everything(kind: str) -> None:
    bus = await new_bus(kind)
    inbox = Inbox()
    subs = [await bus.subscribe(p, inbox) for p in ("a", "a.>", "*")]
    await bus.close()
    await bus.close()  # idempotent
    assert all(s._worker is None or s._worker.done() for s in subs)
    assert bus.subscription_count == 0
    with pytest.raises(BusClosed):
        await bus.publish("a", b"")
    with pytest.raises(BusClosed):
        await bus.subscribe("a", inbox)
    with pytest.raises(BusClosed):
        await bus.request("a", b"", timeout=1)
    await subs[0].unsubscribe()  # harmless after close


async def test_many_literal_subscriptions_index_stays_exact(bus: AnyBus) -> None:
    inboxes = {i: Inbox() for i in range(500)}
    for i, inbox in inboxes.items():
        await bus.subscribe(f"device.{i:04x}.call", inbox)
    star = Inbox()
    await bus.subscribe("device.*.call", star)
    await bus.publish("device.0123.call", b"")
    await star.wait_for(1)
    await drain(bus)
    hits = Counter(i for i, inbox in inboxes.items() if inbox.messages)
    assert list(hits) == [0x123]


async def test_an_idle_subscription_holds_no_task_and_a_delivery_starts_one(kind: str) -> None:
    bus = await new_bus(kind)
    started = asyncio.Event()
    release = asyncio.Event()
    seen: list[str] = []

    async def slow(msg: Message) -> None:
        seen.append(msg.subject)
        started.set()
        await release.wait()

    sub = await bus.subscribe("dev.*", slow)
    assert sub._worker is None  # nothing pending: no worker
    await bus.publish("dev.a", b"1")
    await bus.publish("dev.b", b"2")
    await asyncio.wait_for(started.wait(), 5)
    worker = sub._worker
    assert worker is not None and not worker.done()
    release.set()
    await asyncio.wait_for(asyncio.shield(worker), 5)
    assert seen == ["dev.a", "dev.b"]  # one worker, in order
    assert sub._worker is None  # drained: the worker is gone until the next delivery
    await bus.publish("dev.c", b"3")
    await drain(bus)
    assert seen == ["dev.a", "dev.b", "dev.c"]
    await sub.unsubscribe()
    await bus.close()


# --- NATS across nodes ------------------------------------------------------------------


@pytest.fixture
async def two_nodes():
    """Two NATS buses in one namespace: two corral nodes as far as the bus is concerned."""
    url, ns = need_nats(), namespace()
    a = await NatsBus.connect(url, namespace=ns, name="node-a")
    b = await NatsBus.connect(url, namespace=ns, name="node-b")
    yield a, b
    await a.close()
    await b.close()


async def test_nats_subscription_is_live_across_nodes_when_subscribe_returns(two_nodes) -> None:
    a, b = two_nodes
    for i in range(20):  # no sleep between subscribe and the other node's publish
        inbox = Inbox()
        await a.subscribe(f"live.{i}", inbox)
        await b.publish(f"live.{i}", b"x")
        await inbox.wait_for(1)


async def test_nats_fan_out_and_local_sharing_across_nodes(two_nodes) -> None:
    a, b = two_nodes
    here = [Inbox() for _ in range(50)]
    for inbox in here:  # fifty local subscriptions on one pattern: one NATS subscription
        await a.subscribe("ev.*.7", inbox)
    there = Inbox()
    await b.subscribe("ev.>", there)
    assert len(a._remotes) == 1
    for i in range(10):
        await b.publish(f"ev.{i}.7", {"i": i})
    for inbox in [*here, there]:
        msgs = await inbox.wait_for(10)
        assert [m.json()["i"] for m in msgs] == list(range(10))
        assert msgs[0].subject == "ev.0.7"  # the namespace is not visible


async def test_nats_queue_group_exactly_once_across_nodes(two_nodes) -> None:
    a, b = two_nodes
    workers = [Inbox() for _ in range(4)]
    for i, w in enumerate(workers):
        await (a if i % 2 else b).subscribe("job.*", w, queue="workers")
    n = 400
    for i in range(n):
        await a.publish("job.run", {"i": i})
    await drain(a)
    await drain(b)

    async def until_all() -> None:
        while sum(len(w.messages) for w in workers) < n:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(until_all(), WAIT)
    seen = sorted(m.json()["i"] for w in workers for m in w.messages)
    assert seen == list(range(n))
    assert all(w.messages for w in workers)  # both nodes and all local members took work


async def test_nats_request_reply_and_no_responders_across_nodes(two_nodes) -> None:
    a, b = two_nodes

    async def double(msg: Message) -> None:
        await msg.respond({"result": msg.json()["x"] * 2})

    sub = await a.subscribe("device.abc.request", double)
    replies = await asyncio.gather(
        *(b.request("device.abc.request", {"x": i}, timeout=WAIT) for i in range(20)))
    assert [r.json()["result"] for r in replies] == [2 * i for i in range(20)]
    await sub.unsubscribe()
    await drain(a)
    with pytest.raises(NoResponders):
        await b.request("device.abc.request", {"x": 1}, timeout=WAIT)
    assert b._replies == {}


async def test_nats_namespaces_do_not_hear_each_other() -> None:
    url = need_nats()
    a = await NatsBus.connect(url, namespace=namespace())
    b = await NatsBus.connect(url, namespace=namespace())
    try:
        inbox = Inbox()
        await a.subscribe(">", inbox)
        await b.publish("x.y", b"other cluster")
        await a.publish("x.y", b"mine")
        [msg] = await inbox.wait_for(1)
        await drain(a)
        assert msg.data == b"mine" and len(inbox.messages) == 1
        with pytest.raises(NoResponders):
            await b.request("x.y", b"", timeout=WAIT)
    finally:
        await a.close()
        await b.close()


async def test_nats_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(BusError, match="cannot connect to NATS"):
        await NatsBus.connect("nats://127.0.0.1:9", connect_timeout=1)
