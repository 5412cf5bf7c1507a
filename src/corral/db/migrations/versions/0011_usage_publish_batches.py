"""usage publish batches (PostgreSQL) and the usage_pending view readers and the fold use

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-21 17:40:00

PostgreSQL: a writer batch's counted publishes become ONE row of ``usage_publish_batches``
(parallel arrays, one element per publish) instead of one ``usage_deltas`` row each; its id
comes from the deltas' sequence, so the two kinds of pending usage share one order. The view
``usage_pending`` unrolls the batches next to the deltas, one row per increment, with
``pos``: an order key unique across both (``id * 2^20``, plus the element's position for a
batch's publishes). SQLite keeps one delta per publish and its view is the deltas alone.
"""

from __future__ import annotations

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

COUNTERS = ('events_published', 'events_delivered', 'function_calls', 'variable_reads',
            'events_discarded', 'data_operations', 'data_operations_kb', 'payload_bytes',
            'location_points', 'cellular_bytes')
KEYS = ('device_id', 'period', 'product_id', 'org_id', 'owner_user_id')
POS = 1048576  # 2^20: a batch holds fewer publishes than this

DELTAS = (f"SELECT id * {POS} AS pos, {', '.join(KEYS)}, {', '.join(COUNTERS)} "
          f"FROM usage_deltas")
# a publish: events_published 1, data_operations 1, data_operations_kb one per started
# 1024 bytes (at least 1), payload_bytes its size; the other counters 0
PUBLISHES = (
    f"SELECT b.id * {POS} + x.n, x.device_id, x.period, x.product_id, x.org_id, "
    f"x.owner_user_id, 1, 0, 0, 0, 0, 1, greatest(1, (x.size + 1023) / 1024), x.size, 0, 0 "
    f"FROM usage_publish_batches AS b CROSS JOIN LATERAL unnest(b.device_ids, b.periods, "
    f"b.product_ids, b.org_ids, b.owner_user_ids, b.payload_bytes) WITH ORDINALITY "
    f"AS x(device_id, period, product_id, org_id, owner_user_id, size, n)")


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        op.execute(f"CREATE VIEW usage_pending AS {DELTAS}")
        return
    op.execute(
        "CREATE TABLE usage_publish_batches ("
        "id bigint NOT NULL DEFAULT nextval('usage_deltas_id_seq'::regclass), "
        "device_ids varchar(24)[] NOT NULL, periods date[] NOT NULL, "
        "product_ids integer[] NOT NULL, org_ids integer[] NOT NULL, "
        "owner_user_ids integer[] NOT NULL, payload_bytes bigint[] NOT NULL, "
        "CONSTRAINT pk_usage_publish_batches PRIMARY KEY (id)) "
        # a batch of a few hundred publishes stays one plain row: no compression, no TOAST
        "WITH (toast_tuple_target = 8160)")
    op.execute(f"CREATE VIEW usage_pending AS {DELTAS} UNION ALL {PUBLISHES}")


def downgrade() -> None:
    op.execute("DROP VIEW usage_pending")
    if op.get_bind().dialect.name != 'postgresql':
        return
    # what is not folded yet becomes deltas again, one per publish, in order
    cols = f"{', '.join(KEYS)}, {', '.join(COUNTERS)}"
    op.execute(f"INSERT INTO usage_deltas ({cols}) SELECT {cols} "
               f"FROM ({PUBLISHES}) AS x(pos, {cols}) ORDER BY x.pos")
    op.drop_table('usage_publish_batches')
