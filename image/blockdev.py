"""Is a block device safe to overwrite? Mounts, swap, holders (device-mapper, RAID) and the disk the host
runs from, found through sysfs and /proc, resolved down to whole disks.

Everything reads from a `Host` (paths of /sys, /proc/self/mountinfo, /proc/swaps), so tests can describe a
machine with a few files.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pitstop.image.errors import FlashError


@dataclass(frozen=True)
class Host:
    sysfs: Path = Path("/sys")
    mountinfo: Path = Path("/proc/self/mountinfo")
    swaps: Path = Path("/proc/swaps")


@dataclass(frozen=True)
class Mount:
    devnum: tuple[int, int]  # major, minor (0:N for filesystems without a device)
    mountpoint: str
    source: str


def read_mounts(host: Host) -> list[Mount]:
    try:
        text = host.mountinfo.read_text()
    except OSError as e:
        raise FlashError(f"cannot read {host.mountinfo} to check for mounts: {e.strerror}") from None
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[2] or "-" not in fields:
            continue
        major, minor = fields[2].split(":")
        source = fields[fields.index("-") + 2]
        mounts.append(Mount((int(major), int(minor)), fields[4].replace("\\040", " "), source))
    return mounts


def _sys_dir(host: Host, devnum: tuple[int, int]) -> Path | None:
    link = host.sysfs / "dev" / "block" / f"{devnum[0]}:{devnum[1]}"
    return Path(os.path.realpath(link)) if link.exists() else None


def disks_of(host: Host, devnum: tuple[int, int], _depth: int = 0) -> set[str]:
    """Kernel names of the whole disks a block device lives on: itself or its parent for a partition, and
    through `slaves/` for device-mapper and RAID devices."""
    d = _sys_dir(host, devnum)
    if d is None or _depth > 16:
        return set()
    if (d / "partition").exists():
        return {d.parent.name}
    slaves = sorted((d / "slaves").iterdir()) if (d / "slaves").is_dir() else []
    if not slaves:
        return {d.name}
    out: set[str] = set()
    for s in slaves:
        dev = _devnum_file(s.resolve() / "dev")
        if dev is not None:
            out |= disks_of(host, dev, _depth + 1)
    return out


def _devnum_file(path: Path) -> tuple[int, int] | None:
    try:
        major, minor = path.read_text().strip().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def _devnum_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _mount_disks(host: Host, m: Mount) -> set[str]:
    if m.devnum[0] != 0:
        return disks_of(host, m.devnum)
    # A filesystem without its own device number (btrfs, some overlays): the source names the device.
    dev = _devnum_of(m.source) if m.source.startswith("/dev/") else None
    return disks_of(host, dev) if dev is not None else set()


def root_disks(host: Host) -> set[str]:
    """The disks `/` lives on."""
    out: set[str] = set()
    for m in read_mounts(host):
        if m.mountpoint == "/":
            out |= _mount_disks(host, m)
    return out


def partitions_of(host: Host, disk: str) -> list[str]:
    d = host.sysfs / "block" / disk
    return sorted(p.name for p in d.iterdir() if (p / "partition").exists()) if d.is_dir() else []


def busy_reasons(host: Host, devnum: tuple[int, int]) -> list[str]:
    """Why the whole disk `devnum` must not be overwritten; empty if nothing uses it."""
    d = _sys_dir(host, devnum)
    if d is None:
        return [f"no sysfs entry for block device {devnum[0]}:{devnum[1]}"]
    disk = d.name
    if (d / "partition").exists():
        return [f"{disk} is a partition; flash the whole disk ({d.parent.name})"]
    reasons = []
    if disk in root_disks(host):
        reasons.append(f"{disk} is the disk this host runs from (/ is on it)")
    for m in read_mounts(host):
        if m.mountpoint != "/" and disk in _mount_disks(host, m):
            reasons.append(f"{m.source} on {disk} is mounted on {m.mountpoint}")
    try:
        swaps = host.swaps.read_text().splitlines()[1:]
    except OSError:
        swaps = []
    for line in swaps:
        dev = _devnum_of(line.split()[0]) if line.split() else None
        if dev is not None and disk in disks_of(host, dev):
            reasons.append(f"{line.split()[0]} on {disk} is in use as swap")
    for name in [disk, *partitions_of(host, disk)]:
        holders = host.sysfs / "class" / "block" / name / "holders"
        for h in sorted(holders.iterdir()) if holders.is_dir() else []:
            dm = h / "dm" / "name"
            label = f"{h.name} ({dm.read_text().strip()})" if dm.exists() else h.name
            reasons.append(f"{name} is held by {label} (device-mapper, RAID or similar)")
    ro = d / "ro"
    if ro.exists() and ro.read_text().strip() == "1":
        reasons.append(f"{disk} is read-only")
    return reasons


def check_disk(path: Path, host: Host | None = None) -> None:
    """FlashError unless the block device `path` is a whole disk nothing on this host is using."""
    host = host or Host()
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise FlashError(f"{path} is not a block device")
    reasons = busy_reasons(host, (os.major(st.st_rdev), os.minor(st.st_rdev)))
    if reasons:
        raise FlashError(f"refusing to write {path}: " + "; ".join(reasons))


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
