"""The slot a rootfs payload is written to: a block device, or a regular file for development and tests."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pitstop.errors import PitstopError


class SlotError(PitstopError):
    """The target slot cannot be written: missing, too small, mounted or the running root."""

    exit_code = 27


def _mounted_devices(mountinfo: str) -> dict[int, str]:
    """dev_t → mount point, from /proc/self/mountinfo text."""
    out: dict[int, str] = {}
    for line in mountinfo.splitlines():
        parts = line.split()
        if len(parts) > 4 and ":" in parts[2]:
            major, minor = parts[2].split(":")
            out[os.makedev(int(major), int(minor))] = parts[4]
    return out


def slot_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_target(path: Path, need: int, *, mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
    """Refuse a target that is missing, not a block device or file, mounted, the running root, or too small."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SlotError(f"target slot {path} does not exist") from None
    if stat.S_ISBLK(st.st_mode):
        if st.st_rdev == os.stat("/").st_dev:
            raise SlotError(f"target slot {path} is the running root file system")
        try:
            mounts = _mounted_devices(mountinfo.read_text())
        except OSError:
            mounts = {}
        if st.st_rdev in mounts:
            raise SlotError(f"target slot {path} is mounted on {mounts[st.st_rdev]}")
    elif not stat.S_ISREG(st.st_mode):
        raise SlotError(f"target slot {path} is neither a block device nor a regular file")
    size = slot_size(path)
    if size < need:
        raise SlotError(f"target slot {path} holds {size} bytes; the rootfs payload needs {need}")


def open_for_write(path: Path) -> int:
    """A descriptor on the slot, without truncating it (a slot file keeps its size like a partition)."""
    return os.open(path, os.O_WRONLY | os.O_CLOEXEC)


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_vector(fd: int, parts: list[bytes], offset: int) -> None:
    """pwritev of `parts` at `offset`, finishing any short write piecewise."""
    if not parts:
        return
    total = sum(len(p) for p in parts)
    n = os.pwritev(fd, parts, offset)
    if n == total:
        return
    joined = b"".join(parts)
    write_all(fd, memoryview(joined)[n:], offset + n)
