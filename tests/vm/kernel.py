"""The guest kernel: a Debian cloud kernel that ``./dev env`` unpacks (never installs) into ``.cache/``."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "vm-kernel"
ENV_OVERRIDE = "PITSTOP_VM_KERNEL"

# What the initramfs-only guest needs built in (not as modules): a serial console, an initramfs,
# ACPI power-off (QEMU exits when the guest powers off).
REQUIRED_CONFIG = ("CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP",
                   "CONFIG_ACPI")


class KernelMissing(Exception):
    """No usable guest kernel; the message says how to get one."""


def find_kernel() -> Path:
    """The vmlinuz to boot: $PITSTOP_VM_KERNEL, else the newest in .cache/vm-kernel/boot."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        path = Path(override)
        if not path.is_file():
            raise KernelMissing(f"${ENV_OVERRIDE}={override} is not a file")
        return path
    found = sorted((CACHE / "boot").glob("vmlinuz-*"))
    if not found:
        raise KernelMissing(f"no guest kernel in {CACHE}/boot: run ./dev env (it fetches linux-image-cloud-amd64)")
    return found[-1]


def check_config(vmlinuz: Path) -> None:
    """Raise KernelMissing if the kernel's config (next to it, when there) lacks a built-in we need."""
    config = vmlinuz.with_name(vmlinuz.name.replace("vmlinuz-", "config-", 1))
    if not config.is_file():
        return
    lines = set(config.read_text().splitlines())
    missing = [opt for opt in REQUIRED_CONFIG if f"{opt}=y" not in lines]
    if missing:
        raise KernelMissing(f"{vmlinuz.name} lacks built-in {', '.join(missing)} (see {config})")
