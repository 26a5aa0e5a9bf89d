"""The bundle's fixed header and the hard caps on every length read from a bundle. Pure code, no I/O.

File layout: header (64 bytes) | manifest (JSON) | signature block (JSON, may be empty) | payload area.
The payload area holds, per payload and in manifest order: chunk index (.caibx), compressed-size table
(one u32 per chunk), then the zstd-compressed chunks back to back. No gaps, no padding: every byte of
the file is covered by the header checks, the signature or a hash in the signed manifest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pitstop.ota.errors import BundleError, BundleLimitError

MAGIC = b"PITSTOP\x1a"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sII4Q16s")

CHUNK_MIN_DEFAULT = 16 * 1024
CHUNK_AVG_DEFAULT = 64 * 1024
CHUNK_MAX_DEFAULT = 256 * 1024
# Bundles with a rootfs payload (a file system image): smaller chunks lose less around the places where the
# image's layout moved between two builds, so a delta install downloads about a third of what casync's
# default costs (docs/delta.md, "Chunking for file system images", benchmarks/delta.py).
FS_IMAGE_CHUNKING = (4 * 1024, 16 * 1024, 64 * 1024)


@dataclass(frozen=True)
class Limits:
    """Hard caps, enforced while reading; a bundle exceeding one is refused with BundleLimitError."""

    max_manifest: int = 1 << 20
    max_signature_block: int = 64 * 1024
    max_payloads: int = 64
    max_payload_size: int = 1 << 40
    max_chunk_size: int = 4 << 20
    max_chunks: int = 1 << 24
    max_certificates: int = 8
    max_files_entries: int = 1_000_000
    max_files_entry_size: int = 1 << 36

    def max_compressed_chunk(self, chunk_size: int) -> int:
        # zstd's worst-case bound (ZSTD_compressBound) plus frame overhead.
        return chunk_size + (chunk_size >> 8) + 1024


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Header:
    manifest_size: int
    signature_size: int
    payload_area_size: int

    @property
    def manifest_offset(self) -> int:
        return HEADER_SIZE

    @property
    def signature_offset(self) -> int:
        return HEADER_SIZE + self.manifest_size

    @property
    def payload_offset(self) -> int:
        return HEADER_SIZE + self.manifest_size + self.signature_size

    @property
    def total_size(self) -> int:
        return self.payload_offset + self.payload_area_size


def encode_header(h: Header) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, h.manifest_size, h.signature_size,
                        h.payload_area_size, 0, b"\0" * 16)


def decode_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Header:
    if len(data) < HEADER_SIZE:
        raise BundleError(f"not a pitstop bundle: file is shorter than the {HEADER_SIZE}-byte header")
    magic, version, hsize, msize, ssize, psize, reserved, pad = _HEADER.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise BundleError("not a pitstop bundle: bad magic")
    if version != FORMAT_VERSION:
        raise BundleError(f"unsupported bundle format version {version} (this pitstop reads {FORMAT_VERSION})")
    if hsize != HEADER_SIZE or reserved != 0 or pad != b"\0" * 16:
        raise BundleError("bundle header is corrupt (reserved fields are not zero)")
    if msize == 0:
        raise BundleError("bundle header is corrupt: empty manifest")
    if msize > limits.max_manifest:
        raise BundleLimitError(f"manifest size {msize} exceeds the cap of {limits.max_manifest} bytes")
    if ssize > limits.max_signature_block:
        raise BundleLimitError(f"signature block size {ssize} exceeds the cap of {limits.max_signature_block} bytes")
    if psize > limits.max_payloads * (limits.max_payload_size * 2):
        raise BundleLimitError(f"payload area size {psize} exceeds the cap")
    return Header(msize, ssize, psize)
