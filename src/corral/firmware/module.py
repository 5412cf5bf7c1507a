"""Particle firmware module headers: read them from a binary, and build synthetic modules.

Layout (Device OS ``module_info_t`` and ``module_info_suffix_t``, all integers little-endian
except the CRC):

* **prefix**, 24 bytes, at offset 0 (or after the MCU's vector table: 0x200 on Gen 3,
  0x184 on Gen 2): start address u32, end address u32, reserved u8, flags u8, module
  version u16, platform ID u16, module function u8, module index u8, then two dependencies
  of (function u8, index u8, version u16). ``end - start + 4`` is the file size.
* **suffix**, just before the CRC, read backwards: suffix size u16 (the last two bytes
  before the CRC), a 32-byte SHA-256, reserved u16, then product version u16 and product ID
  u16 when the suffix size is at least 40. ``0xffff`` in either means "not product firmware";
  so does a product ID equal to the module's platform ID: since Device OS 4.0 there is no
  ``PRODUCT_ID`` macro and the build writes the platform ID there (with ``PRODUCT_VERSION``).
* **CRC-32** (zlib polynomial) of everything before it, the last 4 bytes, big-endian.

A binary that does not look like a module is not an error here: MQTT devices run any
firmware, so :func:`parse_module` returns ``None`` and the caller treats the bytes as opaque.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

PREFIX_SIZE = 24
MIN_SUFFIX_SIZE = 36  # size u16 + sha 32 + reserved u16
PRODUCT_SUFFIX_SIZE = MIN_SUFFIX_SIZE + 4  # + product version u16 + product ID u16
CRC_SIZE = 4
NOT_SET = 0xFFFF
# where the prefix may sit: right at the start, or after a Gen 3 / Gen 2 vector table
PREFIX_OFFSETS = (0, 0x200, 0x184)
KNOWN_FLAGS = 0x1F  # drop-module-info, compressed, combined, encrypted, prefix extensions

FUNCTION_NAMES = {
    0: "none", 1: "resource", 2: "bootloader", 3: "monolithic firmware", 4: "system part",
    5: "user part", 6: "settings", 7: "NCP firmware", 8: "radio stack", 9: "asset",
}
APPLICATION_FUNCTIONS = frozenset({3, 5})  # what product firmware may be

_PREFIX = struct.Struct("<IIBBHHBBBBHBBH")
assert _PREFIX.size == PREFIX_SIZE


@dataclass(frozen=True)
class ModuleInfo:
    """What a Particle module header says about a binary."""

    prefix_offset: int
    start_address: int
    end_address: int
    flags: int
    module_version: int
    platform_id: int
    function: int
    index: int
    dependencies: tuple[tuple[int, int, int], ...]  # (function, index, version), set ones only
    crc_ok: bool
    suffix_size: int
    product_id: int | None  # None: the module carries no product ID
    product_version: int | None  # None: no PRODUCT_VERSION

    @property
    def function_name(self) -> str:
        return FUNCTION_NAMES.get(self.function, f"function {self.function}")

    @property
    def is_application(self) -> bool:
        return self.function in APPLICATION_FUNCTIONS

    def json(self) -> dict[str, object]:
        return {
            "platform_id": self.platform_id, "module_function": self.function_name,
            "module_index": self.index, "module_version": self.module_version,
            "product_id": self.product_id, "product_version": self.product_version,
            "crc_ok": self.crc_ok,
            "dependencies": [{"function": FUNCTION_NAMES.get(f, str(f)), "index": i,
                              "version": v} for f, i, v in self.dependencies],
        }


def _prefix_at(data: bytes, offset: int) -> tuple[int, ...] | None:
    """The prefix fields at ``offset`` if they describe a plausible module of exactly
    this file's size; otherwise None."""
    if len(data) < offset + PREFIX_SIZE + MIN_SUFFIX_SIZE + CRC_SIZE:
        return None
    fields = _PREFIX.unpack_from(data, offset)
    start, end, _reserved, flags, _version, _platform, function, _index = fields[:8]
    dep1 = fields[8:11]
    dep2 = fields[11:14]
    if end <= start or end - start + CRC_SIZE != len(data):
        return None
    if function not in FUNCTION_NAMES or function == 0 or flags & ~KNOWN_FLAGS:
        return None
    for dep_function, dep_index, dep_version in (dep1, dep2):
        if dep_function not in FUNCTION_NAMES:
            return None
        if dep_function == 0 and (dep_index or dep_version):
            return None
    return fields


def parse_module(data: bytes) -> ModuleInfo | None:
    """The module header of ``data``, or None when it is not a Particle module."""
    for offset in PREFIX_OFFSETS:
        fields = _prefix_at(data, offset)
        if fields is not None:
            break
    else:
        return None
    start, end, _reserved, flags, version, platform, function, index = fields[:8]
    deps = tuple((f, i, v) for f, i, v in (fields[8:11], fields[11:14]) if f)
    body = data[:-CRC_SIZE]
    stored_crc = int.from_bytes(data[-CRC_SIZE:], "big")
    crc_ok = zlib.crc32(body) == stored_crc
    suffix_size = int.from_bytes(body[-2:], "little")
    product_id = product_version = None
    if PRODUCT_SUFFIX_SIZE <= suffix_size <= len(body) - PREFIX_SIZE:
        # below the size u16 (2), the SHA-256 (32) and reserved u16 (2): version, then ID
        product_version = int.from_bytes(body[-38:-36], "little")
        product_id = int.from_bytes(body[-40:-38], "little")
        product_version = None if product_version == NOT_SET else product_version
        product_id = None if product_id in (NOT_SET, platform) else product_id
    return ModuleInfo(prefix_offset=offset, start_address=start, end_address=end,
                      flags=flags, module_version=version, platform_id=platform,
                      function=function, index=index, dependencies=deps, crc_ok=crc_ok,
                      suffix_size=suffix_size, product_id=product_id,
                      product_version=product_version)


def build_module(payload: bytes = b"", *, platform_id: int, product_id: int | None = None,
                 product_version: int | None = None, function: int = 5, index: int = 1,
                 module_version: int = 6, start_address: int = 0x000D4000,
                 dependency: tuple[int, int, int] = (4, 1, 6300),
                 corrupt_crc: bool = False) -> bytes:
    """A synthetic module with the layout :func:`parse_module` reads (tests, simulators).

    ``product_id``/``product_version`` None are written as ``0xffff`` (not product firmware).
    Device OS 4+ builds write the platform ID as the product ID (pass ``product_id=
    platform_id``), which :func:`parse_module` reads as "no product ID".
    """
    suffix_tail = struct.pack("<HHH", NOT_SET if product_id is None else product_id,
                              NOT_SET if product_version is None else product_version, 0)
    size = PREFIX_SIZE + len(payload) + len(suffix_tail) + 32 + 2
    end = start_address + size
    dep_function, dep_index, dep_version = dependency
    prefix = _PREFIX.pack(start_address, end, 0, 0, module_version, platform_id, function,
                          index, dep_function, dep_index, dep_version, 0, 0, 0)
    sha = hashlib.sha256(prefix + payload).digest()
    body = prefix + payload + suffix_tail + sha + struct.pack("<H", PRODUCT_SUFFIX_SIZE)
    crc = zlib.crc32(body) ^ (0xFFFFFFFF if corrupt_crc else 0)
    return body + crc.to_bytes(4, "big")
