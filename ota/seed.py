"""The chunks a device already holds in its active slot: the seed of a delta install.

Where they are comes from the chunk index recorded when that slot was installed (data/pitstop/slots/<slot>/),
if it was cut with the new payload's chunking; otherwise the slot is chunked now, with the new payload's
parameters, up to the size of the ext4 file system in it (the whole device when it holds none). Every
chunk read from the seed is hashed again before it is used: a record that no longer matches the slot, or
a read error, only means that chunk is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pitstop.ota import bundle_format as fmt
from pitstop.ota import caibx, chunks
from pitstop.ota.delta_plan import seed_offsets
from pitstop.ota.device import record_dir
from pitstop.ota.errors import BundleError
from pitstop.ota.manifest import Payload

log = logging.getLogger(__name__)

_EXT4_MAGIC = 0xEF53


@dataclass(frozen=True)
class Seed:
    device: Path
    offsets: dict[bytes, int]  # chunk id → offset in `device`
    origin: str  # "recorded index" or "chunked <n> bytes"


def ext4_size(path: Path) -> int | None:
    """The size of the ext2/3/4 file system at the start of `path`, from its superblock; None if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
    except OSError:
        return None
    if len(sb) < 0x160 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
        return None
    (blocks_lo,) = struct.unpack_from("<I", sb, 0x04)
    (log_block,) = struct.unpack_from("<I", sb, 0x18)
    (incompat,) = struct.unpack_from("<I", sb, 0x60)
    blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & 0x80 else 0  # INCOMPAT_64BIT
    if log_block > 6:
        return None
    return int(((blocks_hi << 32) | blocks_lo) * (1024 << log_block))


def recorded_index(
    state_dir: Path, slot: str, payload: Payload, limits: fmt.Limits = fmt.DEFAULT_LIMITS
) -> caibx.ChunkIndex | None:
    """The rootfs chunk index recorded when `slot` was installed, if its chunking matches `payload`'s."""
    base = record_dir(state_dir, slot)
    try:
        records = sorted(base.iterdir())
    except OSError:
        return None
    for rec in records:
        try:
            manifest = json.loads((rec / "manifest.json").read_bytes())
            name = next(p["name"] for p in manifest["payloads"] if p.get("type") == "rootfs")
            idx = caibx.decode(
                (rec / f"{name}.caibx").read_bytes(), max_chunks=limits.max_chunks, max_chunk_size=limits.max_chunk_size
            )
        except (OSError, ValueError, KeyError, TypeError, StopIteration, BundleError) as e:
            log.debug("no usable chunk index in %s: %s", rec, e)
            continue
        sha512 = bool(idx.feature_flags & caibx.CA_FORMAT_SHA512_256)
        if (idx.chunk_min, idx.chunk_avg, idx.chunk_max) == payload.chunking and sha512 == (
            payload.chunk_digest == "sha512-256"
        ):
            return idx
    return None


def chunk_device(
    device: Path, payload: Payload, limit: int | None, progress: Callable[[int], None] | None = None
) -> dict[bytes, int]:
    """Cut `device` (its first `limit` bytes) with `payload`'s chunking; chunk id → first offset."""
    cmin, cavg, cmax = payload.chunking
    out: dict[bytes, int] = {}
    with open(device, "rb") as f:
        stream = _Limited(f, limit)
        pos = 0
        for c in chunks.iter_chunks(stream, cmin, cavg, cmax):  # type: ignore[arg-type]
            out.setdefault(chunks.chunk_id(c, payload.chunk_digest), pos)
            pos += len(c)
            if progress:
                progress(pos)
    return out


class _Limited:
    """A readinto()-able view of the first `limit` bytes of a file (all of it if None)."""

    def __init__(self, f: BinaryIO, limit: int | None) -> None:
        self._f = f
        self._left = limit

    def readinto(self, b: memoryview) -> int:
        view = memoryview(b)
        if self._left is not None:
            if self._left <= 0:
                return 0
            view = view[: self._left]
        n = self._f.readinto(view)  # type: ignore[attr-defined]
        if self._left is not None:
            self._left -= n
        return int(n)


def load_seed(
    state_dir: Path, slot: str, device: Path, payload: Payload, limits: fmt.Limits = fmt.DEFAULT_LIMITS
) -> Seed | None:
    """The seed in `slot` (the booted one) for `payload`, or None when its device cannot be read."""
    idx = recorded_index(state_dir, slot, payload, limits)
    if idx is not None:
        return Seed(device, seed_offsets(idx), "recorded index")
    size = ext4_size(device)
    try:
        offsets = chunk_device(device, payload, size)
    except OSError as e:
        log.warning("cannot read slot %s (%s) for a delta install: %s", slot, device, e.strerror or e)
        return None
    return Seed(device, offsets, f"chunked {size} bytes" if size else "chunked the whole device")


def read_chunk(fd: int, offset: int, length: int, cid: bytes, digest: str) -> bytes | None:
    """The chunk at `offset` in the seed if it still is the chunk `cid`; None otherwise (or on a read error)."""
    try:
        data = os.pread(fd, length, offset)
    except OSError as e:
        log.warning("seed read at byte %d failed (%s): downloading that chunk", offset, e.strerror or e)
        return None
    if len(data) != length or chunks.chunk_id(data, digest) != cid:
        log.warning("seed chunk at byte %d no longer matches its id: downloading it", offset)
        return None
    return data
