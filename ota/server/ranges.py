"""HTTP conditional and range requests for artifact downloads (RFC 9110 §13-14). Pure code.

hawkBit serves artifacts with `Accept-Ranges: bytes`, single and multipart ranges, `ETag` = the quoted SHA-1
and `If-Range`; 416 with `Content-Range: bytes */size` when no range can be satisfied. A Range header that
does not parse, or asks for more than MAX_RANGES pieces, is ignored (the whole file is sent), as the RFC
allows; overlapping or adjacent pieces are merged, which the RFC recommends against range abuse.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from enum import StrEnum

MAX_RANGES = 16
_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


class Kind(StrEnum):
    FULL = "full"  # 200, the whole file
    PARTIAL = "partial"  # 206, `ranges`
    UNSATISFIABLE = "unsatisfiable"  # 416


@dataclass(frozen=True)
class Plan:
    kind: Kind
    ranges: tuple[tuple[int, int], ...] = ()  # (first, last) inclusive, in ascending order


def parse_range(header: str | None, size: int) -> Plan:
    if header is None:
        return Plan(Kind.FULL)
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return Plan(Kind.FULL)
    parts = specs.split(",")
    if len(parts) > MAX_RANGES:
        return Plan(Kind.FULL)
    wanted: list[tuple[int, int]] = []
    for part in parts:
        m = _SPEC.fullmatch(part)
        if m is None or (not m[1] and not m[2]):
            return Plan(Kind.FULL)
        if m[1]:
            first = int(m[1])
            last = min(int(m[2]), size - 1) if m[2] else size - 1
            if m[2] and int(m[2]) < first:
                return Plan(Kind.FULL)  # "bytes=5-2" is invalid: the whole header is ignored
            if first >= size:
                continue  # unsatisfiable on its own; others may still be
        else:
            suffix = int(m[2])
            if suffix == 0:
                continue
            first, last = max(0, size - suffix), size - 1
        wanted.append((first, last))
    if not wanted:
        return Plan(Kind.UNSATISFIABLE)
    return Plan(Kind.PARTIAL, tuple(_merge(wanted)))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def none_match(header: str | None, etag: str) -> bool:
    """If-None-Match matches (weak comparison): a GET or HEAD answers 304 Not Modified."""
    if header is None:
        return False
    tags = _tags(header)
    return "*" in tags or any(_opaque(t) == etag for t in tags)


def if_range_holds(header: str | None, etag: str, last_modified: float) -> bool:
    """Whether a Range may be honoured under If-Range: a strong ETag equal to ours, or our exact
    Last-Modified date; anything else means the client's copy is another version: send the whole file."""
    if header is None:
        return True
    value = header.strip()
    if value.startswith('"'):
        return value == etag
    if value.startswith("W/"):
        return False  # a weak tag never validates a range
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return int(when.timestamp()) == int(last_modified)


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)
