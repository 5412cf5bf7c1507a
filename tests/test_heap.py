"""The collector of a served process: start-up's objects frozen, rarer young collections
(corral.kit.heap; bench/README B1: the full collections' pauses made /healthz's p99)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from corral.kit import heap
from corral.settings import Settings
from corral.web.app import create_app


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settling_freezes_the_survivors_and_sets_the_young_threshold(restored_gc: None
                                                                      ) -> None:
    gc.unfreeze()
    kept = [object() for _ in range(10)]  # noqa: F841 - alive while frozen
    heap.settle_after_start(12_345)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == 12_345
    heap.settle_after_start(0)  # 0 keeps the threshold as it is
    assert gc.get_threshold()[0] == 12_345


async def test_a_served_app_settles_its_heap_once_started(settings: Settings,
                                                          restored_gc: None) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    app = create_app(settings.model_copy(update={"gc_gen0_threshold": 4_321}))
    async with app.router.lifespan_context(app):
        assert gc.get_threshold() == (4_321, 10, 10)
        assert gc.get_freeze_count() > 0


def test_the_threshold_is_a_validated_setting() -> None:
    assert Settings().gc_gen0_threshold == 20_000
    with pytest.raises(ValueError):
        Settings(gc_gen0_threshold=-1)
