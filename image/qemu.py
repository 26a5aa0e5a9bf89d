"""Booting an image in QEMU: UEFI firmware (OVMF; AAVMF for arm64), the disk on virtio, the serial console,
user-mode networking. KVM only where the CPU really has vmx/svm and /dev/kvm opens; TCG otherwise (DESIGN.md
"Testing"). Used by `pitstop image boot`, the image tests and the HIL rig's virtual devices."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pitstop.errors import InputError


@dataclass(frozen=True)
class Firmware:
    qemu: str
    machine: str
    code: Path
    vars: Path


FIRMWARE = {
    "x86_64": Firmware(
        "qemu-system-x86_64",
        "q35",
        Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ),
    "aarch64": Firmware(
        "qemu-system-aarch64",
        "virt",
        Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
        Path("/usr/share/AAVMF/AAVMF_VARS.fd"),
    ),
}


# A recipe's target.arch -> QEMU's name for it (FIRMWARE's keys, `pitstop image boot --arch`).
QEMU_ARCH = {"x86_64": "x86_64", "arm64": "aarch64"}
# The CPU QEMU emulates under TCG. x86_64: `max`, as TCG's default lacks x86-64-v2 instructions that NumPy's
# wheels need. aarch64: a Cortex-A57 (ARMv8.0, enough for Debian's arm64 and the aarch64 wheels; proven in
# notes/qemu-ab-image.md): `max` adds pointer authentication, whose architected algorithm QEMU's documentation
# calls expensive to emulate.
TCG_CPU = {"x86_64": "max", "aarch64": "cortex-a57"}


def qemu_arch(arch: str) -> str:
    """QEMU's name for `arch`, given as a recipe's target.arch (arm64) or as QEMU's own (aarch64)."""
    return QEMU_ARCH.get(arch, arch)


# The user-mode network's ids: the HIL rig pulls the virtual cable with QMP `set_link` on the NIC (hil/qemu_target.py).
NETDEV_ID = "net0"
NIC_ID = "nic0"


def kvm_usable(arch: str = "x86_64", cpuinfo: str | None = None, dev: Path = Path("/dev/kvm")) -> bool:
    """KVM for a guest of the host's architecture, on a CPU that shows hardware virtualization. A /dev/kvm on
    a CPU without vmx/svm (a software nested layer) cannot run stock firmware: not usable."""
    if arch != os.uname().machine:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    if arch == "x86_64" and not any(f in cpuinfo.split() for f in ("vmx", "svm")):
        return False
    return os.access(dev, os.R_OK | os.W_OK)


@dataclass(frozen=True)
class BootOptions:
    arch: str = "x86_64"
    memory_mib: int = 1024
    cpus: int = 1
    kvm: bool | None = None  # None: when usable
    network: bool = True
    ssh_port: int | None = None  # host port forwarded to the guest's 22
    snapshot: bool = False  # writes go to a temporary overlay, the image stays as it is
    extra_disks: tuple[Path, ...] = ()


def vars_copy(arch: str, dest: Path) -> Path:
    """A private copy of the firmware variables: a fresh NVRAM for each machine (notes/qemu-ab-image.md)."""
    fw = firmware(arch)
    shutil.copyfile(fw.vars, dest)
    return dest


def firmware(arch: str) -> Firmware:
    fw = FIRMWARE.get(qemu_arch(arch))
    if fw is None:
        raise InputError(f"no QEMU firmware known for {arch}")
    for p in (fw.code, fw.vars):
        if not p.is_file():
            raise InputError(f"{p} is missing: install the UEFI firmware package (ovmf, qemu-efi-aarch64)")
    return fw


def argv(image: Path, nvram: Path, opts: BootOptions = BootOptions()) -> list[str]:
    """QEMU's command line for `image` (raw disk) with the serial console on stdio."""
    arch = qemu_arch(opts.arch)
    fw = FIRMWARE[arch]
    kvm = kvm_usable(arch) if opts.kvm is None else opts.kvm
    cmd = [fw.qemu, "-machine", fw.machine, "-accel", "kvm" if kvm else "tcg"]
    cpu = "host" if kvm else TCG_CPU.get(arch, "max")
    cmd += ["-cpu", cpu, "-m", str(opts.memory_mib), "-smp", str(opts.cpus), "-nographic"]
    cmd += [
        "-drive", f"if=pflash,format=raw,readonly=on,file={fw.code}",
        "-drive", f"if=pflash,format=raw,file={nvram}",
        "-drive", f"file={image},format=raw,if=virtio" + (",snapshot=on" if opts.snapshot else ""),
    ]  # fmt: skip
    for d in opts.extra_disks:
        cmd += ["-drive", f"file={d},format=raw,if=virtio"]
    cmd += ["-serial", "mon:stdio", "-object", "rng-random,filename=/dev/urandom,id=rng0"]
    cmd += ["-device", "virtio-rng-pci,rng=rng0"]
    if opts.network:
        fwd = f",hostfwd=tcp:127.0.0.1:{opts.ssh_port}-:22" if opts.ssh_port else ""
        # An e1000 without its option ROM: the firmware has no driver for it and leaves it alone. With
        # virtio-net, OVMF drives the NIC itself: each warm reset spent 15-25 s in the firmware here, and a
        # reboot right after a large download hung before GRUB read its configuration (TCG).
        cmd += ["-netdev", f"user,id={NETDEV_ID}{fwd}", "-device", f"e1000,netdev={NETDEV_ID},id={NIC_ID},romfile="]
    else:
        cmd += ["-nic", "none"]
    return cmd
