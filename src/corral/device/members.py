"""What a device declares and sends, checked by the SDK as corral's contract does
(``docs/mqtt.md``): event names, function and variable names, variable types and values."""

from __future__ import annotations

import math
import re
from typing import Any, Final, Literal, TypeAlias

VariableType: TypeAlias = Literal["bool", "int32", "double", "string"]

EVENT_NAME_RE: Final = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable ASCII, no spaces
MAX_MEMBERS: Final = 20  # functions, and variables, a device may describe
INT32: Final = (-(2**31), 2**31 - 1)
VARIABLE_TYPES: Final[dict[object, VariableType]] = {
    "bool": "bool", "boolean": "bool", bool: "bool",
    "int32": "int32", "int": "int32", "integer": "int32", int: "int32",
    "double": "double", "float": "double", "number": "double", float: "double",
    "string": "string", "str": "string", str: "string",
}


def check_member(name: str, what: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise ValueError(f"{what} names are 1 to 64 printable characters, not {name!r}")
    return name


def check_event_name(name: str) -> str:
    """The contract's rule for event names (``ValueError`` otherwise). ``+`` and ``#`` are
    also refused: MQTT topic names cannot carry them."""
    if not isinstance(name, str) or EVENT_NAME_RE.fullmatch(name) is None:
        raise ValueError("event names are 1 to 64 printable ASCII characters without spaces, "
                         f"not {name!r}")
    if "+" in name or "#" in name:
        raise ValueError(f"event names cannot contain + or # over MQTT: {name!r}")
    if name.lower().startswith(("spark", "particle")):
        raise ValueError(f"event names starting with spark or particle are reserved: {name!r}")
    return name


def variable_value(value: Any, vtype: VariableType) -> bool | int | float | str:
    """``value`` as JSON of the declared type; ``ValueError`` when it is not one."""
    if vtype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif vtype == "int32":
        if isinstance(value, int) and INT32[0] <= int(value) <= INT32[1]:
            return int(value)
        if isinstance(value, float) and value.is_integer() and INT32[0] <= value <= INT32[1]:
            return int(value)
    elif vtype == "double":
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(float(value)):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ValueError(f"the getter returned {value!r}, which is not a {vtype}")
