"""Rendering for every command: Rich tables for people, raw JSON with ``--json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error (no traceback) and exit with ``code``."""
    errors.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    # plain stdout, no wrapping or colour: the output is meant for jq and scripts
    typer.echo(json.dumps(data, indent=2, default=str))


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console.print(t)


def fields(title: str | None, data: dict[str, Any], keys: Sequence[str]) -> None:
    """One object as a two-column table of the given keys (those present)."""
    table(title, ["field", "value"], [(k, _scalar(data[k])) for k in keys if k in data])


def _scalar(v: Any) -> str:
    return json.dumps(v) if isinstance(v, dict | list) else str(v)
