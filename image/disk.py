"""The disk image: a GPT written by `sfdisk` on a plain sparse file, partition images copied in at their
offsets by their data ranges only. No loop devices, no mounts (DESIGN.md "Images").

`assemble` is the generic step (a layout and a set of partition images); `build_disk` makes every partition
of a recipe's image around a given rootfs filesystem image: the ESP (GRUB, grub.cfg, platform file,
grubenv), slot a (the rootfs), slot b left empty (a hole), the data partition (image/datafs.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pitstop.atomic import fsync_dir
from pitstop.errors import CommandError
from pitstop.image import datafs, esp, ext4, partitions, sparse
from pitstop.image.errors import ImageBuildError
from pitstop.image.partitions import SECTOR, Layout
from pitstop.image.recipe import Recipe
from pitstop.ota.device_state import DeviceState
from pitstop.runner import run

ROOTFS_LABEL = "rootfs"


def read_table(disk: Path | str) -> list[dict[str, Any]]:
    """The partitions of `disk` as `sfdisk --json` reports them (start and size in sectors)."""
    table = json.loads(run(["sfdisk", "--json", disk]).text)["partitiontable"]
    parts: list[dict[str, Any]] = table.get("partitions", [])
    return parts


def find_partition(disk: Path | str, name: str) -> tuple[int, int]:
    """(offset, size) in bytes of the GPT partition named `name` on `disk` (an image or a block device)."""
    try:
        table = read_table(disk)
    except CommandError as e:
        raise ImageBuildError(f"{disk}: no partition table sfdisk can read ({e.stderr or e.message})") from None
    except (ValueError, KeyError) as e:
        raise ImageBuildError(f"{disk}: no partition table sfdisk can read ({e})") from None
    found = [p for p in table if p.get("name") == name]
    if len(found) != 1:
        names = ", ".join(str(p.get("name")) for p in table) or "none"
        raise ImageBuildError(
            f"{disk}: {'no' if not found else 'more than one'} partition named {name!r} (partitions: {names})"
        )
    return found[0]["start"] * SECTOR, found[0]["size"] * SECTOR


def check_table(disk: Path, layout: Layout) -> None:
    """ImageBuildError unless the GPT on `disk` is exactly `layout`."""
    got = [
        (p["start"] * SECTOR, p["size"] * SECTOR, p["uuid"].lower(), p.get("name"), p["type"].upper())
        for p in read_table(disk)
    ]
    want = [(p.start, p.size, p.uuid, p.name, p.type_guid) for p in layout.partitions]
    if got != want:
        raise ImageBuildError(f"sfdisk wrote {got}, wanted {want}")


def assemble(
    out: Path, layout: Layout, images: Mapping[str, Path], *, progress: sparse.ProgressFactory = sparse.no_progress
) -> Path:
    """A sparse disk file at `out` with `layout`'s GPT and each partition's image ({partition name: image})
    copied in by its data ranges. Partitions without an image stay holes. Made beside `out` and renamed into
    place when complete: `out` is never a half-written disk."""
    for name, image in images.items():
        p = layout.part(name)
        size = image.stat().st_size
        if size > p.size:
            raise ImageBuildError(f"{image} ({size} bytes) does not fit partition {name} ({p.size} bytes)")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with tmp.open("wb") as f:
            f.truncate(layout.size)
        script = partitions.sfdisk_script(layout).encode()
        run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", tmp], input=script)
        check_table(tmp, layout)
        update = progress("assembling", sum(sparse.data_size(image) for image in images.values()))
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for name, image in images.items():
                sparse.copy_into(image, fd, layout.part(name).start, progress=update)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(out.parent)
    return out


def epoch_now() -> int:
    """SOURCE_DATE_EPOCH if set (reproducible builds), else the current time."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return int(datetime.now(UTC).timestamp())
    if not value.isdigit():
        raise ImageBuildError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds")
    return int(value)


@dataclass(frozen=True)
class DiskParts:
    """The partition images of a disk, built in a work directory."""

    layout: Layout
    esp: Path
    data: Path
    rootfs: Path
    state: DeviceState


def build_esp(recipe: Recipe, layout: Layout, workdir: Path, *, epoch: int, grub_modules: Path | None = None) -> Path:
    efi = esp.build_grub_efi(
        workdir / "grub.efi", workdir, epoch=epoch, arch=recipe.target.arch, modules_dir=grub_modules
    )
    files = esp.esp_files(
        layout, efi=efi, cmdline=recipe.boot.cmdline, tries=recipe.boot.tries, arch=recipe.target.arch
    )
    efi.unlink()
    return esp.make_vfat(
        workdir / "esp.vfat",
        layout.part("esp").size,
        files,
        volume_id=partitions.fat_volume_id(recipe.identity),
        epoch=epoch,
    )


def build_data(
    recipe: Recipe, layout: Layout, workdir: Path, *, epoch: int, slot_a_bundle: dict[str, Any] | None = None
) -> tuple[Path, DeviceState]:
    tree = workdir / "data.tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    try:
        state = datafs.build_tree(
            tree,
            bundle_version=recipe.bundle.version,
            security_version=recipe.bundle.security_version,
            created=datetime.fromtimestamp(epoch, UTC),
            persistent_journal=recipe.system.persistent_journal,
            models=[datafs.Preload(m.name, m.source, m.target, m.description()) for m in recipe.model],
            slot_a_bundle=slot_a_bundle,
        )
        image = ext4.make_ext4(
            workdir / "data.ext4",
            layout.part("data").size,
            tree,
            label=datafs.LABEL,
            uuid=partitions.identity_uuid(recipe.identity, "fs:data"),
            epoch=epoch,
            reserved_percent=1,
            owner=(0, 0),
        )
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return image, state


def build_disk(
    recipe: Recipe,
    rootfs: Path,
    out: Path,
    workdir: Path,
    *,
    epoch: int | None = None,
    slot_a_bundle: dict[str, Any] | None = None,
    progress: sparse.ProgressFactory = sparse.no_progress,
    grub_modules: Path | None = None,
) -> DiskParts:
    """The disk image of `recipe` at `out`, with `rootfs` (an ext4 image) in slot a. Intermediate images stay
    in `workdir` (the ESP and data images; the caller may keep or delete them). `grub_modules`: GRUB's modules
    from the image's own rootfs (arm64: the build host cannot install them), else the build host's."""
    epoch = epoch_now() if epoch is None else epoch
    layout = recipe.layout()
    slot = layout.part("rootfs_a")
    size = rootfs.stat().st_size
    if size > slot.size:
        raise ImageBuildError(
            f"the rootfs image {rootfs} ({size} bytes) is larger than a slot "
            f"({slot.size} bytes, partitions.rootfs in the recipe)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    esp_image = build_esp(recipe, layout, workdir, epoch=epoch, grub_modules=grub_modules)
    data_image, state = build_data(recipe, layout, workdir, epoch=epoch, slot_a_bundle=slot_a_bundle)
    assemble(out, layout, {"esp": esp_image, "rootfs_a": rootfs, "data": data_image}, progress=progress)
    return DiskParts(layout, esp_image, data_image, rootfs, state)
