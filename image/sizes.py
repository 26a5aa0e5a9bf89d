"""Byte sizes as recipes write them: a whole number of bytes, or a number with a binary unit ("64MiB")."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# Units are binary whatever their spelling ("M" = "MiB"), as in mkosi and systemd-repart: partition sizes are
# counted in MiB, and a decimal megabyte would break the 1 MiB alignment.
_UNITS = {"": 1, "B": 1, "K": KiB, "KiB": KiB, "M": MiB, "MiB": MiB, "G": GiB, "GiB": GiB, "T": TiB, "TiB": TiB}
_SIZE_RE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*([A-Za-z]*)\s*")
UNIT_NAMES = "B, K/KiB, M/MiB, G/GiB, T/TiB"


def parse_size(text: str) -> int:
    """Parse a size: "64MiB" → 67108864, "1.5G" → 1610612736. ValueError for anything else (negative, unknown unit, a
    fraction of a byte)."""
    m = _SIZE_RE.fullmatch(text)
    if m is None or m[3] not in _UNITS:
        raise ValueError(f"{text!r} is not a size (a whole number with an optional unit: {UNIT_NAMES})")
    whole: str = m[1]
    frac: str = m[2] or ""
    num = int(whole + frac) * _UNITS[m[3]]
    den: int = 10 ** len(frac)
    if num % den:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return num // den


def format_size(n: int) -> str:
    """The shortest exact spelling: 67108864 → "64MiB", 1610612736 → "1536MiB", 1000 → "1000"."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def align_up(n: int, to: int) -> int:
    return -(-n // to) * to
