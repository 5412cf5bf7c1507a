"""The firmware precedence resolver as a table over every combination, and rollout shares
as properties (hypothesis): raising a percentage or a count never removes a device."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.firmware.resolver import (
    BUCKETS,
    DeviceFacts,
    Gate,
    ReleaseSet,
    Target,
    bucket,
    count_admitted,
    resolve,
)

G_RELEASED_LOW, G_RELEASED_HIGH, G_UNRELEASED = 1, 2, 3
RELEASED = {G_RELEASED_LOW: 4, G_RELEASED_HIGH: 7}  # group id -> released version
GROUP_CASES = {
    "no groups": frozenset(),
    "groups without releases": frozenset({G_UNRELEASED}),
    "one group with a release": frozenset({G_RELEASED_LOW, G_UNRELEASED}),
    "two groups with releases": frozenset({G_RELEASED_LOW, G_RELEASED_HIGH}),
}
DEFAULTS = {"no default": None, "default 5": 5, "default 9": 9}
C_RELEASED, C_UNRELEASED = 1, 2
COHORT_RELEASES = {C_RELEASED: 3}  # cohort id -> released version: below every group release
COHORTS = {"no cohort": None, "cohort without release": C_UNRELEASED,
           "cohort with release 3": C_RELEASED}


def expected(development: bool, locked: int | None, groups: frozenset[int],
             default: int | None, cohort: int | None = None) -> Target:
    """Particle's rules, written out independently of the implementation, with corral's
    cohorts: a cohort's release wins over its groups' releases, even higher ones."""
    if development:
        return Target(None, "development")
    if locked is not None:
        return Target(locked, "locked")
    if cohort in COHORT_RELEASES:
        return Target(COHORT_RELEASES[cohort], "cohort")
    group_versions = [RELEASED[g] for g in groups if g in RELEASED]
    if group_versions:
        return Target(max(group_versions), "group")
    if default is not None:
        return Target(default, "default")
    return Target(None, "none")


CASES = list(itertools.product([False, True], [None, 2], GROUP_CASES.items(),
                               DEFAULTS.items(), COHORTS.items()))


@pytest.mark.parametrize(
    ("development", "locked", "groups", "default", "cohort"), CASES,
    ids=[f"dev={d}-locked={lk}-{g[0]}-{df[0]}-{c[0]}" for d, lk, g, df, c in CASES])
def test_precedence_table(development, locked, groups, default, cohort):
    device = DeviceFacts(id="0123456789abcdef01234567", development=development,
                         desired_version=locked, group_ids=groups[1], firmware_version=1,
                         cohort_id=cohort[1])
    releases = ReleaseSet(default_version=default[1], group_versions=RELEASED,
                          cohort_versions=COHORT_RELEASES)
    assert resolve(device, releases) == expected(development, locked, groups[1], default[1],
                                                 cohort[1])


def test_cohort_release_wins_over_a_higher_group_release():
    """The documented choice: a device in a cohort with v3 and a group with v7 gets v3; once
    the cohort's release ends (or it leaves the cohort) it gets the group's v7."""
    d = DeviceFacts(id="b" * 24, group_ids=frozenset({G_RELEASED_HIGH}), cohort_id=C_RELEASED)
    rs = ReleaseSet(default_version=5, group_versions=RELEASED, cohort_versions={C_RELEASED: 3})
    assert resolve(d, rs) == Target(3, "cohort")
    assert resolve(d, ReleaseSet(default_version=5, group_versions=RELEASED)) == Target(7, "group")
    assert resolve(DeviceFacts(id="b" * 24, cohort_id=C_RELEASED),
                   ReleaseSet(default_version=5)) == Target(5, "default")


def test_a_cohort_release_under_rollout_falls_through_when_not_admitted():
    """v8 released to a cohort under a 0 % rollout: the cohort's devices not yet running it
    get their group's release (then the default); one already running v8 keeps it."""
    gate = Gate(rollout_id=4, firmware_id=80, version=8, state="active", percent_bp=0)
    rs = ReleaseSet(default_version=5, group_versions=RELEASED,
                    cohort_versions={C_RELEASED: 8}, gates={8: gate})
    grouped = DeviceFacts(id="c" * 24, group_ids=frozenset({G_RELEASED_LOW}),
                          cohort_id=C_RELEASED, firmware_version=4)
    assert resolve(grouped, rs) == Target(4, "group")
    assert resolve(DeviceFacts(id="c" * 24, cohort_id=C_RELEASED), rs) == Target(5, "default")
    running = DeviceFacts(id="c" * 24, cohort_id=C_RELEASED, firmware_version=8)
    assert resolve(running, rs) == Target(8, "cohort", rollout_id=4)


def test_table_spot_checks():
    """A few rows spelled out, so the table above cannot agree with itself by accident."""
    rs = ReleaseSet(default_version=5, group_versions=RELEASED)
    d = DeviceFacts(id="a" * 24, group_ids=frozenset({G_RELEASED_LOW, G_RELEASED_HIGH}))
    assert resolve(d, rs) == Target(7, "group")  # highest of its groups, above the default
    assert resolve(DeviceFacts(id="a" * 24, desired_version=2,
                               group_ids=frozenset({G_RELEASED_HIGH})), rs) == Target(2, "locked")
    assert resolve(DeviceFacts(id="a" * 24, development=True, desired_version=2), rs).version is None
    assert resolve(DeviceFacts(id="a" * 24, group_ids=frozenset({G_UNRELEASED})), rs) == Target(5, "default")
    assert resolve(DeviceFacts(id="a" * 24), ReleaseSet()) == Target(None, "none")


def ids(n: int, salt: int = 0) -> list[str]:
    return [f"{(i * 7919 + salt) % (1 << 96):024x}" for i in range(n)]


def test_gate_falls_through_to_lower_release():
    """A device a rollout does not admit gets what it would get without that release."""
    devices = [DeviceFacts(id=i, group_ids=frozenset({G_RELEASED_HIGH})) for i in ids(400)]
    gate = Gate(rollout_id=1, firmware_id=10, version=7, state="active", percent_bp=2500)
    rs = ReleaseSet(default_version=5, group_versions={G_RELEASED_HIGH: 7}, gates={7: gate})
    targets = [resolve(d, rs) for d in devices]
    admitted = [t for t in targets if t.version == 7]
    assert all(t.rollout_id == 1 for t in admitted)
    assert {t.version for t in targets} == {5, 7}
    assert all(t == Target(5, "default") for t in targets if t.version != 7)
    assert 60 < len(admitted) < 140  # ~25 % of 400


def test_paused_gate_holds_and_aborted_gate_keeps_only_devices_already_updated():
    d_new = DeviceFacts(id="0" * 24, firmware_version=3)
    d_done = DeviceFacts(id="1" * 24, firmware_version=7)
    for state in ("active", "paused", "aborted"):
        gate = Gate(rollout_id=1, firmware_id=10, version=7, state=state, percent_bp=BUCKETS)
        rs = ReleaseSet(default_version=7, gates={7: gate})
        t_new, t_done = resolve(d_new, rs), resolve(d_done, rs)
        assert t_done.version == 7 and not t_done.held
        if state == "aborted":
            assert t_new == Target(None, "none")
        else:
            assert t_new.version == 7 and t_new.held == (state == "paused")


def test_count_gate_admits_already_updated_devices_first():
    devices = [DeviceFacts(id=i, firmware_version=7 if n < 3 else 1)
               for n, i in enumerate(ids(50))]
    gate = Gate(rollout_id=1, firmware_id=3, version=7, state="active")
    rs = ReleaseSet(default_version=7, gates={7: gate})
    admitted = count_admitted(gate, 5, devices, rs)
    assert len(admitted) == 5 and {d.id for d in devices[:3]} <= admitted


device_ids = st.lists(st.from_regex(r"[0-9a-f]{24}", fullmatch=True), min_size=0,
                      max_size=60, unique=True)


@settings(max_examples=150, deadline=None)
@given(ids_=device_ids, firmware_id=st.integers(1, 10_000),
       a=st.integers(0, BUCKETS), b=st.integers(0, BUCKETS))
def test_raising_a_percentage_never_removes_a_device(ids_, firmware_id, a, b):
    low, high = sorted((a, b))
    devices = [DeviceFacts(id=i, firmware_version=1) for i in ids_]

    def admitted(bp: int) -> set[str]:
        gate = Gate(rollout_id=1, firmware_id=firmware_id, version=2, state="active",
                    percent_bp=bp)
        rs = ReleaseSet(default_version=2, gates={2: gate})
        return {d.id for d in devices if resolve(d, rs).version == 2}

    assert admitted(low) <= admitted(high)
    assert admitted(0) == set() and admitted(BUCKETS) == set(ids_)
    assert admitted(low) == {i for i in ids_ if bucket(firmware_id, i) < low}


@settings(max_examples=150, deadline=None)
@given(ids_=device_ids, firmware_id=st.integers(1, 10_000), a=st.integers(0, 70),
       b=st.integers(0, 70), updated=st.sets(st.integers(0, 59), max_size=10))
def test_raising_a_count_never_removes_a_device(ids_, firmware_id, a, b, updated):
    low, high = sorted((a, b))
    devices = [DeviceFacts(id=i, firmware_version=2 if n in updated else 1)
               for n, i in enumerate(ids_)]
    gate = Gate(rollout_id=1, firmware_id=firmware_id, version=2, state="active")
    rs = ReleaseSet(default_version=2, gates={2: gate})
    small, large = (count_admitted(gate, n, devices, rs) for n in (low, high))
    assert small <= large
    assert len(large) == min(high, len(ids_))


G_DYNAMIC = 10  # a dynamic group: the resolver sees only its id (membership found beforehand)


@pytest.mark.parametrize(("groups", "cohort", "want"), [
    (frozenset({G_DYNAMIC}), None, Target(8, "group")),
    (frozenset({G_DYNAMIC, G_RELEASED_HIGH}), None, Target(8, "group")),  # the highest wins
    (frozenset({G_RELEASED_LOW}), None, Target(4, "group")),  # not matching: not in it
    (frozenset({G_DYNAMIC}), C_RELEASED, Target(3, "cohort")),  # a cohort still wins
    (frozenset({G_DYNAMIC}), C_UNRELEASED, Target(8, "group")),
    (frozenset(), None, Target(5, "default")),
])
def test_dynamic_groups_rank_like_static_groups_below_a_cohort(groups, cohort, want):
    """A dynamic group with a release is one more group in the table: the highest group
    release wins among static and dynamic groups alike, and a cohort's release wins over
    both, even when lower (v3 against v8)."""
    rs = ReleaseSet(default_version=5, group_versions={**RELEASED, G_DYNAMIC: 8},
                    cohort_versions=COHORT_RELEASES)
    d = DeviceFacts(id="c" * 24, group_ids=groups, cohort_id=cohort)
    assert resolve(d, rs) == want
