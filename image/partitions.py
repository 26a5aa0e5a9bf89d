"""The GPT layout of an A/B disk (DESIGN.md "On the device") and its deterministic identifiers.

p1 ``esp`` (FAT), p2 ``rootfs_a``, p3 ``rootfs_b`` (the same size), p4 ``data`` (ext4). The first partition
starts at 1 MiB, partitions follow each other, each a whole number of MiB; the disk ends 1 MiB after the last
partition (room for the backup GPT, 33 sectors, keeping the size aligned).

Identifiers are derived from the image's identity (its ``compatible`` string) with UUIDv5, so every build of
one product has the same disk GUID, PARTUUIDs, filesystem UUIDs and FAT volume id: builds are reproducible
and ``root=PARTUUID=…`` stays valid across images of the product. (Every disk flashed from an image shares
them, as with any image-based flashing.)
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from pitstop.image.sizes import MiB

SECTOR = 512
ALIGN = MiB
GPT_TAIL = 33 * SECTOR  # backup GPT: 32 sectors of entries and the header

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_DATA_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# Discoverable Partitions Specification: "Root Partition (x86-64)" / "(64-bit ARM)".
ROOT_TYPES = {"x86_64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"}

NAMES = ("esp", "rootfs_a", "rootfs_b", "data")
SLOT_PARTITIONS = {"a": "rootfs_a", "b": "rootfs_b"}

# Fixed: changing it changes every identifier of every image.
_NAMESPACE = uuid.UUID("6a1d4c0e-3f7b-5b8e-9c2d-70697473746f")


def identity_uuid(identity: str, role: str) -> str:
    """A stable UUID for `role` ("disk", "part:esp", "fs:data"…) of the image identified by `identity`."""
    return str(uuid.uuid5(_NAMESPACE, f"{identity}\0{role}"))


def fat_volume_id(identity: str) -> str:
    """The ESP's FAT volume id (8 hex digits), stable per identity."""
    return hashlib.sha256(f"{identity}\0fat:esp".encode()).hexdigest()[:8].upper()


@dataclass(frozen=True)
class Partition:
    number: int
    name: str  # GPT partition name (PARTLABEL)
    type_guid: str
    uuid: str  # PARTUUID
    start: int  # bytes
    size: int  # bytes

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def grub_device(self) -> str:
        return f"gpt{self.number}"


@dataclass(frozen=True)
class Layout:
    disk_guid: str
    partitions: tuple[Partition, ...]
    size: int  # bytes, the backup GPT included

    def part(self, name: str) -> Partition:
        for p in self.partitions:
            if p.name == name:
                return p
        raise KeyError(name)


def required_disk_size(esp: int, rootfs: int, data: int) -> int:
    """The smallest disk holding the four partitions."""
    return ALIGN + esp + 2 * rootfs + data + ALIGN


def fill_size(disk: int, esp: int, rootfs: int) -> int:
    """The data partition's size when it takes the rest of `disk` (may be ≤ 0: does not fit)."""
    return disk - required_disk_size(esp, rootfs, 0)


def plan(*, esp: int, rootfs: int, data: int | None, disk: int | None, arch: str, identity: str) -> Layout:
    """The layout for these sizes (bytes, multiples of 1 MiB). `data` None: the rest of `disk`. `disk` None:
    just large enough. ValueError when the partitions do not fit the disk."""
    if data is None:
        if disk is None:
            raise ValueError("the data partition can fill the disk only when the disk size is given")
        data = fill_size(disk, esp, rootfs)
    need = required_disk_size(esp, rootfs, data)
    if disk is None:
        disk = need
    if data <= 0 or need > disk:
        raise ValueError(f"partitions need {need} bytes, the disk has {disk}")
    for n in (esp, rootfs, data, disk):
        if n % ALIGN:
            raise ValueError(f"size {n} is not a multiple of 1 MiB")
    specs = (
        ("esp", ESP_TYPE, esp),
        ("rootfs_a", ROOT_TYPES[arch], rootfs),
        ("rootfs_b", ROOT_TYPES[arch], rootfs),
        ("data", LINUX_DATA_TYPE, data),
    )
    parts = []
    start = ALIGN
    for number, (name, type_guid, size) in enumerate(specs, start=1):
        parts.append(Partition(number, name, type_guid, identity_uuid(identity, f"part:{name}"), start, size))
        start += size
    return Layout(identity_uuid(identity, "disk"), tuple(parts), disk)


def sfdisk_script(layout: Layout) -> str:
    """Input for `sfdisk` that writes exactly `layout` (positions, types, PARTUUIDs, names)."""
    lines = [
        "label: gpt",
        f"label-id: {layout.disk_guid}",
        "unit: sectors",
        "first-lba: 2048",
        f"last-lba: {(layout.size - GPT_TAIL) // SECTOR - 1}",
        "",
    ]
    for p in layout.partitions:
        lines.append(
            f'start={p.start // SECTOR}, size={p.size // SECTOR}, type={p.type_guid}, uuid={p.uuid}, name="{p.name}"'
        )
    return "\n".join(lines) + "\n"
