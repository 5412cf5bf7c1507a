"""Substring search of device names and serial numbers, served by an index on both databases.

A name or serial substring (``deviceName``, ``serialNumber``) cannot use a B-tree index, and
at a million devices a scan costs most of a second (bench B3). Migration 0020 adds:

* PostgreSQL: ``pg_trgm`` GIN indexes on ``devices.name`` and ``devices.serial_number``
  (``gin_trgm_ops``), which serve ``ILIKE '%text%'``;
* SQLite: ``devices_search``, an FTS5 table with the ``trigram`` tokenizer over the same two
  columns, external content (``devices``, by rowid) kept in step by triggers; a phrase
  query on a column finds the rows containing the text, case-insensitively.

Text shorter than three characters has no trigram: it is matched by a scan, as before.

A later migration that rebuilds ``devices`` on SQLite (Alembic's batch mode copies the
table: the triggers go and rowids may change) must call :func:`sqlite_install` again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import literal, literal_column, select, table
from sqlalchemy.sql.elements import ColumnElement

TABLE = "devices_search"
# what SQLite's FTS5 keeps beside the virtual table (for the schema checks)
SQLITE_TABLES = frozenset({TABLE, f"{TABLE}_data", f"{TABLE}_idx", f"{TABLE}_docsize",
                           f"{TABLE}_config"})
PG_INDEXES = frozenset({"ix_devices_name_trgm", "ix_devices_serial_trgm"})
MIN_INDEXED = 3  # a trigram index needs this many characters
COLUMNS = ("name", "serial_number")

_SEARCH = table(TABLE, literal_column("rowid"))


def contains(dialect: str, column: Any, name: str, text: str) -> ColumnElement[bool]:
    """``column`` (``devices.name`` or ``devices.serial_number``, called ``name``) contains
    ``text``, case-insensitively, through the search index where there is one."""
    if dialect == "sqlite" and len(text) >= MIN_INDEXED:
        phrase = '"' + text.replace('"', '""') + '"'
        matches: Any = select(literal_column("rowid")).select_from(_SEARCH).where(
            literal_column(TABLE).op("MATCH")(literal(f"{name} : {phrase}")))
        return literal_column("devices.rowid").in_(matches)
    if dialect == "postgresql":
        escaped = text.replace("/", "//").replace("%", "/%").replace("_", "/_")
        result: ColumnElement[bool] = column.ilike(f"%{escaped}%", escape="/")
        return result
    result = column.icontains(text, autoescape=True)
    return result

