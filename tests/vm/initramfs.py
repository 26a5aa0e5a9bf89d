"""The guest: an initramfs (newc cpio, gzip) with a static busybox and an /init that reports its slot.

/init prints ``PITSTOP-SLOT=<s> MODE=<mode>`` on the console, ``<s>`` taken from ``pitstop.slot=`` on
the kernel command line. Mode ``good`` then powers off (QEMU exits). Mode ``bad`` models a failed boot:
init exits, the kernel panics, and ``panic=N`` on the command line reboots into GRUB again.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian busybox-static
MODES = ("good", "bad")
APPLETS = ("sh", "mount", "cat", "poweroff", "sleep")

INIT = """#!/bin/sh
# pitstop VM test guest (tests/vm/initramfs.py): report the slot, then pass (power off) or fail the boot.
export PATH=/bin
mount -t proc proc /proc
slot=unknown
for arg in $(cat /proc/cmdline); do
    case "$arg" in pitstop.slot=*) slot="${arg#pitstop.slot=}" ;; esac
done
echo "PITSTOP-CMDLINE=$(cat /proc/cmdline)" >/dev/console
echo "PITSTOP-SLOT=$slot MODE=@MODE@" >/dev/console
if [ "@MODE@" = good ]; then
    poweroff -f
    sleep 10
fi
echo "PITSTOP-BOOT-FAILED slot=$slot: init exits, the kernel panics, panic= reboots" >/dev/console
exit 1
"""


@dataclass(frozen=True)
class Entry:
    name: str  # without leading "/"
    mode: int  # full st_mode: type and permissions
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries: list[Entry]) -> bytes:
    """A newc ("070701") archive of `entries`, deterministic: uid/gid 0, mtime 0."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name)) + e.data + _pad4(len(e.data))
    return bytes(out)


def guest_entries(mode: str, busybox: Path = BUSYBOX) -> list[Entry]:
    if mode not in MODES:
        raise ValueError(f"guest mode must be one of {MODES}, not {mode!r}")
    d = stat.S_IFDIR | 0o755
    entries = [Entry(n, d) for n in ("bin", "dev", "proc", "sys")]
    entries.append(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries += [Entry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    entries.append(Entry("init", stat.S_IFREG | 0o755, INIT.replace("@MODE@", mode).encode()))
    return entries


def build_initrd(out: Path, mode: str, busybox: Path = BUSYBOX) -> Path:
    """Write the guest's initrd (gzip-compressed cpio) to `out`."""
    out.write_bytes(gzip.compress(cpio_newc(guest_entries(mode, busybox)), compresslevel=6, mtime=0))
    return out
