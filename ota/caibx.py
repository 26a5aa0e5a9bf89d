"""casync's blob index (.caibx): encoding and strict decoding. Pure code, no I/O.

Layout (little-endian): a 48-byte index header, a 16-byte table header, 40-byte items
(end offset of the chunk in the blob, 32-byte chunk id), and a 40-byte tail.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pitstop.ota.errors import BundleError, BundleLimitError

CA_FORMAT_INDEX = 0x96824D9C7B129FF9
CA_FORMAT_TABLE = 0xE75B9E112F17417D
CA_FORMAT_TABLE_TAIL_MARKER = 0x4B4F050E5549ECD1
CA_FORMAT_SHA512_256 = 0x2000000000000000
TABLE_SIZE_UNKNOWN = 0xFFFFFFFFFFFFFFFF

HEADER_SIZE = 48
TABLE_HEADER_SIZE = 16
ITEM_SIZE = 40
TAIL_SIZE = 40
ID_SIZE = 32

_HEADER = struct.Struct("<6Q")
_TABLE_HEADER = struct.Struct("<2Q")
_ITEM = struct.Struct("<Q32s")
_TAIL = struct.Struct("<5Q")


@dataclass(frozen=True)
class ChunkIndex:
    """Chunk ids are SHA-256 of the uncompressed chunk unless `feature_flags` has CA_FORMAT_SHA512_256.
    Other feature bits describe casync archives, not blobs, and are carried but ignored."""

    chunk_min: int
    chunk_avg: int
    chunk_max: int
    ends: tuple[int, ...]
    ids: tuple[bytes, ...]
    feature_flags: int = 0

    @property
    def size(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __len__(self) -> int:
        return len(self.ends)

    def chunk_span(self, i: int) -> tuple[int, int]:
        start = self.ends[i - 1] if i else 0
        return start, self.ends[i] - start


def encoded_size(n_chunks: int) -> int:
    return HEADER_SIZE + TABLE_HEADER_SIZE + ITEM_SIZE * n_chunks + TAIL_SIZE


def encode(index: ChunkIndex) -> bytes:
    parts = [
        _HEADER.pack(HEADER_SIZE, CA_FORMAT_INDEX, index.feature_flags, index.chunk_min, index.chunk_avg,
                     index.chunk_max),
        _TABLE_HEADER.pack(TABLE_SIZE_UNKNOWN, CA_FORMAT_TABLE),
    ]
    parts.extend(_ITEM.pack(end, cid) for end, cid in zip(index.ends, index.ids, strict=True))
    table_size = TABLE_HEADER_SIZE + ITEM_SIZE * len(index.ends) + TAIL_SIZE
    parts.append(_TAIL.pack(0, 0, HEADER_SIZE, table_size, CA_FORMAT_TABLE_TAIL_MARKER))
    return b"".join(parts)


def decode(data: bytes, *, max_chunks: int, max_chunk_size: int) -> ChunkIndex:
    """Parse and validate an index; raise BundleError on any inconsistency."""
    if len(data) < encoded_size(0):
        raise BundleError("chunk index too short")
    body = len(data) - HEADER_SIZE - TABLE_HEADER_SIZE - TAIL_SIZE
    if body % ITEM_SIZE:
        raise BundleError("chunk index size is not a whole number of items")
    n = body // ITEM_SIZE
    if n > max_chunks:
        raise BundleLimitError(f"chunk index has {n} chunks, more than the cap of {max_chunks}")
    size, typ, flags, cmin, cavg, cmax = _HEADER.unpack_from(data, 0)
    if size != HEADER_SIZE or typ != CA_FORMAT_INDEX:
        raise BundleError("chunk index header is not a casync index header")
    # Only the digest bit matters for a blob index; casync also sets archive-related bits
    # (EXCLUDE_NODUMP, EXCLUDE_FILE, ...) on every index it makes, which do not affect blobs.
    if not 1 <= cmin <= cavg <= cmax <= max_chunk_size:
        raise BundleError(f"chunk index has invalid chunk sizes {cmin}/{cavg}/{cmax}")
    tsize, ttype = _TABLE_HEADER.unpack_from(data, HEADER_SIZE)
    if tsize != TABLE_SIZE_UNKNOWN or ttype != CA_FORMAT_TABLE:
        raise BundleError("chunk index table header is invalid")
    ends: list[int] = []
    ids: list[bytes] = []
    prev = 0
    off = HEADER_SIZE + TABLE_HEADER_SIZE
    for i in range(n):
        end, cid = _ITEM.unpack_from(data, off)
        off += ITEM_SIZE
        length = end - prev
        # Every chunk but the last is at least cmin; none exceeds cmax.
        if length <= 0 or length > cmax or (length < cmin and i != n - 1):
            raise BundleError(f"chunk {i} in the index has an invalid length {length}")
        ends.append(end)
        ids.append(cid)
        prev = end
    z1, z2, ioff, tsz, marker = _TAIL.unpack_from(data, off)
    if (z1, z2, ioff, marker) != (0, 0, HEADER_SIZE, CA_FORMAT_TABLE_TAIL_MARKER) or tsz != (
        TABLE_HEADER_SIZE + ITEM_SIZE * n + TAIL_SIZE
    ):
        raise BundleError("chunk index tail is invalid")
    return ChunkIndex(cmin, cavg, cmax, tuple(ends), tuple(ids), flags)
