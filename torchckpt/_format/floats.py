"""How the typed JSON tree stores a float JSON has no number for: ``inf``, ``-inf`` and NaN.

A NaN has a sign and a payload that ``torch.save`` keeps and arithmetic on x86 sets (``inf - inf``
is negative there, so most NaN losses are): a resumed run gets the float it saved, bit for bit.
The canonical NaN keeps the short form ``"nan"`` that readers have always parsed.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any

_CANONICAL_NAN = struct.pack("<d", math.nan)
_NAN_BITS = re.compile(r"nan:[0-9a-f]{16}")


def nonfinite_text(value: float) -> str:
    """``"inf"``, ``"-inf"`` or ``"nan"``; a NaN of any other bits (its sign: x86's ``inf - inf``
    is negative; a payload) as ``"nan:"`` and its 16 hex digits, big-endian, so that it comes back
    bit for bit, as ``torch.save`` keeps it."""
    bits = struct.pack("<d", value)
    if value == value or bits == _CANONICAL_NAN:
        return repr(value)
    return f"nan:{bits[::-1].hex()}"


def nonfinite_value(text: Any) -> float | None:
    """The float :func:`nonfinite_text` wrote, or None for anything else."""
    if text in ("inf", "-inf", "nan"):
        return float(text)
    if type(text) is not str or not _NAN_BITS.fullmatch(text):
        return None
    value: float = struct.unpack(">d", bytes.fromhex(text[4:]))[0]
    return value if value != value else None  # the bits of a NaN, and only those
