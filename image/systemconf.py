"""`/etc/pitstop/system.toml` (docs/system-config.md) as the image builder writes it: the one writer of the
format, checked by the one reader (`pitstop.ota.system_config.parse`) before it is returned."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pitstop.image.errors import ImageBuildError
from pitstop.image.partitions import SLOT_PARTITIONS
from pitstop.ota.system_config import ConfigError, parse

PATH = "/etc/pitstop/system.toml"
KEYRING_PATH = "/etc/pitstop/keyring.pem"
DATA_DIR = "/data"
ESP_MOUNT = "/boot/efi"
GRUBENV_PATH = f"{ESP_MOUNT}/EFI/BOOT/grubenv"


def _by_partlabel(name: str) -> str:
    return f"/dev/disk/by-partlabel/{name}"


# A Jetson flashed with ROOTFS_AB=1: NVIDIA's partitions, nvbootctrl's slot names (docs/jetson.md).
JETSON_SLOTS: tuple[tuple[str, str, str], ...] = (
    ("a", _by_partlabel("APP"), "A"),
    ("b", _by_partlabel("APP_b"), "B"),
)


@dataclass(frozen=True)
class SystemToml:
    """The keys of system.toml; defaults are those of a device built from a recipe."""

    compatible: str
    tries: int = 3
    clock: str = "floor"
    data_dir: str = DATA_DIR
    keyring: str = KEYRING_PATH
    grubenv: str = GRUBENV_PATH
    # (slot name, device, boot name); GRUB's boot names are the slot names ("a" and "b").
    slots: tuple[tuple[str, str, str], ...] = tuple((s, _by_partlabel(p), s) for s, p in SLOT_PARTITIONS.items())
    backend: str = "grub"  # or "nvbootctrl" (a Jetson: no grubenv; the slots are JETSON_SLOTS)
    booted_slot: str = "auto"
    boot_id: str | None = None  # None: the kernel's (/proc/sys/kernel/random/boot_id)
    cmdline: str | None = None  # None: /proc/cmdline


def _s(value: str) -> str:
    # A JSON string is a TOML basic string (the same escapes: \" \\ \n \uXXXX).
    return json.dumps(value)


def render(cfg: SystemToml) -> str:
    """The file's text. ImageBuildError if the reader would refuse it."""
    lines = [
        "# pitstop's view of this device (docs/system-config.md); written by the image builder.",
        f"compatible = {_s(cfg.compatible)}",
        f"data_dir = {_s(cfg.data_dir)}",
        f"keyring = {_s(cfg.keyring)}",
        f"clock = {_s(cfg.clock)}",
        f"booted_slot = {_s(cfg.booted_slot)}",
    ]
    if cfg.boot_id is not None:
        lines.append(f"boot_id = {_s(cfg.boot_id)}")
    if cfg.cmdline is not None:
        lines.append(f"cmdline = {_s(cfg.cmdline)}")
    lines += ["", "[bootloader]", f"backend = {_s(cfg.backend)}"]
    if cfg.backend == "grub":
        lines.append(f"grubenv = {_s(cfg.grubenv)}")
    lines.append(f"tries = {cfg.tries}")
    for name, device, boot_name in cfg.slots:
        lines += ["", "[[slot]]", f"name = {_s(name)}", f"device = {_s(device)}"]
        if boot_name != name:
            lines.append(f"boot_name = {_s(boot_name)}")
    text = "\n".join(lines) + "\n"
    try:
        parse(text, Path(PATH))
    except ConfigError as e:
        raise ImageBuildError(f"the system configuration would be refused on the device: {e.message}") from None
    return text
