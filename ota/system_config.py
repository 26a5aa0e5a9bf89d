"""`/etc/pitstop/system.toml`: what this device is, where its slots are, how it boots (docs/system-config.md)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pitstop.errors import PitstopError
from pitstop.ota.clock import ClockPolicy
from pitstop.ota.manifest import COMPATIBLE_RE

DEFAULT_PATH = Path("/etc/pitstop/system.toml")
BACKENDS = ("grub", "uboot", "nvbootctrl")
GRUB_BOOT_NAMES = frozenset({"a", "b"})
# nvbootctrl names the rootfs slots A/B in its output and 0/1 in its arguments; either pair is accepted.
NVBOOTCTRL_BOOT_NAMES = (frozenset({"A", "B"}), frozenset({"0", "1"}))
MAX_TRIES = 9  # the GRUB script counts down with an if-chain of single digits
NVBOOTCTRL_MAX_TRIES = 3  # ROOTFS_RETRY_COUNT_MAX is 1..3 on Jetson; UEFI counts, not pitstop


class ConfigError(PitstopError, ValueError):
    """The system configuration is missing or invalid."""

    exit_code = 23


@dataclass(frozen=True)
class SlotConfig:
    name: str
    device: Path
    boot_name: str


@dataclass(frozen=True)
class BootloaderConfig:
    backend: str
    tries: int
    grubenv: Path | None = None
    fw_printenv: str = "fw_printenv"
    fw_setenv: str = "fw_setenv"
    nvbootctrl: str = "nvbootctrl"


@dataclass(frozen=True)
class SystemConfig:
    path: Path
    compatible: str
    data_dir: Path
    keyring: Path
    clock: ClockPolicy
    bootloader: BootloaderConfig
    slots: tuple[SlotConfig, ...]
    booted_slot: str | None  # None: detect from the kernel command line
    cmdline: Path = Path("/proc/cmdline")
    boot_id: Path = Path("/proc/sys/kernel/random/boot_id")

    def slot(self, name: str) -> SlotConfig:
        for s in self.slots:
            if s.name == name:
                return s
        raise ConfigError(f"{self.path}: no slot named {name!r}")

    def slot_by_boot_name(self, boot_name: str) -> SlotConfig | None:
        return next((s for s in self.slots if s.boot_name == boot_name), None)

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "pitstop"


_KIND_NAMES: dict[type, str] = {int: "a whole number", str: "a string"}


def _take(table: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing {key!r}")
        return default
    value = table.pop(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key!r} must be {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


def _no_extra(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(table))}")


def _boot_name_ok(name: str) -> bool:
    return bool(name) and len(name) <= 16 and all(c.isascii() and (c.isalnum() or c == "_") for c in name)


def _slots(raw: Any, where: str) -> tuple[SlotConfig, ...]:
    if not isinstance(raw, list) or len(raw) != 2 or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where}: needs exactly two [[slot]] tables (A/B)")
    out = []
    for i, t in enumerate(raw):
        w = f"{where} [[slot]] #{i + 1}"
        t = dict(t)
        name = _take(t, "name", str, w)
        device = Path(_take(t, "device", str, w))
        boot_name = _take(t, "boot_name", str, w, name)
        _no_extra(t, w)
        if not _boot_name_ok(name) or not _boot_name_ok(boot_name):
            raise ConfigError(f"{w}: slot and boot names are 1-16 letters, digits or '_'")
        if not device.is_absolute():
            raise ConfigError(f"{w}: device must be an absolute path")
        out.append(SlotConfig(name, device, boot_name))
    if out[0].name == out[1].name or out[0].boot_name == out[1].boot_name or out[0].device == out[1].device:
        raise ConfigError(f"{where}: the two slots need different names, boot names and devices")
    return tuple(out)


def _bootloader(raw: Any, where: str) -> BootloaderConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: missing [bootloader] table")
    t = dict(raw)
    w = f"{where} [bootloader]"
    backend = _take(t, "backend", str, w)
    tries = _take(t, "tries", int, w, 3)
    if backend not in BACKENDS:
        raise ConfigError(f"{w}: backend must be one of {', '.join(BACKENDS)}")
    if not 1 <= tries <= MAX_TRIES:
        raise ConfigError(f"{w}: tries must be 1..{MAX_TRIES}")
    if backend == "nvbootctrl" and tries > NVBOOTCTRL_MAX_TRIES:
        raise ConfigError(
            f"{w}: with the nvbootctrl backend tries must be 1..{NVBOOTCTRL_MAX_TRIES} "
            "(the ROOTFS_RETRY_COUNT_MAX the device was flashed with)"
        )
    grubenv = None
    if backend == "grub":
        grubenv = Path(_take(t, "grubenv", str, w, "/boot/efi/EFI/BOOT/grubenv"))
    nvbootctrl = "nvbootctrl"
    if backend == "nvbootctrl":
        nvbootctrl = _take(t, "nvbootctrl", str, w, nvbootctrl)
        if not nvbootctrl.strip():
            raise ConfigError(f"{w}: nvbootctrl must name a command")
    fw_printenv = _take(t, "fw_printenv", str, w, "fw_printenv")
    fw_setenv = _take(t, "fw_setenv", str, w, "fw_setenv")
    _no_extra(t, w)
    return BootloaderConfig(backend, tries, grubenv, fw_printenv, fw_setenv, nvbootctrl)


def parse(text: str, path: Path) -> SystemConfig:
    """Parse and validate; pure (no file system access beyond what `path` names in messages)."""
    where = str(path)
    try:
        t: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    compatible = _take(t, "compatible", str, where)
    if not COMPATIBLE_RE.fullmatch(compatible):
        raise ConfigError(f"{where}: compatible must be 1-128 printable ASCII characters without spaces")
    data_dir = Path(_take(t, "data_dir", str, where, "/data"))
    keyring = Path(_take(t, "keyring", str, where, "/etc/pitstop/keyring.pem"))
    clock_name = _take(t, "clock", str, where, ClockPolicy.FLOOR.value)
    try:
        clock = ClockPolicy(clock_name)
    except ValueError:
        raise ConfigError(f"{where}: clock must be one of {', '.join(c.value for c in ClockPolicy)}") from None
    booted = _take(t, "booted_slot", str, where, "auto")
    cmdline = Path(_take(t, "cmdline", str, where, "/proc/cmdline"))
    boot_id = Path(_take(t, "boot_id", str, where, "/proc/sys/kernel/random/boot_id"))
    bootloader = _bootloader(t.pop("bootloader", None), where)
    slots = _slots(t.pop("slot", None), where)
    _no_extra(t, where)
    if not data_dir.is_absolute() or not keyring.is_absolute():
        raise ConfigError(f"{where}: data_dir and keyring must be absolute paths")
    if booted != "auto" and booted not in {s.name for s in slots}:
        raise ConfigError(f"{where}: booted_slot {booted!r} is not a slot name (or 'auto')")
    if bootloader.backend == "grub" and {s.boot_name for s in slots} != GRUB_BOOT_NAMES:
        raise ConfigError(
            f"{where}: with the grub backend the slots' boot names must be 'a' and 'b' "
            "(the names ota/grub/grub.cfg knows)"
        )
    if bootloader.backend == "nvbootctrl" and {s.boot_name for s in slots} not in NVBOOTCTRL_BOOT_NAMES:
        raise ConfigError(
            f"{where}: with the nvbootctrl backend the slots' boot names must be 'A' and 'B' "
            "(or '0' and '1'), the names nvbootctrl gives the rootfs slots"
        )
    return SystemConfig(
        path,
        compatible,
        data_dir,
        keyring,
        clock,
        bootloader,
        slots,
        None if booted == "auto" else booted,
        cmdline,
        boot_id,
    )


def default_path() -> Path:
    return Path(os.environ.get("PITSTOP_CONFIG", DEFAULT_PATH))


def load(path: Path | None = None) -> SystemConfig:
    path = Path(path) if path is not None else default_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no system configuration (see docs/system-config.md)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse(text, path)
