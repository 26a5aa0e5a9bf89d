"""A stand-in for NVIDIA's Jetson BSP (Linux_for_Tegra) whose tools record their argv, environment and working
directory, and excerpts of NVIDIA's A/B layouts: shared by the Jetson flashing and image tests. No real BSP and
no Jetson are involved."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pitstop.image.jetson import Host

# Excerpt of NVIDIA's tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml as shipped in L4T R36.2.0 (mirror of
# the BSP: https://github.com/johnnynunez/Linux_for_Tegra/blob/9a5768c1a17df30489bdb6359d8c66a85b020e82/
# tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml), trimmed to the partitions the tests need; element and
# attribute names, sizes and placeholders as published. Elements the tests do not read (allocation_policy,
# filesystem_type, descriptions, ...) are left out of most partitions.
NVME_AB_LAYOUT = b"""<?xml version="1.0"?>
<!-- excerpt of NVIDIA's flash_l4t_t234_nvme_rootfs_ab.xml (L4T R36.2.0) -->
<partition_layout version="01.00.0000">
    <device type="external" instance="0" sector_size="512" num_sectors="EXT_NUM_SECTORS" >
        <partition name="A_kernel" id="3" type="kernel">
            <allocation_policy> sequential </allocation_policy>
            <size> 134217728 </size>
            <filename> LNXFILE </filename>
        </partition>
        <partition name="A_kernel-dtb" type="kernel_dtb">
            <size> 786432 </size>
        </partition>
        <partition name="B_kernel" type="kernel">
            <size> 134217728 </size>
        </partition>
        <partition name="B_kernel-dtb" type="kernel_dtb">
            <size> 786432 </size>
        </partition>
        <partition name="esp" type="data">
            <size> 67108864 </size>
            <partition_type_guid> C12A7328-F81F-11D2-BA4B-00A0C93EC93B </partition_type_guid>
        </partition>
        <partition name="esp_alt" type="data">
            <size> 67108864 </size>
        </partition>
        <partition name="UDA" type="data">
            <size> 419430400 </size>
            <align_boundary> 16384 </align_boundary>
        </partition>
        <partition name="APP" id="1" type="data">
            <allocation_policy> sequential </allocation_policy>
            <size> APPSIZE </size>
            <align_boundary> 16384 </align_boundary>
            <unique_guid> APPUUID </unique_guid>
            <filename> APPFILE </filename>
        </partition>
        <partition name="APP_b" id="2" type="data">
            <allocation_policy> sequential </allocation_policy>
            <size> APPSIZE </size>
            <align_boundary> 16384 </align_boundary>
            <unique_guid> APPUUID_b </unique_guid>
            <filename> APPFILE_b </filename>
        </partition>
        <partition name="secondary_gpt" type="secondary_gpt">
            <size> 0xFFFFFFFFFFFFFFFF </size>
        </partition>
    </device>
</partition_layout>
"""

# Excerpt of NVIDIA's bootloader/generic/cfg/flash_t234_qspi_sdmmc_rootfs_ab.xml (L4T R36.2.0, same mirror): the
# QSPI device first, then the eMMC (sdmmc_user) device that holds the rootfs slots.
EMMC_AB_LAYOUT = b"""<?xml version="1.0"?>
<partition_layout version="01.00.0000">
    <device type="spi" instance="0" sector_size="512" num_sectors="131072" >
        <partition name="BCT" type="boot_config_table">
            <size> 262144 </size>
        </partition>
        <partition name="A_mb1" type="mb1_bootloader">
            <size> 262144 </size>
        </partition>
    </device>
    <device type="sdmmc_user" instance="3" sector_size="512" num_sectors="INT_NUM_SECTORS" >
        <partition name="A_kernel" id="3" type="data"><size> 134217728 </size></partition>
        <partition name="A_kernel-dtb" type="kernel_dtb"><size> 786432 </size></partition>
        <partition name="B_kernel" type="data"><size> 134217728 </size></partition>
        <partition name="B_kernel-dtb" type="kernel_dtb"><size> 786432 </size></partition>
        <partition name="esp" type="data"><size> 67108864 </size></partition>
        <partition name="esp_alt" type="data"><size> 67108864 </size></partition>
        <partition name="APP" id="1" type="data">
            <size> APPSIZE </size>
            <align_boundary> 16384 </align_boundary>
        </partition>
        <partition name="APP_b" id="2" type="data">
            <size> APPSIZE </size>
            <align_boundary> 16384 </align_boundary>
        </partition>
    </device>
</partition_layout>
"""

# The single-rootfs layout (flash_l4t_t234_nvme.xml style): APP and no slot B. Not an A/B layout.
NVME_SINGLE_LAYOUT = b"""<?xml version="1.0"?>
<partition_layout version="01.00.0000">
    <device type="external" instance="0" sector_size="512" num_sectors="EXT_NUM_SECTORS" >
        <partition name="A_kernel" id="2" type="kernel"><size> 134217728 </size></partition>
        <partition name="esp" type="data"><size> 67108864 </size></partition>
        <partition name="APP" id="1" type="data">
            <size> APPSIZE </size>
            <align_boundary> 16384 </align_boundary>
        </partition>
    </device>
</partition_layout>
"""

# The commands as NVIDIA documents them, written out: README_initrd_flash.txt Workflow 5 (ROOTFS_AB=1, -S, -c,
# rootdev external) with the Quick Start's NVMe options; flash.sh's ROOTFS_RETRY_COUNT_MAX (1 to 3).
# --- the fake BSP ----------------------------------------------------------------------------------------------------

RECORDER = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps({{"tool": {name!r}, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}) + "\\n")
{extra}
sys.exit({status})
"""

# What NVIDIA's apply_binaries.sh leaves that matters here: its bootloader-config unit, linked and enabled.
APPLY_EXTRA = """
root = os.path.join(os.getcwd(), "rootfs")
unit = "/opt/nvidia/l4t-bootloader-config/nv-l4t-bootloader-config.service"
os.makedirs(root + os.path.dirname(unit), exist_ok=True)
open(root + unit, "w").write("[Service]\\nExecStart=" + os.path.dirname(unit) + "/nv-l4t-bootloader-config.sh -v\\n")
os.makedirs(root + "/etc/systemd/system/multi-user.target.wants", exist_ok=True)
os.symlink(unit, root + "/etc/systemd/system/nv-l4t-bootloader-config.service")
os.symlink(unit, root + "/etc/systemd/system/multi-user.target.wants/nv-l4t-bootloader-config.service")
open(root + "/nvidia-userspace", "w").write("applied\\n")
"""


def _tool(path: Path, log: Path, *, status: int = 0, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER.format(python=sys.executable, log=str(log), name=path.name, extra=extra, status=status))
    path.chmod(0o755)


def make_bsp(tmp: Path, *, release: tuple[str, str, str] = ("36", "2", "0"), flash_status: int = 0) -> Path:
    """A Linux_for_Tegra with the layout of NVIDIA's R36.2.0 BSP; its tools record to tmp/calls.jsonl."""
    bsp = tmp / "Linux_for_Tegra"
    log = tmp / "calls.jsonl"
    _tool(bsp / "flash.sh", log, status=flash_status)
    _tool(bsp / "apply_binaries.sh", log, extra=APPLY_EXTRA)
    _tool(bsp / "tools/kernel_flash/l4t_initrd_flash.sh", log, status=flash_status)
    for d in ("bootloader/generic/cfg", "kernel", "rootfs", "nv_tegra", "tools/kernel_flash"):
        (bsp / d).mkdir(parents=True, exist_ok=True)
    (bsp / "rootfs/README.txt").write_text("Download and extract the sample filesystem to this directory.\n")
    branch, major, minor = release
    (bsp / "nv_tegra/bsp_version").write_text(
        f'BSP_BRANCH={branch}\nBSP_MAJOR={major}\nBSP_MINOR={minor}\nBSP_VERSION="${{BSP_BRANCH}}.${{BSP_MAJOR}}"\n'
    )
    # As in the BSP: the board names are links to the module/carrier configurations.
    (bsp / "p3768-0000-p3767-0000-a0.conf").write_text("source p3767.conf.common\n")
    (bsp / "jetson-orin-nano-devkit.conf").symlink_to("p3768-0000-p3767-0000-a0.conf")
    (bsp / "p3737-0000-p3701-0000.conf").write_text("source p3701.conf.common\n")
    (bsp / "jetson-agx-orin-devkit.conf").symlink_to("p3737-0000-p3701-0000.conf")
    (bsp / "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml").write_bytes(NVME_AB_LAYOUT)
    (bsp / "bootloader/generic/cfg/flash_t234_qspi_sdmmc_rootfs_ab.xml").write_bytes(EMMC_AB_LAYOUT)
    (bsp / "bootloader/generic/cfg/flash_t234_qspi.xml").write_text("<partition_layout/>\n")
    return bsp


def make_tree(tmp: Path) -> Path:
    tree = tmp / "rootfs-tree"
    (tree / "etc/pitstop").mkdir(parents=True)
    (tree / "etc/pitstop/system.toml").write_text('compatible = "acme-orin-nano"\n')
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_text("#!/bin/sh\n")
    (tree / "usr/bin/tool").chmod(0o755)
    (tree / "sbin").symlink_to("usr/sbin")
    return tree


def make_host(tmp: Path, *, euid: int = 0, product: str | None = "7523", machine: str = "aarch64") -> Host:
    usb = tmp / "sys-usb"
    usb.mkdir(exist_ok=True)
    (usb / "usb1").mkdir(exist_ok=True)
    (usb / "usb1/idVendor").write_text("1d6b\n")  # a root hub
    (usb / "usb1/idProduct").write_text("0002\n")
    if product is not None:
        (usb / "1-3").mkdir(exist_ok=True)
        (usb / "1-3/idVendor").write_text("0955\n")
        (usb / "1-3/idProduct").write_text(f"{product}\n")
    return Host(euid=euid, machine=machine, usb_devices=usb, qemu_static=tmp / "no-qemu-aarch64-static")


def calls(tmp: Path) -> list[dict[str, object]]:
    log = tmp / "calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def sudo_env(tmp: Path) -> dict[str, str]:
    """An environment whose `sudo` runs the command with the given assignments, as sudo does (not as root)."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "sudo").write_text('#!/bin/sh\nexec env "$@"\n')
    (bindir / "sudo").chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(tmp)}
