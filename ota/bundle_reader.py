"""Reading a bundle in one pass: header, manifest and signature first, then verified payload chunks.

`open_verified` checks everything a device must check before reading a single payload byte
(signature, chain, clock policy, compatible, security_version). `PayloadStream` then yields each
payload's chunks in order, each verified against its id before it is handed out; the payload's
length, SHA-256 and the hash of its compressed data are checked when the last chunk has been read.
"""

from __future__ import annotations

import collections
import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Protocol

from cryptography import x509

from pitstop.ota import bundle_format as fmt
from pitstop.ota import caibx, manifest
from pitstop.ota.chunks import decompress_chunk
from pitstop.ota.clock import Clock
from pitstop.ota.errors import (
    BundleError,
    BundleLimitError,
    CompatibilityError,
    DowngradeError,
    PayloadError,
)
from pitstop.ota.manifest import Manifest, Payload
from pitstop.ota.trust import (
    SignatureBlock,
    SignerInfo,
    check_times,
    decode_signature_block,
    signer_info,
    verify_chain,
    verify_raw_signature,
)

_SKIP = 8 << 20


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def read_exact(f: Reader, n: int, what: str) -> bytes:
    """Read exactly n bytes or raise BundleError naming what was being read."""
    parts = []
    remaining = n
    while remaining:
        b = f.read(remaining)
        if not b:
            raise BundleError(f"bundle is truncated: {what} ends early")
        parts.append(b)
        remaining -= len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


@dataclass(frozen=True)
class RawPreamble:
    """Everything before the payload area, as bytes: nothing parsed beyond the header."""

    header: fmt.Header
    manifest_bytes: bytes
    signature_bytes: bytes

    def signature_block(self, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> SignatureBlock:
        return decode_signature_block(self.signature_bytes, limits)

    def parse(self, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> Preamble:
        m = manifest.parse(self.manifest_bytes, limits)
        if m.payload_area_size != self.header.payload_area_size:
            raise BundleError("bundle header and manifest disagree on the payload area size")
        return Preamble(self.header, self.manifest_bytes, self.signature_bytes, m)


@dataclass(frozen=True)
class Preamble(RawPreamble):
    """Everything before the payload area, parsed but not yet trusted."""

    manifest: Manifest


def read_raw_preamble(f: BinaryIO, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> RawPreamble:
    header = fmt.decode_header(read_exact(f, fmt.HEADER_SIZE, "header"), limits)
    mbytes = read_exact(f, header.manifest_size, "manifest")
    sbytes = read_exact(f, header.signature_size, "signature block")
    return RawPreamble(header, mbytes, sbytes)


def read_preamble(f: BinaryIO, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> Preamble:
    return read_raw_preamble(f, limits).parse(limits)


def check_policy(m: Manifest, *, compatible: str | None, min_security_version: int | None) -> None:
    """Pure update policy: the device's compatible string and its anti-rollback floor."""
    if compatible is not None and m.compatible != compatible:
        raise CompatibilityError(f"bundle is for {m.compatible!r}, this device is {compatible!r}")
    if min_security_version is not None and m.security_version < min_security_version:
        raise DowngradeError(
            f"bundle security_version {m.security_version} is below the minimum {min_security_version} "
            "(downgrade refused)"
        )


@dataclass(frozen=True)
class Policy:
    keyring: Sequence[x509.Certificate]
    clock: Clock
    compatible: str | None = None
    min_security_version: int | None = None


@dataclass(frozen=True)
class VerifiedPreamble:
    preamble: Preamble
    signer: SignerInfo

    @property
    def manifest(self) -> Manifest:
        return self.preamble.manifest


def open_verified(f: BinaryIO, policy: Policy, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> VerifiedPreamble:
    """Read and verify everything before the payloads; `f` is left at the start of the payload area."""
    return verify_preamble(read_raw_preamble(f, limits), policy, limits)


def verify_preamble(raw: RawPreamble, policy: Policy, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> VerifiedPreamble:
    block = raw.signature_block(limits)
    # Signature and chain are checked before the manifest is parsed: nothing is interpreted unless a
    # key the keyring vouches for signed it. Times need the manifest's signed creation time, so last.
    verify_raw_signature(block.algorithm, block.certificates[0], block.signature, raw.manifest_bytes)
    path = verify_chain(block, policy.keyring)
    pre = raw.parse(limits)
    signed_at: datetime = pre.manifest.created
    check_times(path, signed_at=signed_at, clock=policy.clock)
    signer = signer_info(block)
    check_policy(pre.manifest, compatible=policy.compatible, min_security_version=policy.min_security_version)
    return VerifiedPreamble(pre, signer)


def skip(f: BinaryIO, n: int) -> None:
    if n == 0:
        return
    if f.seekable():
        pos = f.tell()
        end = f.seek(0, os.SEEK_END)
        if end < pos + n:
            raise BundleError("bundle is truncated: payload area ends early")
        f.seek(pos + n)
        return
    while n:
        b = f.read(min(n, _SKIP))
        if not b:
            raise BundleError("bundle is truncated: payload area ends early")
        n -= len(b)


def expect_eof(f: BinaryIO) -> None:
    if f.read(1):
        raise BundleError("bundle has trailing bytes after its payload area")


@dataclass(frozen=True)
class PayloadLayout:
    """A payload's verified chunk index and compressed-size table."""

    index: caibx.ChunkIndex
    index_bytes: bytes
    sizes: tuple[int, ...]


def read_layout(f: BinaryIO, p: Payload, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> PayloadLayout:
    """Read and check a payload's index and table; `f` must be at the payload's region start."""
    index_bytes = read_exact(f, p.index.size, f"chunk index of {p.name!r}")
    if hashlib.sha256(index_bytes).hexdigest() != p.index.sha256:
        raise PayloadError(f"chunk index of payload {p.name!r} does not match the signed manifest")
    idx = caibx.decode(index_bytes, max_chunks=limits.max_chunks, max_chunk_size=limits.max_chunk_size)
    sha512 = bool(idx.feature_flags & caibx.CA_FORMAT_SHA512_256)
    if len(idx) != p.chunks or idx.size != p.size or sha512 != (p.chunk_digest == "sha512-256") or (
        (idx.chunk_min, idx.chunk_avg, idx.chunk_max) != p.chunking
    ):
        raise PayloadError(f"chunk index of payload {p.name!r} disagrees with the manifest")
    table = read_exact(f, p.table.size, f"chunk table of {p.name!r}")
    if hashlib.sha256(table).hexdigest() != p.table.sha256:
        raise PayloadError(f"chunk table of payload {p.name!r} does not match the signed manifest")
    sizes = struct.unpack(f"<{p.chunks}I", table)
    cap = limits.max_compressed_chunk(p.chunking[2])
    if any(s == 0 or s > cap for s in sizes):
        raise BundleLimitError(f"payload {p.name!r} has a compressed chunk size outside 1..{cap}")
    if sum(sizes) != p.data.size:
        raise PayloadError(f"chunk table of payload {p.name!r} points outside its data region")
    return PayloadLayout(idx, index_bytes, sizes)


def workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


BATCH_BYTES = 1 << 20
BATCH_CHUNKS = 32


def decompress_batch(frames: list[bytes], lengths: list[int], ids: list[bytes], digest: str) -> list[bytes]:
    return [decompress_chunk(f, n, cid, digest) for f, n, cid in zip(frames, lengths, ids, strict=True)]


def update_all(h: Any, parts: list[bytes]) -> None:
    for part in parts:
        h.update(part)


class PayloadStream:
    """Yields a payload's chunks, verified, in order. Iterate to the end: the payload-wide checks
    (length, SHA-256, compressed-data hash) run after the last chunk, and raise PayloadError.

    Chunks travel in batches of about 1 MiB (fewer hand-offs between threads); the pool decompresses
    and checks them, a second single thread keeps the two payload-wide hashes, and the caller's
    thread only reads and hands out.
    """

    def __init__(self, f: BinaryIO, payload: Payload, layout: PayloadLayout, pool: ThreadPoolExecutor,
                 *, keep_frames: bool = False, compressed_hash: bool = True) -> None:
        self._f = f
        self.payload = payload
        self.layout = layout
        self._pool = pool
        self._keep_frames = keep_frames
        # The hash of the compressed frames adds nothing to what is written once every chunk matches its id
        # in the signed index; `bundle verify` keeps it as a check of the whole file, the installer (which
        # prescans local files for it) drops it.
        self._compressed_hash = compressed_hash
        self.frames: list[bytes] = []

    def _batches(self) -> Iterator[tuple[list[bytes], list[int], list[bytes]]]:
        p, idx, sizes = self.payload, self.layout.index, self.layout.sizes
        i, n = 0, len(sizes)
        while i < n:
            j, total = i, 0
            while j < n and j - i < BATCH_CHUNKS and (total < BATCH_BYTES or j == i):
                total += sizes[j]
                j += 1
            buf = read_exact(self._f, total, f"payload {p.name!r}")
            frames, pos = [], 0
            for k in range(i, j):
                frames.append(buf[pos:pos + sizes[k]])
                pos += sizes[k]
            yield frames, [idx.chunk_span(k)[1] for k in range(i, j)], list(idx.ids[i:j])
            i = j

    def __iter__(self) -> Iterator[bytes]:
        p = self.payload
        full = hashlib.sha256()
        data_hash = hashlib.sha256()
        pending: collections.deque[Future[list[bytes]]] = collections.deque()
        depth = 2 * workers()
        last_hash: Future[None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="hash") as hasher:
            try:
                for frames, lengths, ids in self._batches():
                    if self._compressed_hash:
                        last_hash = hasher.submit(update_all, data_hash, frames)
                    pending.append(self._pool.submit(decompress_batch, frames, lengths, ids, p.chunk_digest))
                    if self._keep_frames:
                        self.frames.extend(frames)
                    while len(pending) > depth:
                        chunks = self._result(pending.popleft(), p)
                        last_hash = hasher.submit(update_all, full, chunks)
                        yield from chunks
                while pending:
                    chunks = self._result(pending.popleft(), p)
                    last_hash = hasher.submit(update_all, full, chunks)
                    yield from chunks
            finally:
                for fut in pending:
                    fut.cancel()
            if last_hash is not None:
                last_hash.result()
        if self._compressed_hash and data_hash.hexdigest() != p.data.sha256:
            raise PayloadError(f"compressed data of payload {p.name!r} does not match the signed manifest")
        if full.hexdigest() != p.sha256:
            raise PayloadError(f"payload {p.name!r} does not match its SHA-256 in the signed manifest")

    @staticmethod
    def _result(fut: Future[list[bytes]], p: Payload) -> list[bytes]:
        try:
            return fut.result()
        except PayloadError as e:
            raise PayloadError(f"payload {p.name!r}: {e.message}") from None


def payload_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers(), thread_name_prefix="verify")


def verify_payloads(f: BinaryIO, m: Manifest, on_bytes: Callable[[int], None] | None = None,
                    limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> None:
    """Verify every payload from the start of the payload area to the end of the file."""
    cb = on_bytes
    with payload_pool() as pool:
        for p in m.payloads:
            layout = read_layout(f, p, limits)
            for chunk in PayloadStream(f, p, layout, pool):
                if cb:
                    cb(len(chunk))
    expect_eof(f)
