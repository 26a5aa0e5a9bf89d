"""`pitstop image flash IMAGE TARGET`: write an image's mapped blocks to a disk (or a file), then read them
back and compare.

1. The block map: IMAGE.bmap if present (checked against the image's size), else made from the image.
2. The target: a whole-disk block device nothing uses (image/blockdev.py), opened with O_EXCL (the kernel
   refuses while anything holds it), at least the image's size; or a regular file, grown to the image's size
   if smaller, never truncated.
3. Each mapped range is read from the image, hashed and written; a range whose hash differs from the block
   map stops the flash (the image or its block map is corrupt; the target is then partly written).
4. fsync, then every range is read back: with O_DIRECT from a block device, from a file after
   posix_fadvise(DONTNEED) drops it from the page cache; a range that reads back differently is a FlashError.
5. On a target larger than the image, the backup GPT is moved to the target's end (`sfdisk --relocate`), and
   a block device's partitions are re-read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pitstop.image import blockdev
from pitstop.image import bmap as bmaps
from pitstop.image.errors import BmapError, FlashError
from pitstop.image.sparse import ProgressFactory, no_progress
from pitstop.ota.slot_device import write_all
from pitstop.runner import run

log = logging.getLogger("pitstop.image.flash")

CHUNK = 1 << 20
SYNC_EVERY = 256 << 20  # keep the page cache (and the progress shown) close to what reached the disk
BLKRRPART = 0x125F
GPT_SIGNATURE = b"EFI PART"


@dataclass(frozen=True)
class FlashResult:
    target: Path
    block_device: bool
    written: int  # bytes
    verified: bool
    gpt_relocated: bool


def load_or_create_bmap(image: Path, bmap_path: Path | None, progress: ProgressFactory = no_progress) -> bmaps.Bmap:
    path = bmap_path or bmaps.default_path(image)
    size = image.stat().st_size
    if bmap_path is None and not path.exists():
        log.info("no block map %s: making one from the image", path)
        return bmaps.create(image, progress=progress)
    bm = bmaps.load(path)
    if bm.image_size != size:
        raise BmapError(f"{path} is for a {bm.image_size}-byte image; {image} has {size} bytes")
    return bm


@contextlib.contextmanager
def _open_target(target: Path, size: int) -> Iterator[tuple[int, bool]]:
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise FlashError(f"{target} does not exist (a disk, or a file made with `truncate -s SIZE FILE`)") from None
    if stat.S_ISBLK(st.st_mode):
        blockdev.check_disk(target)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise FlashError(f"{target} is in use (the kernel refuses exclusive access)") from None
            raise
        block = True
        have = blockdev.device_size(fd)
        if have < size:
            os.close(fd)
            raise FlashError(f"{target} holds {have} bytes; the image needs {size}")
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        block = False
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    else:
        raise FlashError(f"{target} is neither a block device nor a regular file")
    try:
        yield fd, block
    finally:
        os.close(fd)


def _write(image_fd: int, target_fd: int, bm: bmaps.Bmap, block: bool, update: Callable[[int], None]) -> int:
    written = since_sync = 0
    for offset, length, sha in bm.byte_ranges():
        h = hashlib.sha256()
        pos, left = offset, length
        while left:
            data = os.pread(image_fd, min(left, CHUNK), pos)
            if not data:
                raise BmapError(f"the image ends at byte {pos}, inside a mapped range")
            h.update(data)
            write_all(target_fd, data, pos)
            pos += len(data)
            left -= len(data)
            written += len(data)
            since_sync += len(data)
            update(len(data))
            if block and since_sync >= SYNC_EVERY:
                os.fdatasync(target_fd)
                since_sync = 0
        if h.hexdigest() != sha:
            raise BmapError(
                f"the image does not match its block map at bytes {offset}-{offset + length - 1} "
                "(corrupt image, or the block map of another image); the target is partly written"
            )
    os.fsync(target_fd)
    return written


def _read_back(target: Path, block: bool, bm: bmaps.Bmap, update: Callable[[int], None]) -> None:
    if block:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    else:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    try:
        for offset, length, sha in bm.byte_ranges():
            h = hashlib.sha256()
            pos, left = offset, length
            while left:
                # O_DIRECT reads whole aligned blocks: ranges start on a block; a partial last block of the
                # image is read whole and cut.
                want = min(left, CHUNK)
                n = os.preadv(fd, [memoryview(buf)[: -(-want // 4096) * 4096 if block else want]], pos)
                if n < want:
                    raise FlashError(f"{target}: short read back at byte {pos}")
                h.update(memoryview(buf)[:want])
                pos += want
                left -= want
                update(want)
            if h.hexdigest() != sha:
                raise FlashError(
                    f"{target}: bytes {offset}-{offset + length - 1} read back differently from what "
                    "was written (faulty medium, or something else wrote to it)"
                )
    finally:
        buf.close()
        os.close(fd)


def _has_gpt(image_fd: int) -> bool:
    return os.pread(image_fd, 8, 512) == GPT_SIGNATURE


def flash(
    image: Path,
    target: Path,
    *,
    bmap_path: Path | None = None,
    verify: bool = True,
    progress: ProgressFactory = no_progress,
) -> FlashResult:
    """Write `image` to `target` with its block map, verify, fix up the GPT. Raises FlashError (target refused
    or not reading back), BmapError (block map malformed or not matching the image)."""
    if image.resolve() == target.resolve():
        raise FlashError(f"{target} is the image itself")
    bm = load_or_create_bmap(image, bmap_path, progress)
    image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _open_target(target, bm.image_size) as (fd, block):
            target_size = blockdev.device_size(fd) if block else max(os.fstat(fd).st_size, bm.image_size)
            written = _write(image_fd, fd, bm, block, progress("writing", bm.mapped_bytes))
        gpt = _has_gpt(image_fd)
    finally:
        os.close(image_fd)
    if verify:
        _read_back(target, block, bm, progress("verifying", bm.mapped_bytes))
    relocated = False
    if gpt and target_size > bm.image_size:
        run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--relocate", "gpt-bak-std", target])
        relocated = True
    if block:
        _reread_partitions(target)
    return FlashResult(target, block, written, verify, relocated)


def _reread_partitions(target: Path) -> None:
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKRRPART)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning(
            "%s: the kernel did not re-read the partition table (%s); replug or reboot before use", target, e.strerror
        )
