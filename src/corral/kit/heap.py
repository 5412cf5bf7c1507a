"""The garbage collector of a long-running server, set once start-up is done.

Start-up leaves several hundred thousand objects that live as long as the process
(modules, the ORM's mappers, the app's routes and schemas). Python's collector walks them
all again in every full collection: a pause of ~150 ms on this kind of machine, during which
no request is served (bench/README B1: ``/healthz`` p99 190 ms at 32 connections, 45 ms
with them frozen). Freezing them moves them out of the collector's sight for good;
objects made afterwards are collected as before. A higher first-generation threshold makes
the young collections, which run while requests allocate, rarer."""

from __future__ import annotations

import gc


def settle_after_start(gen0_threshold: int) -> None:
    """Collect what start-up left behind, freeze the survivors, and set the youngest
    generation's threshold (``0`` keeps Python's)."""
    gc.collect()
    gc.freeze()
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
