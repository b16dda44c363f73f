"""How many bytes a cached record holds, for the byte bounds of the caches (pure).

An estimate that follows the memory a record really keeps alive: the object itself
plus each of its strings at their in-memory size (`sys.getsizeof` counts a
non-ASCII text at 2 or 4 bytes per character, as CPython stores it). Other
fields are small and fixed, so the object's own size covers them.
"""

from __future__ import annotations

import sys

import msgspec


def record_bytes(record: msgspec.Struct) -> int:
    total = sys.getsizeof(record)
    for name in record.__struct_fields__:
        value = getattr(record, name)
        if isinstance(value, str):
            total += sys.getsizeof(value)
    return total
