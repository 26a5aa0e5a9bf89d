"""Content-defined chunking, per-chunk zstd compression and per-chunk verification.

The CPU-bound functions here release the GIL inside zstd and hashlib, so callers run them on a
thread pool. Chunk ids are SHA-256 of the uncompressed chunk (casync's `--digest=sha256`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import BinaryIO

import pyfastcdc
import zstandard

from pitstop.ota.errors import PayloadError

DEFAULT_ZSTD_LEVEL = 3
_local = threading.local()


def chunk_id(data: bytes | memoryview, digest: str = "sha256") -> bytes:
    if digest == "sha256":
        return hashlib.sha256(data).digest()
    return hashlib.new("sha512_256", data).digest()


def iter_chunks(stream: BinaryIO, cmin: int, cavg: int, cmax: int) -> Iterator[bytes]:
    """Cut `stream` at content-defined boundaries (FastCDC 2020, normalization level 1)."""
    # pyfastcdc's average is avg_size + min_size (cut-point skipping); ask for the difference so
    # the realised average is what the caller configured.
    cdc = pyfastcdc.FastCDC(max(cavg - cmin, cmin), min_size=cmin, max_size=cmax, normalized_chunking=1)
    for chunk in cdc.cut_stream(stream):
        yield bytes(chunk.data)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        setattr(_local, key, c)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _local.d = d
    return d


def compress_chunk(data: bytes, level: int = DEFAULT_ZSTD_LEVEL, digest: str = "sha256") -> tuple[bytes, bytes]:
    """Return (chunk id, zstd frame)."""
    return chunk_id(data, digest), _compressor(level).compress(data)


def decompress_chunk(frame: bytes, expected_len: int, expected_id: bytes, digest: str = "sha256") -> bytes:
    """Decompress one chunk and check its length and id; raise PayloadError otherwise.

    The frame's declared size is checked before anything is allocated, so a hostile frame cannot
    make us allocate more than the index says the chunk holds.
    """
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise PayloadError("chunk is not a valid zstd frame") from None
    if declared != expected_len:
        raise PayloadError(f"chunk declares {declared} bytes, the index says {expected_len}")
    try:
        data: bytes = _decompressor().decompress(frame, max_output_size=expected_len)
    except zstandard.ZstdError as e:
        raise PayloadError(f"chunk does not decompress: {e}") from None
    if len(data) != expected_len:
        raise PayloadError(f"chunk decompressed to {len(data)} bytes, expected {expected_len}")
    if chunk_id(data, digest) != expected_id:
        raise PayloadError("chunk content does not match its id in the index")
    return data
