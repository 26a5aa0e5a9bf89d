"""The EFI system partition: a standalone GRUB, the project's A/B configuration, grubenv, in a FAT image made
without mounting (`mkfs.vfat` + mtools). docs/grub.md is the contract.

On the ESP:

- `EFI/BOOT/BOOTX64.EFI` (x86_64) or `EFI/BOOT/BOOTAA64.EFI` (arm64, its modules taken from the image's
  rootfs: an amd64 host cannot install them): GRUB with `ota/grub/embedded.cfg` in its memdisk. Built like
  `grub-mkstandalone` does (a memdisk tar of the config and the modules, then `grub-mkimage`), except that the
  tar is written here with fixed times and owners: grub-mkstandalone stamps each member with the time it copied
  it, so its output differs on every run.
- `EFI/BOOT/grub.cfg`: `ota/grub/grub.cfg`, unchanged.
- `EFI/BOOT/pitstop-platform.cfg`: this image's slot partitions, `root=PARTUUID=…` and kernel arguments.
- `EFI/BOOT/grubenv`: 1024 bytes, slot a the only bootable slot, written by ota's grubenv code.

Reproducible: `mkfs.vfat --invariant` with a fixed volume id; mtools stamps files and directories with
`SOURCE_DATE_EPOCH`.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pitstop.image.errors import ImageBuildError
from pitstop.image.partitions import SLOT_PARTITIONS, Layout
from pitstop.ota import grubenv
from pitstop.ota.bootloader import vars_from_env
from pitstop.ota.slot_state import BootEnv
from pitstop.runner import run

EFI_DIR = "EFI/BOOT"
GRUBENV = f"{EFI_DIR}/grubenv"
GRUB_CFG = f"{EFI_DIR}/grub.cfg"
PLATFORM_CFG = f"{EFI_DIR}/pitstop-platform.cfg"

# Preloaded into the core image, and (with their dependencies) copied into the memdisk, as docs/grub.md says.
GRUB_MODULES = (
    "part_gpt",
    "fat",
    "ext2",
    "normal",
    "configfile",
    "search",
    "regexp",
    "test",
    "echo",
    "loadenv",
    "linux",
    "efi_gop",
)


@dataclass(frozen=True)
class GrubTarget:
    platform: str  # grub-mkimage -O
    binary: str  # the removable-media path's file name
    modules_dir: Path  # the build host's, where its package installs them
    package: str  # the Debian package with the modules


GRUB_TARGETS = {
    "x86_64": GrubTarget("x86_64-efi", "BOOTX64.EFI", Path("/usr/lib/grub/x86_64-efi"), "grub-efi-amd64-bin"),
    # An amd64 host cannot install grub-efi-arm64-bin: the image builder takes the modules from the image's own
    # rootfs (image/rootfs.py ARCH_PACKAGES), passed as `modules_dir`. The host's grub-mkimage (grub-common) makes
    # the binary for any platform from modules of the same GRUB release.
    "arm64": GrubTarget("arm64-efi", "BOOTAA64.EFI", Path("/usr/lib/grub/arm64-efi"), "grub-efi-arm64-bin"),
}


def grub_target(arch: str, modules_dir: Path | None = None) -> GrubTarget:
    """The GRUB platform of `arch` (a recipe's target.arch); `modules_dir` (the image's rootfs'
    usr/lib/grub/<platform>) replaces the build host's modules directory."""
    target = GRUB_TARGETS.get(arch)
    if target is None:
        raise ImageBuildError(f"no UEFI GRUB platform known for {arch} (known: {', '.join(sorted(GRUB_TARGETS))})")
    return target if modules_dir is None else dataclasses.replace(target, modules_dir=modules_dir)


# grub-mkstandalone puts these module lists beside the modules; GRUB reads them to auto-load modules.
_LISTS = (
    "moddep.lst",
    "command.lst",
    "fs.lst",
    "partmap.lst",
    "parttool.lst",
    "terminal.lst",
    "video.lst",
    "crypto.lst",
)

MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def project_grub_file(name: str) -> bytes:
    """`grub.cfg` or `embedded.cfg` as installed with pitstop.ota (package data)."""
    return (resources.files("pitstop.ota") / "grub" / name).read_bytes()


def module_closure(modules: tuple[str, ...], moddep: str) -> list[str]:
    """`modules` and everything they depend on (moddep.lst: "name: dep dep"), sorted."""
    deps: dict[str, list[str]] = {}
    for line in moddep.splitlines():
        name, sep, rest = line.partition(":")
        if sep:
            deps[name.strip()] = rest.split()
    out: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in out:
            continue
        if m not in deps:
            raise ImageBuildError(f"GRUB module {m!r} is not in moddep.lst")
        out.add(m)
        todo += deps[m]
    return sorted(out)


def memdisk_tar(target: GrubTarget, embedded_cfg: bytes, epoch: int) -> bytes:
    """The memdisk: boot/grub/grub.cfg and boot/grub/<platform>/ (modules and lists), fixed times and owners."""
    d = target.modules_dir
    try:
        mods = module_closure(GRUB_MODULES, (d / "moddep.lst").read_text())
        names = [*(n for n in _LISTS if (d / n).exists()), *(f"{m}.mod" for m in mods)]
        members = [("boot/grub/grub.cfg", embedded_cfg)]
        members += [(f"boot/grub/{target.platform}/{n}", (d / n).read_bytes()) for n in sorted(names)]
    except OSError as e:
        raise ImageBuildError(
            f"GRUB modules for {target.platform} missing in {d} (Debian package {target.package}): {e}"
        ) from None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), epoch, 0o644, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_grub_efi(
    out: Path, workdir: Path, *, epoch: int, arch: str = "x86_64", modules_dir: Path | None = None
) -> Path:
    """The standalone GRUB EFI binary with the project's embedded.cfg; the same bytes for the same GRUB.
    `modules_dir`: GRUB's modules for `arch` from elsewhere than the build host (grub_target)."""
    target = grub_target(arch, modules_dir)
    tar = workdir / "memdisk.tar"
    tar.write_bytes(memdisk_tar(target, project_grub_file("embedded.cfg"), epoch))
    run(grub_mkimage_argv(target, out, tar))
    tar.unlink()
    return out


def grub_mkimage_argv(target: GrubTarget, out: Path, memdisk: Path) -> list[str]:
    """grub-mkimage's command line: what grub-mkstandalone runs, with our reproducible memdisk tar."""
    return [
        "grub-mkimage",
        "-O",
        target.platform,
        "-o",
        str(out),
        "-d",
        str(target.modules_dir),
        "-m",
        str(memdisk),
        "-p",
        "(memdisk)/boot/grub",
        "memdisk",
        "tar",
        *GRUB_MODULES,
    ]


def platform_cfg(layout: Layout, cmdline: str) -> str:
    """EFI/BOOT/pitstop-platform.cfg: each slot's partition and root=, the extra kernel arguments."""
    lines = ["# pitstop platform settings for this image (written by the image builder; docs/grub.md)"]
    for slot, name in SLOT_PARTITIONS.items():
        p = layout.part(name)
        lines.append(f"set pitstop_part_{slot}={p.grub_device}")
        lines.append(f"set pitstop_root_{slot}=PARTUUID={p.uuid}")
    lines.append(f'set pitstop_cmdline="{cmdline}"')
    return "\n".join(lines) + "\n"


def initial_grubenv(tries: int) -> bytes:
    """A fresh image: ORDER="a b", slot a OK with `tries` tries, slot b empty (no generation markers: the
    first pitstop write adds them)."""
    env = BootEnv(("a", "b"), {"a": True, "b": False}, {"a": tries, "b": 0})
    return grubenv.encode(vars_from_env(env, {"a": "a", "b": "b"}))


def mtools_env(epoch: int) -> dict[str, str]:
    return {**MTOOLS_ENV, "SOURCE_DATE_EPOCH": str(epoch)}


def make_vfat(
    out: Path, size: int, files: Mapping[str, bytes], *, volume_id: str, epoch: int, label: str = "ESP"
) -> Path:
    """A FAT image of `size` bytes holding `files` ({"EFI/BOOT/x": content}), reproducible."""
    out.unlink(missing_ok=True)
    env = mtools_env(epoch)
    run(["mkfs.vfat", "-C", "--invariant", "-n", label, "-i", volume_id, out, str(size // 1024)], env=env)
    dirs = sorted({str(p) for name in files for p in Path(name).parents if str(p) != "."})
    if dirs:
        run(["mmd", "-i", out, *[f"::/{d}" for d in dirs]], env=env)
    staging = out.with_name(out.name + ".files")
    staging.mkdir(exist_ok=True)
    try:
        for i, (name, data) in enumerate(sorted(files.items())):
            src = staging / str(i)
            src.write_bytes(data)
            run(["mcopy", "-i", out, src, f"::/{name}"], env=env)
            src.unlink()
    finally:
        staging.rmdir()
    return out


def esp_files(layout: Layout, *, efi: Path, cmdline: str, tries: int, arch: str = "x86_64") -> dict[str, bytes]:
    """Everything the ESP holds, by path."""
    return {
        f"{EFI_DIR}/{grub_target(arch).binary}": efi.read_bytes(),
        GRUB_CFG: project_grub_file("grub.cfg"),
        PLATFORM_CFG: platform_cfg(layout, cmdline).encode(),
        GRUBENV: initial_grubenv(tries),
    }


def read_file(image: Path | str, name: str, offset: int = 0) -> bytes:
    """A file from a FAT image (or one at `offset` bytes into a disk image), read with mtools."""
    return run(["mcopy", "-n", "-i", f"{image}@@{offset}", f"::/{name}", "-"], env=MTOOLS_ENV).stdout
