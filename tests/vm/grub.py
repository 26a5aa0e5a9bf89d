"""GRUB for the test image: the standalone EFI binary, the platform file, grubenv in a disk image.

The configs are the project's own (``ota/grub/``); docs/grub.md documents them and the build line.
"""

from __future__ import annotations

from pathlib import Path

from pitstop.ota import grubenv
from pitstop.runner import run

from .disk import Layout, read_esp_file

REPO = Path(__file__).resolve().parents[2]
GRUB_DIR = REPO / "ota" / "grub"
GRUB_CFG = GRUB_DIR / "grub.cfg"
EMBEDDED_CFG = GRUB_DIR / "embedded.cfg"
GRUBENV = "EFI/BOOT/grubenv"

# Preloaded into the core image; the same list goes into the memdisk (docs/grub.md).
MODULES = ("part_gpt", "fat", "ext2", "normal", "configfile", "search", "regexp", "test", "echo", "loadenv",
           "linux", "efi_gop")


def mkstandalone_argv(out: Path, embedded: Path = EMBEDDED_CFG) -> list[str]:
    mods = " ".join(MODULES)
    return ["grub-mkstandalone", "-O", "x86_64-efi", "-o", str(out), f"--modules={mods}",
            f"--install-modules={mods}", "--fonts=", "--locales=", "--themes=",
            f"boot/grub/grub.cfg={embedded}"]


def build_efi(out: Path) -> Path:
    """BOOTX64.EFI: GRUB with the embedded config that finds the ESP and loads its grub.cfg."""
    run(mkstandalone_argv(out))
    return out


def platform_cfg(layout: Layout, cmdline: str = "console=ttyS0,115200 panic=1") -> str:
    """EFI/BOOT/pitstop-platform.cfg for `layout`: each slot's partition and root=, the extra cmdline."""
    lines = ["# pitstop platform settings for this image (written by the image builder; docs/grub.md)"]
    for slot in ("a", "b"):
        p = layout.part(f"rootfs_{slot}")
        lines.append(f"set pitstop_part_{slot}={p.grub_device}")
        lines.append(f"set pitstop_root_{slot}=PARTUUID={p.uuid}")
    lines.append(f'set pitstop_cmdline="{cmdline}"')
    return "\n".join(lines) + "\n"


def initial_env() -> dict[str, str]:
    """A fresh image: slot a is the only bootable slot."""
    return {"ORDER": "a b", "a_OK": "1", "a_TRY": "3", "b_OK": "0", "b_TRY": "0"}


def read_env(disk: Path, layout: Layout) -> dict[str, str]:
    return grubenv.decode(read_esp_file(disk, layout, GRUBENV))
