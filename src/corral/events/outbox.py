"""The integration outbox row an event-writer batch adds (DESIGN §8: per batch, never per event).

It lives with the writer that adds it; the integrations worker (:mod:`corral.integrations.tasks`)
reads and deletes the rows.

The writer calls :func:`wanted` on a batch's rows and, when it is true, records the batch's
id range in the same transaction as the rows: on SQLite with :data:`SQLITE_INSERT` after the
insert, on PostgreSQL as a CTE of the statement that takes the ids (:data:`PG_CTE`), so an
integration costs the ingest path no extra round trip there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from corral.metering.ledger import uncounted_name

# events corral itself publishes about integrations never trigger one (no loops)
HOOK_PREFIXES = ("hook-sent/", "hook-response/", "hook-error/")


def may_trigger(name: str) -> bool:
    """Can an event of this name trigger an integration? Not the cloud's system events
    (``spark*``/``particle*``, as on Particle) and not corral's own ``hook-*`` results."""
    return not uncounted_name(name) and not name.startswith(HOOK_PREFIXES)


def wanted(rows: Iterable[Any]) -> bool:
    """Does a batch of ``NewEvent`` rows need an outbox row?"""
    return any(may_trigger(r.name) for r in rows)


SQLITE_INSERT = "INSERT INTO integration_outbox (first_event_id, last_event_id) VALUES (?, ?)"
# needs the batch's ids as the CTE ``ids(id)``
PG_CTE = ("integration_ob AS (INSERT INTO integration_outbox (first_event_id, last_event_id) "
          "SELECT min(id), max(id) FROM ids)")
