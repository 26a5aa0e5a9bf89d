"""Filesystem images, the GPT layout of the A/B disk, assembly into one file, loop devices, ESP access.

No loop devices or mounts are needed to build a disk (DESIGN.md "Images"): ``mkfs.ext4 -d``,
``mkfs.vfat`` + mtools, ``sfdisk`` on a plain file, partition images copied in at their offsets.
Loop devices appear only where a test wants the installer to write real block devices.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pitstop.image.partitions import (
    ALIGN,
    ESP_TYPE,
    LINUX_DATA_TYPE,
    ROOT_TYPES,
    SECTOR,
    Layout,
    Partition,
    sfdisk_script,
)
from pitstop.image.sizes import MiB
from pitstop.runner import run

ROOT_X86_64_TYPE = ROOT_TYPES["x86_64"]

# mtools refuses FAT images whose geometry it finds odd; these are ours, built by mkfs.vfat.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def ab_layout(esp_mib: int = 16, slot_mib: int = 32, data_mib: int = 4) -> Layout:
    """p1 esp, p2 rootfs_a, p3 rootfs_b (same size), p4 data; fixed GUIDs (5a5a…) like the notes' image."""
    parts = []
    start = ALIGN
    specs = (("esp", ESP_TYPE, esp_mib, "e5"), ("rootfs_a", ROOT_X86_64_TYPE, slot_mib, "0a"),
             ("rootfs_b", ROOT_X86_64_TYPE, slot_mib, "0b"), ("data", LINUX_DATA_TYPE, data_mib, "da"))
    for number, (name, type_guid, mib, tag) in enumerate(specs, start=1):
        uuid = f"5a5a5a5a-0000-4000-8000-0000000000{tag}"
        parts.append(Partition(number, name, type_guid, uuid, start, mib * MiB))
        start += mib * MiB
    return Layout("5a5a5a5a-0000-4000-8000-000000000d15", tuple(parts), start + ALIGN)


@functools.cache
def _mke2fs_version() -> tuple[int, int]:
    res = run(["mke2fs", "-V"])
    m = re.search(rb"mke2fs (\d+)\.(\d+)", res.stderr + res.stdout)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def ext4_features() -> list[str]:
    """Features GRUB 2.06 may not read, switched off where this mke2fs knows them (notes, pitfall 7)."""
    off = ["^metadata_csum_seed"]
    if _mke2fs_version() >= (1, 47):
        off.append("^orphan_file")
    return ["-O", ",".join(off)]


def make_ext4(out: Path, size: int, src: Path | None, *, label: str, uuid: str) -> Path:
    """An ext4 image of `size` bytes holding the tree `src` (empty if None)."""
    out.unlink(missing_ok=True)
    cmd = ["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, "-E", f"hash_seed={uuid}", *ext4_features()]
    if src is not None:
        cmd += ["-d", str(src)]
    run([*cmd, out, f"{size // 1024}k"])
    return out


def make_vfat(out: Path, size: int, files: Mapping[str, Path], *, label: str = "ESP",
              volume_id: str = "5A5A00E5") -> Path:
    """A FAT image of `size` bytes holding `files` ({"EFI/BOOT/x": source path})."""
    out.unlink(missing_ok=True)
    run(["mkfs.vfat", "-C", "-n", label, "-i", volume_id, out, str(size // 1024)])
    dirs = sorted({str(Path(name).parent) for name in files} - {"."})
    needed = sorted({str(p) for d in dirs for p in [Path(d), *Path(d).parents] if str(p) != "."})
    if needed:
        run(["mmd", "-i", out, *[f"::/{d}" for d in needed]], env=MTOOLS_ENV)
    for name, src in files.items():
        run(["mcopy", "-i", out, src, f"::/{name}"], env=MTOOLS_ENV)
    return out


def assemble(out: Path, layout: Layout, images: Mapping[str, Path]) -> Path:
    """A sparse disk file with `layout`'s GPT and each partition's image ({partition name: image})."""
    out.unlink(missing_ok=True)
    with out.open("wb") as f:
        f.truncate(layout.size)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", out], input=sfdisk_script(layout).encode())
    _check_table(out, layout)
    with out.open("r+b") as f:
        for name, image in images.items():
            p = layout.part(name)
            if image.stat().st_size > p.size:
                raise ValueError(f"{image} ({image.stat().st_size} bytes) does not fit partition {name} ({p.size})")
            f.seek(p.start)
            with image.open("rb") as src:
                shutil.copyfileobj(src, f, MiB)
    return out


def _check_table(disk: Path, layout: Layout) -> None:
    table = json.loads(run(["sfdisk", "-J", disk]).text)["partitiontable"]["partitions"]
    got = [(p["start"] * SECTOR, p["size"] * SECTOR, p["uuid"].lower()) for p in table]
    want = [(p.start, p.size, p.uuid) for p in layout.partitions]
    if got != want:
        raise AssertionError(f"sfdisk wrote {got}, wanted {want}")


def read_esp_file(disk: Path, layout: Layout, name: str) -> bytes:
    """A file from the disk's ESP, read with mtools (no mount)."""
    return run(["mcopy", "-n", "-i", f"{disk}@@{layout.part('esp').start}", f"::/{name}", "-"], env=MTOOLS_ENV).stdout


def write_esp_file(disk: Path, layout: Layout, name: str, src: Path) -> None:
    """Overwrite a file on the disk's ESP with mtools (no mount)."""
    run(["mcopy", "-o", "-i", f"{disk}@@{layout.part('esp').start}", src, f"::/{name}"], env=MTOOLS_ENV)


def delete_esp_file(disk: Path, layout: Layout, name: str) -> None:
    run(["mdel", "-i", f"{disk}@@{layout.part('esp').start}", f"::/{name}"], env=MTOOLS_ENV)


def read_partition(disk: Path, part: Partition, length: int | None = None) -> bytes:
    with disk.open("rb") as f:
        f.seek(part.start)
        return f.read(part.size if length is None else length)


# --- loop devices and the ESP, for tests in which the installer writes real block devices ----------------


@contextlib.contextmanager
def loop_device(disk: Path, part: Partition) -> Iterator[Path]:
    """`part` of `disk` as a loop block device; always detached afterwards."""
    dev = Path(run(["losetup", "--find", "--show", "-o", str(part.start), "--sizelimit", str(part.size),
                    disk]).text.strip())
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev])


def kernel_has_vfat() -> bool:
    fs = Path("/proc/filesystems").read_text().split()
    return "vfat" in fs


@contextlib.contextmanager
def esp_mounted(disk: Path, layout: Layout, files: tuple[str, ...] = ("EFI/BOOT/grubenv",)) -> Iterator[Path]:
    """The disk's ESP as a directory: a real vfat mount of a loop device when the host kernel has vfat;
    otherwise `files` staged in a temporary directory with mtools and written back on exit."""
    with tempfile.TemporaryDirectory(prefix="pitstop-esp-") as tmp:
        mnt = Path(tmp)
        if kernel_has_vfat():
            with loop_device(disk, layout.part("esp")) as dev:
                run(["mount", "-t", "vfat", dev, mnt])
                try:
                    yield mnt
                finally:
                    run(["umount", mnt])
            return
        for name in files:
            (mnt / name).parent.mkdir(parents=True, exist_ok=True)
            (mnt / name).write_bytes(read_esp_file(disk, layout, name))
        yield mnt
        for name in files:
            write_esp_file(disk, layout, name, mnt / name)



@dataclass(frozen=True)
class Attached:
    devices: dict[str, Path]  # slot name (a, b) -> loop device of rootfs_<slot>
    esp: Path  # the ESP as a directory (see esp_mounted)


@contextlib.contextmanager
def attached(disk: Path, layout: Layout) -> Iterator[Attached]:
    """Both slots of `disk` as loop devices and its ESP as a directory; all undone on exit, even on failure."""
    with contextlib.ExitStack() as stack:
        devices = {slot: stack.enter_context(loop_device(disk, layout.part(f"rootfs_{slot}"))) for slot in ("a", "b")}
        yield Attached(devices, stack.enter_context(esp_mounted(disk, layout)))
