"""The A/B test image, composed: parts built once per session, then one fresh disk per test."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pitstop.ota import grubenv

from . import disk, grub, initramfs, kernel
from .disk import Layout
from .qemu import Line

GRUB_BOOTING = re.compile(r"pitstop-grub: booting slot (\w+)")
GUEST_MARKER = re.compile(r"PITSTOP-SLOT=(\w+) MODE=(\w+)")

# Both slots get the same filesystem label and UUID, as two installs of one bundle would: GRUB must
# find slots by partition, never by filesystem identity.
SLOT_FS_LABEL = "rootfs"
SLOT_FS_UUID = "5a5a5a5a-1111-4000-8000-000000000f50"


@dataclass(frozen=True)
class Parts:
    """What every disk is made of; built once (a few seconds)."""

    layout: Layout
    efi: Path
    platform_cfg: Path
    slot_good: Path  # ext4 slot image whose guest powers off (a healthy boot)
    slot_bad: Path  # ext4 slot image whose guest panics (a failed boot): the update payload
    data: Path


def build_slot(workdir: Path, vmlinuz: Path, mode: str, size: int) -> Path:
    tree = workdir / f"slot-{mode}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    shutil.copyfile(vmlinuz, tree / "vmlinuz")
    initramfs.build_initrd(tree / "initrd.img", mode)
    return disk.make_ext4(workdir / f"slot-{mode}.ext4", size, tree, label=SLOT_FS_LABEL, uuid=SLOT_FS_UUID)


def build_parts(workdir: Path, vmlinuz: Path, layout: Layout | None = None) -> Parts:
    layout = layout or disk.ab_layout()
    workdir.mkdir(parents=True, exist_ok=True)
    slot_size = layout.part("rootfs_a").size
    platform = workdir / "pitstop-platform.cfg"
    platform.write_text(grub.platform_cfg(layout))
    return Parts(
        layout=layout,
        efi=grub.build_efi(workdir / "BOOTX64.EFI"),
        platform_cfg=platform,
        slot_good=build_slot(workdir, vmlinuz, "good", slot_size),
        slot_bad=build_slot(workdir, vmlinuz, "bad", slot_size),
        data=disk.make_ext4(workdir / "data.ext4", layout.part("data").size, None, label="data",
                            uuid="5a5a5a5a-2222-4000-8000-0000000000da"),
    )


def build_disk(out: Path, parts: Parts, env: dict[str, str] | None = None) -> Path:
    """A fresh disk: slot a holds the good image, slot b is blank, grubenv is `env` (default: fresh)."""
    work = out.parent
    env_file = work / "grubenv.initial"
    env_file.write_bytes(grubenv.encode(env if env is not None else grub.initial_env()))
    esp = disk.make_vfat(work / "esp.vfat", parts.layout.part("esp").size, {
        "EFI/BOOT/BOOTX64.EFI": parts.efi,
        "EFI/BOOT/grub.cfg": grub.GRUB_CFG,
        "EFI/BOOT/pitstop-platform.cfg": parts.platform_cfg,
        grub.GRUBENV: env_file,
    })
    disk.assemble(out, parts.layout, {"esp": esp, "rootfs_a": parts.slot_good, "data": parts.data})
    esp.unlink()
    return out


def guest_kernel() -> Path:
    vmlinuz = kernel.find_kernel()
    kernel.check_config(vmlinuz)
    return vmlinuz


@dataclass(frozen=True)
class Boot:
    """One boot as the serial log shows it; times in seconds since QEMU started."""

    slot: str
    mode: str
    started: float  # QEMU start, or the previous guest's report (its reset follows at once)
    grub: float  # GRUB printed its choice
    guest: float  # the guest reported its slot

    @property
    def seconds(self) -> float:
        return self.guest - self.started


def boots(lines: list[Line]) -> list[Boot]:
    out: list[Boot] = []
    started, grub_at = 0.0, 0.0
    for ln in lines:
        if GRUB_BOOTING.search(ln.text):
            grub_at = ln.t
        elif m := GUEST_MARKER.search(ln.text):
            out.append(Boot(m[1], m[2], started, grub_at, ln.t))
            started = ln.t
    return out


def boot_report(found: list[Boot]) -> str:
    rows = [f"  boot {i}: slot {b.slot} ({b.mode}) {b.seconds:5.1f} s: GRUB chose at +{b.grub - b.started:4.1f} s, "
            f"guest up at +{b.guest - b.started:4.1f} s" for i, b in enumerate(found, start=1)]
    return "\n".join(rows)
