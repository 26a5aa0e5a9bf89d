"""Bootloader backends behind one interface: read and write the boot configuration (`BootEnv`).

GRUB keeps `ORDER`, `<slot>_OK` and `<slot>_TRY` in `grubenv` on the ESP (docs/grub.md); U-Boot keeps the
same variables in its environment through `fw_printenv`/`fw_setenv`; a Jetson's UEFI keeps its own boot
state, read and changed through `nvbootctrl -t rootfs` (ota/nvbootctrl.py, docs/jetson.md). Slots are named
as in system.toml; the bootloader uses each slot's boot name.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from pitstop import crashpoint
from pitstop.atomic import atomic_file
from pitstop.ota import grubenv
from pitstop.ota.errors import BootEnvError
from pitstop.ota.nvbootctrl import NvbootctrlBackend
from pitstop.ota.slot_state import BootEnv
from pitstop.ota.system_config import SystemConfig
from pitstop.runner import run


class Bootloader(Protocol):
    def read(self) -> BootEnv: ...

    def write(self, env: BootEnv) -> None: ...


def _tries(value: str | None) -> int:
    return int(value) if value is not None and value.isdigit() and len(value) == 1 else 0


def env_from_vars(vars_: Mapping[str, str], boot_names: Mapping[str, str]) -> BootEnv:
    """`boot_names` maps boot name → slot name. Unknown names in ORDER are dropped; malformed values read
    as the safe choice (not OK, no tries)."""
    order: list[str] = []
    for b in vars_.get("ORDER", "").split():
        s = boot_names.get(b)
        if s is not None and s not in order:
            order.append(s)
    ok = {s: vars_.get(f"{b}_OK") == "1" for b, s in boot_names.items()}
    tries = {s: _tries(vars_.get(f"{b}_TRY")) for b, s in boot_names.items()}
    return BootEnv(tuple(order), ok, tries)


def vars_from_env(env: BootEnv, slot_names: Mapping[str, str]) -> dict[str, str]:
    """`slot_names` maps slot name → boot name."""
    out = {"ORDER": " ".join(slot_names[s] for s in env.order)}
    for s, b in slot_names.items():
        out[f"{b}_OK"] = "1" if env.ok.get(s, False) else "0"
        out[f"{b}_TRY"] = str(env.tries.get(s, 0))
    return out


class GrubEnvBackend:
    def __init__(self, path: Path, slot_names: Mapping[str, str]) -> None:
        self.path = Path(path)
        self.slot_names = dict(slot_names)
        self.boot_names = {b: s for s, b in slot_names.items()}

    def read_vars(self) -> dict[str, str]:
        try:
            block = self.path.read_bytes()
        except FileNotFoundError:
            raise BootEnvError(f"{self.path}: no GRUB environment (is the ESP mounted?)") from None
        except OSError as e:
            raise BootEnvError(f"{self.path}: cannot read the GRUB environment: {e.strerror}") from None
        try:
            vars_ = grubenv.decode(block)
            grubenv.check_generation(vars_)
        except BootEnvError as e:
            raise BootEnvError(f"{self.path}: {e.message}") from None
        return vars_

    def read(self) -> BootEnv:
        return env_from_vars(self.read_vars(), self.boot_names)

    def write(self, env: BootEnv) -> None:
        vars_ = self.read_vars()  # keep variables that are not ours
        generation = grubenv.check_generation(vars_) + 1
        vars_.update(vars_from_env(env, self.slot_names))
        block = grubenv.encode(grubenv.with_generation(vars_, generation))
        # Whole new file, then rename: the visible grubenv is always one complete block, old or new.
        # (The rename gives the file new blocks; GRUB finds them afresh at each save_env.)
        with atomic_file(self.path) as f:
            f.write(block[:512])
            f.flush()
            crashpoint.hit("grubenv-write")
            f.write(block[512:])
            crashpoint.hit("grubenv-write")


class UBootEnvBackend:
    """Through libubootenv's `fw_printenv`/`fw_setenv` (commands may carry options, e.g. `-c CONFIG`). With a
    redundant environment (two copies and a flag byte), fw_setenv's update is atomic: all variables in
    one script land together or not at all."""

    def __init__(self, printenv: str, setenv: str, slot_names: Mapping[str, str]) -> None:
        self.printenv = shlex.split(printenv)
        self.setenv = shlex.split(setenv)
        self.slot_names = dict(slot_names)
        self.boot_names = {b: s for s, b in slot_names.items()}

    def read(self) -> BootEnv:
        r = run([*self.printenv], check=False)
        if r.returncode != 0:
            raise BootEnvError(f"{self.printenv[0]} failed: {r.stderr.decode(errors='replace').strip()[:200]}")
        vars_: dict[str, str] = {}
        for line in r.text.splitlines():
            name, sep, value = line.partition("=")
            if sep:
                vars_[name] = value
        return env_from_vars(vars_, self.boot_names)

    def write(self, env: BootEnv) -> None:
        script = "".join(f"{k}={v}\n" for k, v in vars_from_env(env, self.slot_names).items())
        crashpoint.hit("ubootenv-write")
        run([*self.setenv, "-s", "/dev/stdin"], input=script.encode())


def backend(cfg: SystemConfig) -> Bootloader:
    slot_names = {s.name: s.boot_name for s in cfg.slots}
    bl = cfg.bootloader
    if bl.backend == "grub":
        assert bl.grubenv is not None
        return GrubEnvBackend(bl.grubenv, slot_names)
    if bl.backend == "nvbootctrl":
        return NvbootctrlBackend(bl.nvbootctrl, slot_names)
    return UBootEnvBackend(bl.fw_printenv, bl.fw_setenv, slot_names)
