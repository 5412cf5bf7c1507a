"""The device filter language of dynamic groups: parse a query, check it, compile it.

A query is a boolean expression over a product's device attributes::

    tag = "north" and online and firmware >= 12
    (platform in [boron, 32] or serial ^= "B5") and not quarantined
    last_heard > 30d or last_heard = null

* ``and``, ``or``, ``not`` and parentheses (``not`` binds tightest, then ``and``, then
  ``or``); keywords are case-insensitive;
* a comparison is ``FIELD OP VALUE`` with ``OP`` one of ``= != < <= > >= ^=`` (``^=``:
  starts with), or ``FIELD in [V, ...]`` / ``FIELD not in [V, ...]``; a boolean field alone
  (``online``) means ``online = true``;
* values: ``"text"`` or ``'text'``, bare words (``boron``), integers, versions (``6.2.0``),
  durations (``30s 15m 12h 7d 2w``), ``true``, ``false``, ``null``.

:data:`FIELDS` lists the fields and the operators each takes. ``last_heard`` compares the
*age* of the last contact with a duration (``last_heard < 7d``: heard within the last 7
days) or the time itself with an ISO 8601 timestamp (``last_heard < "2026-01-01"``: last
heard before that day). A device without a value (never heard, no firmware reported, in no
cohort) matches only ``= null`` and the negative forms (``!=``, ``not in``, ``not``).

Parsing is done by the ``lark`` library (LALR, the grammar below); :func:`parse` checks
fields, operators and values and raises :class:`QueryError` with a line and column;
:func:`compile_query` turns a parsed query into a SQLAlchemy condition on ``Device``
(bound parameters only, never SQL text). Group references (``group = "x"``) name static
groups or other dynamic groups (inlined, at most ``MAX_DEPTH`` deep, no cycles).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput
from sqlalchemy import and_, false, not_, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.auth.models import Customer, User
from corral.devices.cohort_models import Cohort, CohortMember
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember, DeviceTag
from corral.kit import clock
from corral.kit.errors import BadRequest

MAX_QUERY_LEN = 2000
MAX_LIST = 100  # values in one ``in [...]``
MAX_DEPTH = 5  # dynamic groups referring to dynamic groups

GRAMMAR = r"""
start: expr

?expr: and_expr
     | expr _OR and_expr          -> or_
?and_expr: not_expr
     | and_expr _AND not_expr     -> and_
?not_expr: _NOT not_expr          -> not_
     | atom
?atom: "(" expr ")"
     | FIELD OP value             -> compare
     | FIELD _IN list             -> in_
     | FIELD _NOT _IN list        -> not_in
     | FIELD                      -> flag

list: "[" [value ("," value)*] "]"
?value: STRING | DURATION | VERSION | INT | TRUE | FALSE | NULL | WORD

_OR.2: /or\b/i
_AND.2: /and\b/i
_NOT.2: /not\b/i
_IN.2: /in\b/i
TRUE.2: /true\b/i
FALSE.2: /false\b/i
NULL.2: /null\b/i
OP: "<=" | ">=" | "!=" | "==" | "=" | "<" | ">" | "^="
FIELD: /[A-Za-z_][A-Za-z0-9_]*/
WORD: /[A-Za-z0-9_][A-Za-z0-9_.:@+-]*/
DURATION.3: /[0-9]+[smhdw](?![A-Za-z0-9_.:@+-])/
VERSION.2: /[0-9]+(\.[0-9A-Za-z+-]+)+(?![A-Za-z0-9_.:@])/
INT.2: /[0-9]+(?![A-Za-z0-9_.:@+-])/
STRING: /"(?:[^"\\]|\\.)*"/ | /'(?:[^'\\]|\\.)*'/

%import common.WS
%ignore WS
"""

_PARSER = Lark(GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=False)

# Particle platform names (ids are accepted too)
PLATFORMS: Mapping[str, int] = {
    "photon": 6, "p1": 8, "electron": 10, "argon": 12, "boron": 13, "xenon": 14,
    "esomx": 15, "bsom": 23, "b5som": 25, "tracker": 26, "trackerm": 28, "p2": 32,
    "msom": 35,
}
DURATION_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}

EQ = frozenset({"=", "!="})
ORDER = frozenset({"<", "<=", ">", ">="})


@dataclass(frozen=True)
class Field:
    """One attribute: its kind (bool, int, text, time, ref) and the operators it takes."""

    kind: str
    ops: frozenset[str]
    nullable: bool = False
    lists: bool = True  # takes ``in [...]``
    help: str = ""


_TEXT_OPS = EQ | {"^="}
FIELDS: Mapping[str, Field] = {
    "tag": Field("text", EQ, help="carries the tag (case kept)"),
    "cohort": Field("text", EQ, nullable=True, help="its cohort's name"),
    "group": Field("text", EQ, help="a member of the group (static or dynamic)"),
    "firmware": Field("int", EQ | ORDER, nullable=True, help="product firmware version"),
    "os": Field("text", _TEXT_OPS, nullable=True, help="Device OS version, e.g. 6.2.0"),
    "platform": Field("platform", EQ, help="platform id or name (boron, p2, ...)"),
    "online": Field("bool", EQ, lists=False),
    "development": Field("bool", EQ, lists=False),
    "quarantined": Field("bool", EQ, lists=False),
    "cellular": Field("bool", EQ, lists=False),
    "last_heard": Field("time", ORDER | EQ, nullable=True, lists=False,
                        help="age (7d) or ISO 8601 time"),
    "customer": Field("text", EQ, nullable=True, help="the claiming customer's e-mail"),
    "owner": Field("text", EQ, nullable=True, help="the owning user's e-mail"),
    "serial": Field("text", _TEXT_OPS, nullable=True, help="serial number"),
    "name": Field("text", _TEXT_OPS, nullable=True, help="device name"),
    "id": Field("text", _TEXT_OPS, help="device ID (hex)"),
}
ALIASES = {"tags": "tag", "firmware_version": "firmware", "product_fw": "firmware",
           "device_os": "os", "system_firmware": "os", "serial_number": "serial",
           "device_name": "name", "device_id": "id", "groups": "group",
           "last_heard_at": "last_heard"}


class QueryError(BadRequest):
    """A query that does not parse or does not make sense; says where (1-based)."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(f"query: {message} (line {line}, column {column})",
                         code="invalid_query", line=line, column=column, field="query")
        self.message = message


# --- the parsed form ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    field: str
    op: str  # = != < <= > >= ^= in not_in
    values: tuple[Any, ...]  # one value, or the list's; None is null
    line: int
    column: int


@dataclass(frozen=True)
class Node:
    op: str  # and | or | not
    parts: tuple[Node | Leaf, ...]


Expr = Node | Leaf


@dataclass(frozen=True)
class Query:
    text: str
    expr: Expr

    def groups(self) -> set[str]:
        """The group names it refers to."""
        out: set[str] = set()
        stack: list[Expr] = [self.expr]
        while stack:
            e = stack.pop()
            if isinstance(e, Leaf):
                if e.field == "group":
                    out.update(v for v in e.values if isinstance(v, str))
            else:
                stack.extend(e.parts)
        return out


def _where(tok: Token | Tree[Any]) -> tuple[int, int]:
    if isinstance(tok, Token):
        return tok.line or 1, tok.column or 1
    return tok.meta.line or 1, tok.meta.column or 1


def _value(tok: Token) -> Any:
    kind = tok.type
    text = str(tok)
    if kind == "STRING":
        body = text[1:-1]
        return re.sub(r"\\(.)", r"\1", body)
    if kind == "INT":
        return int(text)
    if kind == "DURATION":
        return dt.timedelta(seconds=int(text[:-1]) * DURATION_S[text[-1].lower()])
    if kind == "TRUE":
        return True
    if kind == "FALSE":
        return False
    if kind == "NULL":
        return None
    return text  # WORD, VERSION


def _syntax_error(text: str, exc: UnexpectedInput) -> QueryError:
    line, column = exc.line if exc.line > 0 else 1, exc.column if exc.column > 0 else 1
    if isinstance(exc, UnexpectedEOF):
        lines = text.splitlines() or [""]
        return QueryError("the query ends too early", len(lines), len(lines[-1]) + 1)
    if isinstance(exc, UnexpectedCharacters):
        return QueryError(f"unexpected character {text[exc.pos_in_stream or 0]!r}", line, column)
    tok = getattr(exc, "token", None)
    if tok is not None and tok.type == "$END":
        lines = text.splitlines() or [""]
        return QueryError("the query ends too early", len(lines), len(lines[-1]) + 1)
    shown = str(tok) if tok is not None else "?"
    return QueryError(f"unexpected {shown!r}", line, column)


def parse(text: Any) -> Query:
    """The query ``text`` parsed and checked; :class:`QueryError` (400) otherwise."""
    if not isinstance(text, str):
        raise QueryError("must be a string")
    if len(text) > MAX_QUERY_LEN:
        raise QueryError(f"at most {MAX_QUERY_LEN} characters")
    if not text.strip():
        raise QueryError("is empty")
    return _parsed(text)


@functools.lru_cache(maxsize=1024)
def _parsed(text: str) -> Query:
    """A query parsed once per text (saved queries are read on every listing, count and
    device page; a parse costs far more than the statement it becomes). Errors are not
    cached: they are raised again."""
    try:
        tree = _PARSER.parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(text, exc) from None
    except LarkError as exc:  # pragma: no cover - lark raises UnexpectedInput for input errors
        raise QueryError(str(exc)) from None
    return Query(text=text, expr=_build(tree.children[0]))


def _build(t: Tree[Any] | Token) -> Expr:
    if isinstance(t, Token):  # pragma: no cover - the grammar wraps every token
        raise QueryError(f"unexpected {str(t)!r}", *_where(t))
    rule = str(t.data)
    if rule in ("and_", "or_"):
        parts: list[Expr] = []
        for child in t.children:
            e = _build(child)
            # flatten a and b and c
            parts.extend(e.parts if isinstance(e, Node) and e.op == rule[:-1] else (e,))
        return Node(rule[:-1], tuple(parts))
    if rule == "not_":
        return Node("not", (_build(t.children[0]),))
    field_tok = _token(t.children[0])
    name = _field(field_tok)
    spec = FIELDS[name]
    line, column = _where(field_tok)
    if rule == "flag":
        if spec.kind != "bool":
            raise QueryError(f"{name} needs a comparison, e.g. {name} = ...", line, column)
        return Leaf(name, "=", (True,), line, column)
    if rule == "compare":
        op_tok, value_tok = t.children[1], t.children[2]
        op = "=" if str(op_tok) == "==" else str(op_tok)
        if op not in spec.ops:
            raise QueryError(f"{name} does not take {op} (it takes "
                             f"{', '.join(sorted(spec.ops))})", *_where(op_tok))
        value = _check(name, spec, op, _token(value_tok))
        return Leaf(name, op, (value,), line, column)
    # in_ / not_in
    if not spec.lists:
        raise QueryError(f"{name} does not take in [...]", line, column)
    list_tree = t.children[-1]
    toks = [c for c in list_tree.children if isinstance(c, Token)]
    if not toks:
        raise QueryError("the list is empty", *_where(list_tree))
    if len(toks) > MAX_LIST:
        raise QueryError(f"at most {MAX_LIST} values in a list", *_where(list_tree))
    values = tuple(dict.fromkeys(_check(name, spec, "=", tok) for tok in toks))
    return Leaf(name, "in" if rule == "in_" else "not_in", values, line, column)


def _token(node: Any) -> Token:
    """A terminal of the parse tree where the grammar puts one (a field name, a value)."""
    assert isinstance(node, Token), node
    return node


def _field(tok: Token) -> str:
    name = str(tok).lower()
    name = ALIASES.get(name, name)
    if name not in FIELDS:
        raise QueryError(f"unknown field {str(tok)!r} (fields: {', '.join(FIELDS)})",
                         *_where(tok))
    return name


def _check(name: str, spec: Field, op: str, tok: Token) -> Any:
    """The value of ``tok`` for ``name``, or a positioned error."""
    value = _value(tok)
    where = _where(tok)
    if value is None:
        if not spec.nullable:
            raise QueryError(f"{name} is never null", *where)
        if op not in EQ:
            raise QueryError("null takes only = or !=", *where)
        return None
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise QueryError(f"{name} is true or false", *where)
        return value
    if isinstance(value, bool):
        raise QueryError(f"{name} is not true or false", *where)
    if kind == "int":
        if not isinstance(value, int) or value > 2**31 - 1:
            raise QueryError(f"{name} is a whole number", *where)
        return value
    if kind == "platform":
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.lower() in PLATFORMS:
            return PLATFORMS[value.lower()]
        raise QueryError(f"unknown platform {value!r} (a platform id or one of "
                         f"{', '.join(PLATFORMS)})", *where)
    if kind == "time":
        if isinstance(value, dt.timedelta):
            if op not in ORDER:
                raise QueryError("compare an age with <, <=, > or >=", *where)
            return value
        if isinstance(value, str):
            try:
                when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                when = None
            if when is not None:
                if op not in ORDER:
                    raise QueryError("compare a time with <, <=, > or >=", *where)
                return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        raise QueryError(f"{name} takes an age like 7d or an ISO 8601 time", *where)
    if isinstance(value, dt.timedelta):
        raise QueryError(f"{name} does not take a duration (quote it: \"{tok}\")", *where)
    text = str(value)
    if not text or len(text) > 254:
        raise QueryError(f"{name} takes 1-254 characters", *where)
    if name == "id":
        text = text.lower()
        if not re.fullmatch(r"[0-9a-f]{1,24}", text):
            raise QueryError("id is hexadecimal (up to 24 digits)", *where)
    if name in ("customer", "owner"):
        text = text.lower()
    return text


# --- compiling ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupRef:
    id: int
    query: Query | None  # None: a static group


@dataclass
class Scope:
    """What a query compiles against: the product, the groups it names, the time.

    ``per_device``: memberships (tags, cohorts, static groups) are tested device by device
    (``EXISTS`` on the membership's primary key, which leads with the device) instead of
    gathering every member first (``IN``): right when a few given devices are tested (a
    page's groups), or when a sort index is walked and a page needs a few probes."""

    product_id: int
    groups: dict[str, GroupRef]
    now: dt.datetime
    per_device: bool = False


async def load_scope(db: AsyncSession, product_id: int, query: Query, *, strict: bool,
                     own_name: str | None = None) -> Scope:
    """The groups ``query`` names (and those their queries name, ``MAX_DEPTH`` deep).
    ``strict``: an unknown group or a cycle is a :class:`QueryError` (saving, previewing);
    otherwise an unknown group matches no device (a saved query whose group went away)."""
    scope = Scope(product_id=product_id, groups={}, now=clock.now())
    wanted = query.groups()
    if own_name is not None and own_name in wanted:
        raise QueryError(f"group {own_name!r} cannot refer to itself")
    for depth in range(MAX_DEPTH + 1):
        wanted -= set(scope.groups)
        if not wanted:
            break
        if depth == MAX_DEPTH:
            raise QueryError(f"dynamic groups refer to each other more than {MAX_DEPTH} deep")
        rows = (await db.execute(select(DeviceGroup.id, DeviceGroup.name, DeviceGroup.query)
                                 .where(DeviceGroup.product_id == product_id,
                                        DeviceGroup.name.in_(sorted(wanted))))).all()
        found = {name: (gid, q) for gid, name, q in rows}
        missing = wanted - set(found)
        if missing and strict:
            raise QueryError(f"no group named {sorted(missing)[0]!r} in this product")
        nxt: set[str] = set()
        for name, (gid, text) in found.items():
            sub = parse(text) if text else None
            scope.groups[name] = GroupRef(int(gid), sub)
            if sub is not None:
                if own_name is not None and own_name in sub.groups():
                    raise QueryError(f"group {name!r} refers back to {own_name!r}")
                nxt |= sub.groups()
        wanted = nxt
    return scope


def compile_query(query: Query, scope: Scope) -> ColumnElement[bool]:
    """A condition on ``Device`` (the caller adds ``product_id``): true exactly for the
    devices matching ``query``, never NULL (so ``not`` is the complement)."""
    return _compile(query.expr, scope, ())


def _compile(e: Expr, scope: Scope, path: tuple[str, ...]) -> ColumnElement[bool]:
    if isinstance(e, Node):
        parts = [_compile(p, scope, path) for p in e.parts]
        if e.op == "and":
            return and_(*parts)
        if e.op == "or":
            return or_(*parts)
        return not_(parts[0])
    if e.op in ("in", "not_in"):
        matched = _matches_any(e, scope, path)
        return matched if e.op == "in" else not_(matched)
    value = e.values[0]
    if e.op == "!=":
        return not_(_leaf(e.field, "=", value, scope, path))
    return _leaf(e.field, e.op, value, scope, path)


def _member(scope: Scope, device_id: Any, where: ColumnElement[bool]) -> ColumnElement[bool]:
    """The device is in the membership ``device_id`` is the device column of (with ``where``
    on it): gathered (``IN``) or probed per device (``EXISTS``), as ``scope`` says."""
    if scope.per_device:
        return select(device_id).where(device_id == Device.id, where).exists()
    return Device.id.in_(select(device_id).where(where))


def _matches_any(e: Leaf, scope: Scope, path: tuple[str, ...]) -> ColumnElement[bool]:
    values = list(e.values)
    if e.field == "tag":
        return _member(scope, DeviceTag.device_id, DeviceTag.tag.in_(values))
    non_null = [v for v in values if v is not None]
    column = _COLUMNS.get(e.field)
    if column is not None and e.field not in ("id",):
        parts: list[ColumnElement[bool]] = []
        if non_null:
            parts.append(column.in_(non_null))
        if len(non_null) < len(values):
            parts.append(column.is_(None))
        return or_(*parts) if len(parts) > 1 else parts[0]
    return or_(*(_leaf(e.field, "=", v, scope, path) for v in values))


_COLUMNS: dict[str, Any] = {
    "firmware": Device.firmware_version, "os": Device.system_firmware_version,
    "platform": Device.platform_id, "serial": Device.serial_number, "name": Device.name,
    "id": Device.id,
}


def _prefix(column: Any, text: str) -> ColumnElement[bool]:
    """An index range that also states the prefix (right under any collation)."""
    return and_(column >= text, column < text + "\U0010ffff",
                column.startswith(text, autoescape=True))


def _leaf(name: str, op: str, value: Any, scope: Scope,
          path: tuple[str, ...]) -> ColumnElement[bool]:
    """``name op value`` for one value, never NULL (op is not ``!=``)."""
    if name in ("online", "development", "quarantined", "cellular"):
        flag: ColumnElement[bool] = getattr(Device, name)  # bare when true: the partial indexes match it
        return flag if value else flag.is_(False)
    if name == "tag":
        return _member(scope, DeviceTag.device_id, DeviceTag.tag == value)
    if name == "cohort":
        cohorts = select(Cohort.id).where(Cohort.product_id == scope.product_id)
        if value is None:
            return not_(_member(scope, CohortMember.device_id,
                                CohortMember.cohort_id.in_(cohorts)))
        return _member(scope, CohortMember.device_id,
                       CohortMember.cohort_id.in_(cohorts.where(Cohort.name == value)))
    if name == "group":
        return _group(value, scope, path)
    if name == "customer":
        if value is None:
            return Device.customer_id.is_(None)
        return Device.customer_id.in_(select(Customer.id).where(
            Customer.product_id == scope.product_id, Customer.email == value))
    if name == "owner":
        if value is None:
            return Device.owner_user_id.is_(None)
        return Device.owner_user_id.in_(select(User.id).where(User.username == value))
    if name == "last_heard":
        col = Device.last_heard
        if value is None:
            return col.is_(None)
        if isinstance(value, dt.timedelta):
            # an age: "< 7d" is heard after now - 7d
            since = scope.now - value
            flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
            return and_(col.is_not(None), _order(col, flipped, since))
        return and_(col.is_not(None), _order(col, op, value))
    col = _COLUMNS[name]
    if value is None:
        return col.is_(None)  # type: ignore[no-any-return]
    if op == "^=":
        return and_(col.is_not(None), _prefix(col, value))
    cond = _order(col, op, value)
    return and_(col.is_not(None), cond) if FIELDS[name].nullable else cond


def _order(col: Any, op: str, value: Any) -> ColumnElement[bool]:
    ops = {"=": col.__eq__, "<": col.__lt__, "<=": col.__le__, ">": col.__gt__,
           ">=": col.__ge__}
    return ops[op](value)  # type: ignore[no-any-return]


def _group(name: str, scope: Scope, path: tuple[str, ...]) -> ColumnElement[bool]:
    ref = scope.groups.get(name)
    if ref is None or name in path:  # gone since the query was saved, or a cycle
        return false()
    if ref.query is None:
        return _member(scope, DeviceGroupMember.device_id, DeviceGroupMember.group_id == ref.id)
    return _compile(ref.query.expr, scope, (*path, name))


# --- what a query implies about last_heard -------------------------------------------------

Span = tuple[dt.datetime | None, dt.datetime | None]  # lowest, highest (None: unbounded)
NO_SPAN: Span = (dt.datetime.max.replace(tzinfo=dt.UTC),
                 dt.datetime.min.replace(tzinfo=dt.UTC))  # no heard device matches
# the bounds are widened by this much: they are computed at another moment than the
# condition's own "now" (an age such as ``last_heard > 30d`` moves with the clock)
SPAN_MARGIN = dt.timedelta(minutes=5)


def heard_span(query: Query, now: dt.datetime) -> Span | None:
    """Where the ``last_heard`` of a device that matches ``query`` and has been heard lies:
    (lowest, highest), either None when unbounded; :data:`NO_SPAN` when no heard device
    can match; None when the query bounds it neither way. Implied by the query, so adding
    it to the query's condition changes nothing but lets the database start a walk of the
    (product, last heard) index at the bound (``last_heard > 30d or last_heard = null``
    matches three devices in four of a fleet, all at the far end of that index)."""
    lo, hi = _span(query.expr, now)
    if (lo, hi) == NO_SPAN:
        return NO_SPAN
    if lo is None and hi is None:
        return None
    return (None if lo is None else lo - SPAN_MARGIN, None if hi is None else hi + SPAN_MARGIN)


def _span(e: Expr, now: dt.datetime) -> Span:
    if isinstance(e, Leaf):
        if e.field != "last_heard" or e.op not in ("=", "<", "<=", ">", ">="):
            return (None, None)  # another field, or a list / != : no bound
        value = e.values[0]
        if value is None:
            return NO_SPAN if e.op == "=" else (None, None)
        op = e.op
        if isinstance(value, dt.timedelta):  # an age: "< 7d" is heard after now - 7d
            value, op = now - value, {"=": "=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
        if not isinstance(value, dt.datetime):
            return (None, None)
        if value.tzinfo is None:  # as the column reads a naive time: UTC
            value = value.replace(tzinfo=dt.UTC)
        return {"=": (value, value), "<": (None, value), "<=": (None, value),
                ">": (value, None), ">=": (value, None)}[op]
    if e.op == "not":
        return (None, None)
    spans = [_span(p, now) for p in e.parts]
    return span_and(spans) if e.op == "and" else span_or(spans)


def span_and(spans: list[Span]) -> Span:
    """Where a value lies that lies in each of ``spans``."""
    if any(s == NO_SPAN for s in spans):
        return NO_SPAN
    los = [s[0] for s in spans if s[0] is not None]
    his = [s[1] for s in spans if s[1] is not None]
    return (max(los) if los else None, min(his) if his else None)


def span_or(spans: list[Span]) -> Span:
    """Where a value lies that lies in any of ``spans`` (their hull)."""
    spans = [s for s in spans if s != NO_SPAN]
    if not spans:
        return NO_SPAN
    los, his = [s[0] for s in spans], [s[1] for s in spans]
    return (None if None in los else min(x for x in los if x is not None),
            None if None in his else max(x for x in his if x is not None))


def explain() -> list[tuple[str, str, str]]:
    """(field, operators, what it is) of every field, for the docs and the console."""
    return [(name, " ".join(sorted(f.ops)) + (" in" if f.lists else ""),
             f.help or f.kind) for name, f in FIELDS.items()]


__all__ = ["FIELDS", "MAX_QUERY_LEN", "Query", "QueryError", "Scope", "compile_query",
           "load_scope", "parse", "true"]
