"""The casync blob index codec: round trips, casync's constants, and strict refusal of bad input."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pitstop.ota import caibx
from pitstop.ota.errors import BundleError, BundleLimitError

MAXC = 256 * 1024


def _index(lengths: list[int]) -> caibx.ChunkIndex:
    ends, ids, pos = [], [], 0
    for n in lengths:
        pos += n
        ends.append(pos)
        ids.append(hashlib.sha256(str(pos).encode()).digest())
    return caibx.ChunkIndex(16384, 65536, MAXC, tuple(ends), tuple(ids))


def test_layout_matches_casync() -> None:
    data = caibx.encode(_index([20000, 70000, 100]))
    assert len(data) == 48 + 16 + 3 * 40 + 40
    size, typ, flags, cmin, cavg, cmax = struct.unpack_from("<6Q", data)
    assert (size, typ, flags, cmin, cavg, cmax) == (48, 0x96824D9C7B129FF9, 0, 16384, 65536, MAXC)
    assert struct.unpack_from("<2Q", data, 48) == (0xFFFFFFFFFFFFFFFF, 0xE75B9E112F17417D)
    end0, = struct.unpack_from("<Q", data, 64)
    assert end0 == 20000
    assert struct.unpack_from("<5Q", data, len(data) - 40) == (0, 0, 48, 16 + 3 * 40 + 40, 0x4B4F050E5549ECD1)


@given(st.lists(st.integers(16384, MAXC), max_size=20), st.integers(1, 16383))
def test_roundtrip(lengths: list[int], last: int) -> None:
    idx = _index([*lengths, last])
    back = caibx.decode(caibx.encode(idx), max_chunks=100, max_chunk_size=MAXC)
    assert back == idx
    assert back.size == sum(lengths) + last
    assert back.chunk_span(len(lengths)) == (sum(lengths), last)


def test_empty_index() -> None:
    idx = caibx.ChunkIndex(16384, 65536, MAXC, (), ())
    assert caibx.decode(caibx.encode(idx), max_chunks=1, max_chunk_size=MAXC).size == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "whole number"),
        (lambda b: b[:50], "too short"),
        (lambda b: b[:8] + struct.pack("<Q", 1) + b[16:], "not a casync index"),
        (lambda b: b[:24] + struct.pack("<Q", 0) + b[32:], "chunk sizes"),
        (lambda b: b[:40] + struct.pack("<Q", 1 << 40) + b[48:], "chunk sizes"),
        (lambda b: b[:48] + struct.pack("<Q", 5) + b[56:], "table header"),
        (lambda b: b[:64] + struct.pack("<Q", 0) + b[72:], "invalid length"),
        (lambda b: b[:104] + struct.pack("<Q", 10) + b[112:], "invalid length"),
        (lambda b: b[:104] + struct.pack("<Q", 20000 + MAXC + 1) + b[112:], "invalid length"),
        (lambda b: b[:-8] + struct.pack("<Q", 7), "tail"),
        (lambda b: b[:-16] + struct.pack("<Q", 99) + b[-8:], "tail"),
    ],
)
def test_refuses_corruption(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    good = caibx.encode(_index([20000, 70000, 100]))
    with pytest.raises(BundleError, match=message):
        caibx.decode(mutate(good), max_chunks=100, max_chunk_size=MAXC)


def test_chunk_count_cap() -> None:
    data = caibx.encode(_index([20000] * 10))
    with pytest.raises(BundleLimitError):
        caibx.decode(data, max_chunks=9, max_chunk_size=MAXC)


def test_casync_archive_flags_are_ignored() -> None:
    # casync sets EXCLUDE_NODUMP | EXCLUDE_FILE (and SHA512_256 by default) on the blob indexes it makes.
    data = bytearray(caibx.encode(_index([20000, 100])))
    struct.pack_into("<Q", data, 16, 0xB000000000000000)
    idx = caibx.decode(bytes(data), max_chunks=10, max_chunk_size=MAXC)
    assert idx.feature_flags & caibx.CA_FORMAT_SHA512_256
