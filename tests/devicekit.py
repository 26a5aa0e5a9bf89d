"""A file-backed A/B device for tests: ESP directory with grubenv, two slot files, a data directory."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from bundlekit import Keys

from pitstop.ota import grubenv
from pitstop.ota.system_config import SystemConfig, load

DEFAULT_SLOT_SIZE = 8 << 20


@dataclass(frozen=True)
class TestDevice:
    __test__ = False  # not a test class, despite its name
    root: Path
    config_path: Path

    @property
    def grubenv(self) -> Path:
        return self.root / "esp" / "EFI" / "BOOT" / "grubenv"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def slot(self, name: str) -> Path:
        return self.root / f"slot_{name}.img"

    def config(self) -> SystemConfig:
        return load(self.config_path)

    def env(self) -> dict[str, str]:
        """The boot variables, without pitstop's generation markers (tests/test_grubenv.py covers those)."""
        env = grubenv.decode(self.grubenv.read_bytes())
        grubenv.check_generation(env)
        return {k: v for k, v in env.items() if k not in (grubenv.GEN_HEAD, grubenv.GEN_TAIL)}

    def set_env(self, **values: str) -> None:
        env = self.env()
        env.update(values)
        self.grubenv.write_bytes(grubenv.encode(env))

    def set_booted(self, slot: str) -> None:
        text = self.config_path.read_text()
        lines = [f'booted_slot = "{slot}"' if ln.startswith("booted_slot") else ln for ln in text.splitlines()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def set_boot_id(self, boot_id: str) -> None:
        (self.root / "boot_id").write_text(boot_id + "\n")

    def reboot(self, into: str | None = None) -> str:
        """What GRUB does at power-on (the pure model of docs/grub.md): pick a slot, spend a try; we then
        pretend that slot booted. Returns the slot booted."""
        from pitstop.ota.bootloader import env_from_vars, vars_from_env

        names = {"a": "a", "b": "b"}
        env = env_from_vars(self.env(), names)
        slot, after = env.after_boot()
        assert slot is not None
        self.set_env(**vars_from_env(after, names))
        self.set_booted(into or slot)
        self.set_boot_id(hashlib.sha256(os.urandom(8)).hexdigest()[:32])
        return slot

    def snapshot(self) -> dict[str, str]:
        """Hash of every file of the device (slots, ESP, data), for 'nothing changed' checks."""
        out = {}
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name not in ("system.toml", "boot_id"):
                out[str(p.relative_to(self.root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_symlink():
                out[str(p.relative_to(self.root))] = "->" + os.readlink(p)
        return out


def make_device(root: Path, keys: Keys, *, slot_size: int = DEFAULT_SLOT_SIZE, compatible: str = "pitstop-test",
                tries: int = 3, slot_a: bytes | None = None) -> TestDevice:
    root.mkdir(parents=True, exist_ok=True)
    esp = root / "esp" / "EFI" / "BOOT"
    esp.mkdir(parents=True)
    (root / "data").mkdir()
    (esp / "grubenv").write_bytes(grubenv.encode({"ORDER": "a b", "a_OK": "1", "a_TRY": str(tries), "b_OK": "0",
                                                  "b_TRY": "0"}))
    a = slot_a if slot_a is not None else b"factory-a" * 1000
    (root / "slot_a.img").write_bytes(a + b"\0" * (slot_size - len(a)))
    (root / "slot_b.img").write_bytes(b"\0" * slot_size)
    (root / "boot_id").write_text("boot-0\n")
    cfg = root / "system.toml"
    cfg.write_text(f'''compatible = "{compatible}"
data_dir = "{root / "data"}"
keyring = "{keys.keyring}"
clock = "floor"
booted_slot = "a"
boot_id = "{root / "boot_id"}"

[bootloader]
backend = "grub"
grubenv = "{esp / "grubenv"}"
tries = {tries}

[[slot]]
name = "a"
device = "{root / "slot_a.img"}"

[[slot]]
name = "b"
device = "{root / "slot_b.img"}"
''')
    return TestDevice(root, cfg)
