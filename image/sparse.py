"""Sparse files: where their data is (SEEK_DATA / SEEK_HOLE) and copying only that.

A hole is a range the file system has not allocated; it reads as zeros. Disk images are built sparse (a
fresh file of the disk's size is one hole, partition images are copied in by their data ranges only), so
that the block map (image/bmap.py) lists just the ranges a flash must write.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

COPY_CHUNK = 1 << 20

# Progress reporting: called with (label, total bytes) when a step starts; returns the callback that is given
# the bytes done as they are done. The CLI draws bars with it (pitstop.progress).
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def data_ranges(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data range of the open file `fd` within [start, end), in order. A file system
    without SEEK_DATA support reports the whole file as data, which is correct, only not sparse."""
    size = os.fstat(fd).st_size if end is None else end
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno == errno.EINVAL:  # SEEK_DATA not supported
                yield pos, size - pos
                return
            raise
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole - data
        pos = hole


_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _copy(src: int, dst: int, n: int, src_pos: int, dst_pos: int) -> int:
    """copy_file_range (the kernel copies, or shares blocks, without a round trip through user space); plain
    pread/pwrite where the file systems do not support it."""
    try:
        return os.copy_file_range(src, dst, n, src_pos, dst_pos)
    except OSError as e:
        if e.errno not in _NO_COPY_FILE_RANGE:
            raise
    data = os.pread(src, n, src_pos)
    view = memoryview(data)
    while view:
        w = os.pwrite(dst, view, dst_pos)
        view = view[w:]
        dst_pos += w
    return len(data)


def data_size(path: Path) -> int:
    """Bytes in the file's data ranges (what copying it sparsely moves)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sum(n for _, n in data_ranges(fd))
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    """Bytes the file occupies on disk."""
    return os.stat(path).st_blocks * 512


def copy_into(src: Path, dst_fd: int, offset: int, *, progress: Callable[[int], None] | None = None) -> int:
    """Copy the data ranges of `src` into `dst_fd` at `offset` + their own offsets; holes are skipped (the
    destination must read as zeros there: a fresh sparse file). Returns the bytes copied."""
    copied = 0
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, length in data_ranges(fd):
            pos, left = start, length
            while left:
                done = _copy(fd, dst_fd, min(left, COPY_CHUNK), pos, offset + pos)
                if done <= 0:
                    raise OSError(errno.EIO, f"short copy from {src} at {pos}")
                pos += done
                left -= done
                copied += done
                if progress is not None:
                    progress(done)
    finally:
        os.close(fd)
    return copied
