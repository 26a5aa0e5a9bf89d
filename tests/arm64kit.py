"""arm64 VMs for the image tests: tests/vm's `Vm` on qemu-system-aarch64's virt machine with AAVMF."""

from __future__ import annotations

import shutil
from pathlib import Path

from vm.qemu import Vm

from pitstop.errors import InputError
from pitstop.image import qemu


def aarch64_missing() -> str | None:
    """Why an arm64 VM cannot boot here, or None."""
    if shutil.which("qemu-system-aarch64") is None:
        return "qemu-system-aarch64 missing (apt package qemu-system-arm)"
    try:
        qemu.firmware("arm64")
    except InputError as e:
        return e.message
    return None


class Arm64Vm(Vm):
    """`Vm` booting `opts` (arch arm64) with a fresh copy of AAVMF's variables: the virt machine's second flash
    is 64 MiB, OVMF's variables (what `Vm` copies) do not fit it."""

    def __init__(
        self,
        disk: Path,
        workdir: Path,
        *,
        opts: qemu.BootOptions,
        name: str = "arm64",
        limit: float = 300.0,
        console_input: bool = False,
    ) -> None:
        super().__init__(disk, workdir, name=name, limit=limit, opts=opts, console_input=console_input)
        self.vars.unlink(missing_ok=True)
        self.vars = qemu.vars_copy(opts.arch, workdir / f"{name}-AAVMF_VARS.fd")
        self.argv = qemu.argv(disk, self.vars, opts)
