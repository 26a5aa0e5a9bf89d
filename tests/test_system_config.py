"""`/etc/pitstop/system.toml` (ota/system_config.py): a valid file parses; every invalid one is a ConfigError
naming the file and what is wrong, and through the CLI one line with exit code 23."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bundlekit import assert_refused, run_cli

from pitstop.ota import system_config
from pitstop.ota.clock import ClockPolicy
from pitstop.ota.system_config import BootloaderConfig, ConfigError, SlotConfig, SystemConfig

CONFIG = 23
WHERE = Path("/etc/pitstop/system.toml")

GOOD = '''
compatible = "acme-cam-x86"
data_dir = "/data"
keyring = "/etc/pitstop/keyring.pem"
clock = "floor"

[bootloader]
backend = "grub"
grubenv = "/boot/efi/EFI/BOOT/grubenv"
tries = 3

[[slot]]
name = "a"
device = "/dev/disk/by-partlabel/rootfs_a"

[[slot]]
name = "b"
device = "/dev/disk/by-partlabel/rootfs_b"
'''


def parse(text: str) -> SystemConfig:
    return system_config.parse(text, WHERE)


def test_valid() -> None:
    cfg = parse(GOOD)
    assert cfg.path == WHERE
    assert cfg.compatible == "acme-cam-x86"
    assert cfg.data_dir == Path("/data") and cfg.state_dir == Path("/data/pitstop")
    assert cfg.keyring == Path("/etc/pitstop/keyring.pem")
    assert cfg.clock == ClockPolicy.FLOOR
    assert cfg.bootloader == BootloaderConfig("grub", 3, Path("/boot/efi/EFI/BOOT/grubenv"))
    assert cfg.slots == (SlotConfig("a", Path("/dev/disk/by-partlabel/rootfs_a"), "a"),
                         SlotConfig("b", Path("/dev/disk/by-partlabel/rootfs_b"), "b"))
    assert cfg.booted_slot is None  # auto: from the kernel command line
    assert cfg.cmdline == Path("/proc/cmdline") and cfg.boot_id == Path("/proc/sys/kernel/random/boot_id")
    assert cfg.slot("b").device.name == "rootfs_b"
    assert cfg.slot_by_boot_name("a") == cfg.slots[0] and cfg.slot_by_boot_name("c") is None
    with pytest.raises(ConfigError, match="no slot named 'c'"):
        cfg.slot("c")


def test_defaults_and_options() -> None:
    cfg = parse('''compatible = "x"
booted_slot = "B1"
clock = "none"
cmdline = "/tmp/cmdline"
[bootloader]
backend = "uboot"
fw_printenv = "fw_printenv -c /etc/fw_env.config"
[[slot]]
name = "A1"
device = "/dev/mmcblk0p2"
boot_name = "system0"
[[slot]]
name = "B1"
device = "/dev/mmcblk0p3"
boot_name = "system1"
''')
    assert cfg.data_dir == Path("/data") and cfg.keyring == Path("/etc/pitstop/keyring.pem")
    assert cfg.clock == ClockPolicy.NONE and cfg.booted_slot == "B1" and cfg.cmdline == Path("/tmp/cmdline")
    assert cfg.bootloader == BootloaderConfig("uboot", 3, None, "fw_printenv -c /etc/fw_env.config", "fw_setenv")
    assert cfg.slot_by_boot_name("system1") == cfg.slot("B1")
    g = parse(GOOD.replace('grubenv = "/boot/efi/EFI/BOOT/grubenv"\n', "").replace("tries = 3\n", ""))
    assert g.bootloader.grubenv == Path("/boot/efi/EFI/BOOT/grubenv") and g.bootloader.tries == 3
    for tries in (1, 9):
        assert parse(GOOD.replace("tries = 3", f"tries = {tries}")).bootloader.tries == tries


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


SLOT_B = '[[slot]]\nname = "b"\ndevice = "/dev/disk/by-partlabel/rootfs_b"\n'

INVALID: list[tuple[str, str, str]] = [
    ("missing compatible", edit('compatible = "acme-cam-x86"\n', ""), "missing 'compatible'"),
    ("compatible with a space", edit('"acme-cam-x86"', '"acme cam"'), "compatible must be 1-128 printable"),
    ("empty compatible", edit('"acme-cam-x86"', '""'), "compatible must be"),
    ("compatible not a string", edit('"acme-cam-x86"', "7"), "'compatible' must be a string"),
    ("bad backend", edit('backend = "grub"', 'backend = "lilo"'), "backend must be one of grub, uboot"),
    ("backend missing", edit('backend = "grub"\n', ""), "missing 'backend'"),
    ("no bootloader table", GOOD.replace("[bootloader]", "[bootloaderx]"), "missing [bootloader] table"),
    ("bootloader not a table", 'bootloader = "grub"\n' + GOOD.split("[bootloader]", maxsplit=1)[0],
     "missing [bootloader]"),
    ("tries zero", edit("tries = 3", "tries = 0"), "tries must be 1..9"),
    ("tries ten", edit("tries = 3", "tries = 10"), "tries must be 1..9"),
    ("tries negative", edit("tries = 3", "tries = -1"), "tries must be 1..9"),
    ("tries a bool", edit("tries = 3", "tries = true"), "'tries' must be a whole number"),
    ("tries a string", edit("tries = 3", 'tries = "3"'), "'tries' must be a whole number"),
    ("one slot", GOOD.replace(SLOT_B, ""), "needs exactly two [[slot]] tables"),
    ("three slots", GOOD + SLOT_B.replace('"b"', '"c"').replace("rootfs_b", "rootfs_c"), "exactly two"),
    ("no slots", GOOD.split("[[slot]]", maxsplit=1)[0], "exactly two"),
    ("slot not a table array", 'slot = "a"\n' + GOOD.split("[[slot]]", maxsplit=1)[0], "exactly two"),
    ("duplicate devices", edit("rootfs_b", "rootfs_a"), "need different names, boot names and devices"),
    ("duplicate names", edit('name = "b"', 'name = "a"'), "need different names"),
    ("duplicate boot names", edit('name = "b"', 'name = "b"\nboot_name = "a"'), "need different names"),
    ("relative device", edit('"/dev/disk/by-partlabel/rootfs_b"', '"rootfs_b.img"'), "device must be an absolute"),
    ("relative data_dir", edit('data_dir = "/data"', 'data_dir = "data"'), "must be absolute paths"),
    ("relative keyring", edit('"/etc/pitstop/keyring.pem"', '"keyring.pem"'), "must be absolute paths"),
    ("slot name with a dash", edit('name = "b"', 'name = "b-2"'), "1-16 letters, digits or '_'"),
    ("slot name too long", edit('name = "b"', 'name = "' + "b" * 17 + '"'), "1-16 letters"),
    ("empty slot name", edit('name = "b"', 'name = ""'), "1-16 letters"),
    ("slot without device", edit('device = "/dev/disk/by-partlabel/rootfs_b"\n', ""), "[[slot]] #2: missing 'device'"),
    ("unknown key", GOOD.replace("clock =", 'colour = "red"\nclock ='), "unknown key(s) colour"),
    ("unknown bootloader key", edit("tries = 3", "tries = 3\nretries = 2"), "[bootloader]: unknown key(s) retries"),
    ("unknown slot key", edit('name = "b"', 'name = "b"\nsize = 1'), "[[slot]] #2: unknown key(s) size"),
    ("bad clock", edit('clock = "floor"', 'clock = "ntp"'), "clock must be one of"),
    ("bad TOML", GOOD + "this is = = not toml\n", "not valid TOML"),
    ("bad TOML duplicate key", GOOD.replace('clock = "floor"', 'clock = "floor"\nclock = "none"'), "not valid TOML"),
    ("booted_slot not a slot", edit('clock = "floor"', 'clock = "floor"\nbooted_slot = "c"'),
     "booted_slot 'c' is not a slot name (or 'auto')"),
    ("booted_slot a boot name", edit('name = "b"', 'name = "b"\nboot_name = "B"').replace(
        'clock = "floor"', 'clock = "floor"\nbooted_slot = "B"'), "booted_slot 'B' is not a slot name"),
    ("grub boot name other than a/b", edit('name = "b"', 'name = "b"\nboot_name = "c"'),
     "boot names must be 'a' and 'b'"),
]


@pytest.mark.parametrize("name, text, message", INVALID, ids=[c[0] for c in INVALID])
def test_invalid(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    msg = exc.value.message
    assert message in msg, msg
    assert msg.startswith(str(WHERE)), msg  # names the file
    assert exc.value.exit_code == CONFIG and isinstance(exc.value, ValueError)


@pytest.fixture
def on_disk(tmp_path: Path) -> Path:
    path = tmp_path / "system.toml"
    path.write_text(GOOD)
    return path


def test_load(on_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert system_config.load(on_disk).path == on_disk
    monkeypatch.setenv("PITSTOP_CONFIG", str(on_disk))
    assert system_config.default_path() == on_disk
    assert system_config.load().compatible == "acme-cam-x86"
    monkeypatch.delenv("PITSTOP_CONFIG")
    assert system_config.default_path() == Path("/etc/pitstop/system.toml")


@pytest.mark.parametrize("command", [["status"], ["mark-good"], ["mark-bad"], ["install", "bundle.pitb"]])
def test_missing_file_through_cli(capsys: Any, tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nope" / "system.toml"
    r = run_cli(capsys, *command, "--config", missing)
    assert_refused(r, CONFIG)
    assert str(missing) in r.err and "no system configuration" in r.err


def test_missing_file_from_environment(capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PITSTOP_CONFIG", str(tmp_path / "absent.toml"))
    r = run_cli(capsys, "status")
    assert_refused(r, CONFIG)
    assert "absent.toml" in r.err


@pytest.mark.parametrize("content", [b"compatible = [", b"\xff\xfe not utf-8", GOOD.replace("tries = 3", "tries = 0")
                                     .encode()])
def test_unreadable_or_invalid_through_cli(capsys: Any, on_disk: Path, content: bytes) -> None:
    on_disk.write_bytes(content)
    r = run_cli(capsys, "status", "--config", on_disk)
    assert_refused(r, CONFIG)
    assert str(on_disk) in r.err


def test_directory_instead_of_file_through_cli(capsys: Any, tmp_path: Path) -> None:
    r = run_cli(capsys, "status", "--config", tmp_path)
    assert_refused(r, CONFIG)
    assert "cannot read" in r.err
