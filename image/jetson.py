"""NVIDIA Jetson (L4T) with rootfs A/B: the boards, the flashing configuration for NVIDIA's tools, the check of a
BSP directory, the A/B flash layout, and the run of NVIDIA's scripts on a machine that has the BSP.

pitstop builds the rootfs; NVIDIA's Jetson Linux BSP (`Linux_for_Tegra/`) signs and writes everything else
(QSPI bootloaders, kernels, ESPs, GPT) and turns rootfs A/B on (`ROOTFS_AB=1`). This module knows no recipe:
it takes explicit parameters, and everything up to `run_flash` is pure (no I/O) or kept to existence checks
behind one small function, so the commands that reach NVIDIA's tools can be asserted byte for byte.

Nothing here was run on a Jetson or against a real BSP. Each fact carries its source below; docs/jetson-flashing.md
lists them and what could not be confirmed. Sources, cited by their key in `SOURCES`:

- `readme-initrd`: `Linux_for_Tegra/tools/kernel_flash/README_initrd_flash.txt` as shipped in L4T R36.2.0 (read
  from a mirror of the R36.2.0 BSP, github.com/johnnynunez/Linux_for_Tegra, commit 9a5768c1a17d): "Workflow 5:
  ROOTFS_AB support and boot from external device: ROOTFS_AB is supported by setting the ROOTFS_AB environment
  variable to 1", with `-S 8GiB -c ./tools/kernel_flash/flash_l4t_nvme_rootfs_ab.xml ... external`; "-S
  <APP-size> is the size of the partition that contains the operating system in bytes. KiB, MiB, GiB shorthand
  are allowed"; "--network usb0 when flashing using ethernet protocol through the usb flashing cable".
- `bsp-r36.2`: the scripts of the same R36.2.0 BSP: `flash.sh` (`process_l4t_conf_dtbo`: "Update the value of
  gNVIDIAPublicVariableGuid/RootfsRetryCountMax if ROOTFS_RETRY_COUNT_MAX is set between 1 and 3"; `-S` sets
  ROOTFSSIZE after the board's .conf is sourced), `p3767.conf.common` / `p3701.conf.common` (`ROOTFSSIZE=55GiB`,
  halved when `ROOTFS_AB=1`), `p3737-0000-p3701-0000.conf.common` (`ROOTFS_AB=1` selects
  `flash_t234_qspi_sdmmc_rootfs_ab.xml`), `tools/kernel_flash/l4t_initrd_flash.sh` (`fill_devpaths`: the USB ids
  0955:7023 "AGX Orin", 7223 "AGX Orin 32GB", 7323/7423 "Orin NX", 7523/7623 "Orin Nano"), `apply_binaries.sh`
  (`--root` defaults to `rootfs/`; copies `/usr/bin/qemu-aarch64-static` into the rootfs on a non-arm64 host),
  and the layouts `tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml`,
  `bootloader/generic/cfg/flash_t234_qspi_sdmmc_rootfs_ab.xml`, `bootloader/generic/cfg/flash_t234_qspi.xml`.
- `quickstart`: Jetson Linux Developer Guide, Quick Start, Orin Nano developer kit on NVMe:
  `sudo ./tools/kernel_flash/l4t_initrd_flash.sh --external-device nvme0n1p1
  -c tools/kernel_flash/flash_l4t_external.xml -p "-c bootloader/t186ref/cfg/flash_t234_qspi.xml" --showlogs
  --network usb0 jetson-orin-nano-devkit internal`
  (R35.5.0, https://docs.nvidia.com/jetson/archives/r35.5.0/DeveloperGuide/IN/QuickStart.html, as quoted on
  NVIDIA's forum, topic 289638); R36 moved the QSPI configuration to `bootloader/generic/cfg/` (present there in
  the R36.2.0 BSP, absent from `t186ref/`).
- `flashing-support`: Developer Guide, "Flashing Support" (R35.x, R36.x), "Before You Begin": `bootloader`,
  `kernel`, `rootfs` ("This directory starts empty. You populate it with the sample file system."), `nv_tegra`
  must be present; https://docs.nvidia.com/jetson/archives/r36.4/DeveloperGuide/SD/FlashingSupport.html
- `forum-305934`: NVIDIA forum, "Orin AGX OTA update rollback behaviour of nvbootctrl verify command", quoting the
  Developer Guide (R36): "nv-l4t-bootloader-config.service ... calls nvbootctrl verify"; "if the system failed to
  boot to rootfs, the nv-l4t-bootloader-config.service background service does not have a chance to validate
  the rootfs boot status". https://forums.developer.nvidia.com/t/orin-agx-ota-update-rollback-behaviour-of-nvbootctrl-verify-command/305934
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shlex
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pitstop import runner
from pitstop.errors import CommandError
from pitstop.image.errors import FlashError

log = logging.getLogger("pitstop.image.jetson")

SOURCES: Mapping[str, str] = {
    "readme-initrd": "Linux_for_Tegra/tools/kernel_flash/README_initrd_flash.txt, L4T R36.2.0 "
    "(https://github.com/johnnynunez/Linux_for_Tegra/blob/9a5768c1a17df30489bdb6359d8c66a85b020e82/"
    "tools/kernel_flash/README_initrd_flash.txt)",
    "bsp-r36.2": "L4T R36.2.0 BSP scripts and layouts: flash.sh, p3767.conf.common, p3701.conf.common, "
    "p3737-0000-p3701-0000.conf.common, tools/kernel_flash/l4t_initrd_flash.sh, apply_binaries.sh "
    "(https://github.com/johnnynunez/Linux_for_Tegra/tree/9a5768c1a17df30489bdb6359d8c66a85b020e82)",
    "quickstart": "Jetson Linux Developer Guide, Quick Start (R35.5.0; R36 paths under bootloader/generic/cfg) "
    "https://docs.nvidia.com/jetson/archives/r35.5.0/DeveloperGuide/IN/QuickStart.html",
    "flashing-support": "Jetson Linux Developer Guide, Flashing Support, Before You Begin "
    "https://docs.nvidia.com/jetson/archives/r36.4/DeveloperGuide/SD/FlashingSupport.html",
    "forum-305934": "NVIDIA forum topic 305934 quoting the Developer Guide on nv-l4t-bootloader-config.service "
    "https://forums.developer.nvidia.com/t/orin-agx-ota-update-rollback-behaviour-of-nvbootctrl-verify-command/305934",
}

# Where NVIDIA publishes the BSP; printed with every missing item so that a production line knows what to fetch.
BSP_DOWNLOAD = "https://developer.nvidia.com/embedded/jetson-linux-archive"

# flash.sh honours ROOTFS_RETRY_COUNT_MAX only "between 1 and 3" and silently ignores anything else
# (bsp-r36.2, flash.sh process_l4t_conf_dtbo): refuse out-of-range values instead of flashing a default.
RETRY_COUNT_MIN = 1
RETRY_COUNT_MAX = 3

# The APP and APP_b partitions of NVIDIA's R36.2.0 A/B layouts carry `<align_boundary> 16384 </align_boundary>`
# (bsp-r36.2). The unit is not stated in the text read; pitstop treats it as bytes (a slot size that is a
# multiple of it keeps APP_b aligned as well) and prefers the value of the BSP's own layout when it has one.
DEFAULT_ALIGN = 16384

# The size of NVIDIA's layout files is a few tens of KiB; anything far larger is not one.
MAX_LAYOUT_BYTES = 4 << 20

# NVIDIA's service that commits every boot: its unit runs nvbootctrl verify (forum-305934). With it active, a
# slot is committed before pitstop's health gate ran and an unhealthy update could never roll back by retry
# count. It is installed and enabled by apply_binaries (NVIDIA's debs), so it is masked after that step.
UNITS_TO_MASK: tuple[str, ...] = ("nv-l4t-bootloader-config.service",)

# Partitions NVIDIA's R36.2.0 A/B layouts have on the rootfs device (bsp-r36.2: flash_l4t_t234_nvme_rootfs_ab.xml
# and flash_t234_qspi_sdmmc_rootfs_ab.xml both carry these). R35 layouts were not read: not checked for them.
AB_PARTITIONS: tuple[str, ...] = (
    "APP",
    "APP_b",
    "A_kernel",
    "A_kernel-dtb",
    "B_kernel",
    "B_kernel-dtb",
    "esp",
    "esp_alt",
)

NVIDIA_USB_VENDOR = "0955"

Method = Literal["initrd", "flash.sh"]
INITRD_FLASH = "tools/kernel_flash/l4t_initrd_flash.sh"


class JetsonFlashError(FlashError):
    """The Jetson flashing configuration is refused (unknown board, a value out of NVIDIA's range), the BSP is
    incomplete or its layout is not an A/B layout, a precondition of NVIDIA's tools is not met, or one of them
    failed. Exit code: FlashError's (32): the 30-34 range of docs/image.md has no free code."""


@dataclass(frozen=True)
class Board:
    """A Jetson that pitstop knows how to flash with rootfs A/B, with where each fact comes from."""

    board_config: str  # the <board> argument of NVIDIA's tools: `<board_config>.conf` in Linux_for_Tegra
    description: str
    l4t_release: str  # the release line the facts were read from
    bsp_branch: str  # BSP_BRANCH of nv_tegra/bsp_version the board is flashed with
    storage: Literal["nvme", "emmc"]
    methods: tuple[Method, ...]  # first = default
    rootdev: str  # the <rootdev> argument
    layout: str  # the A/B layout, relative to Linux_for_Tegra (`-c` for an external device; else the .conf's choice)
    external_device: str | None = None
    qspi_config: str | None = None  # given to flash.sh through `-p "-c ..."`
    network: str | None = None
    showlogs: bool = False
    default_slot_gib: int = 27  # ROOTFSSIZE=55GiB halved under ROOTFS_AB=1 (`expr 55 / 2`), bsp-r36.2
    usb_product_ids: tuple[str, ...] = ()  # recovery mode: 0955:<id>
    sources: tuple[str, ...] = ()
    unconfirmed: tuple[str, ...] = ()


BOARDS: Mapping[str, Board] = {
    b.board_config: b
    for b in (
        Board(
            board_config="jetson-orin-nano-devkit",
            description="Jetson Orin Nano developer kit (P3768 carrier, P3767 module), rootfs on NVMe",
            l4t_release="R36.x (JetPack 6); read from R36.2.0",
            bsp_branch="36",
            storage="nvme",
            methods=("initrd",),
            rootdev="external",
            layout="tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml",
            external_device="nvme0n1p1",
            qspi_config="bootloader/generic/cfg/flash_t234_qspi.xml",
            network="usb0",
            showlogs=True,
            # P3767 modules on this carrier: Orin NX 16GB/8GB, Orin Nano 8GB/4GB (l4t_initrd_flash.sh fill_devpaths)
            usb_product_ids=("7323", "7423", "7523", "7623"),
            sources=("readme-initrd", "quickstart", "bsp-r36.2", "flashing-support"),
            unconfirmed=(
                "The Developer Guide's own A/B command for this board (Root File System chapter) could not be "
                "read; the command combines README_initrd_flash.txt Workflow 5 (ROOTFS_AB=1, -S, -c, external) "
                "with the Quick Start's NVMe options (--external-device nvme0n1p1, -p, --network usb0, --showlogs).",
                "--showlogs is documented by the R36.2.0 usage text as applicable to --massflash only; it is "
                "kept because the Quick Start passes it.",
            ),
        ),
        Board(
            board_config="jetson-agx-orin-devkit",
            description="Jetson AGX Orin developer kit (P3737 carrier, P3701 module), rootfs on the internal eMMC",
            l4t_release="R36.x (JetPack 6); read from R36.2.0",
            bsp_branch="36",
            storage="emmc",
            methods=("flash.sh", "initrd"),
            # With ROOTFS_AB=1 flash.sh puts root=PARTUUID on the command line whatever the rootdev (bsp-r36.2);
            # README_initrd_flash.txt: "internal" for booting from the internal device.
            rootdev="internal",
            layout="bootloader/generic/cfg/flash_t234_qspi_sdmmc_rootfs_ab.xml",
            # p3737-0000-p3701-0000.conf.common selects it when ROOTFS_AB=1; flash.sh's `-c <cfgfile>` replaces it
            # (bsp-r36.2 flash.sh: `c) CFGFILE=${OPTARG}`, `mkfilepath cfgfile "${CFGFILE}" ".../${EMMC_CFG}"`).
            usb_product_ids=("7023", "7223"),
            sources=("readme-initrd", "bsp-r36.2", "flashing-support"),
            unconfirmed=(
                "The Developer Guide's own A/B command for this board could not be read; `ROOTFS_AB=1 ./flash.sh "
                "-S <size> jetson-agx-orin-devkit internal` is derived from flash.sh and the board's .conf.",
                'With l4t_initrd_flash.sh the slot size reaches flash.sh through -p "-S <size>" ("-p <option>: '
                'Pass options to flash.sh when generating the image for internal storage"); not confirmed in '
                "NVIDIA's documentation.",
            ),
        ),
    )
}


def board(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise JetsonFlashError(f"unknown Jetson board {name!r}; known: {', '.join(sorted(BOARDS))}") from None


# --- the flashing configuration (pure) ---------------------------------------------------------------------------


def slot_size(requested: int, align: int = DEFAULT_ALIGN) -> int:
    """The size of APP and APP_b for a requested rootfs slot size: rounded up to the layout's alignment."""
    if requested <= 0:
        raise JetsonFlashError(f"rootfs slot size must be positive, not {requested}")
    if align <= 0:
        raise JetsonFlashError(f"alignment must be positive, not {align}")
    return -(-requested // align) * align


@dataclass(frozen=True)
class FlashConfig:
    """Everything NVIDIA's tools get: run from Linux_for_Tegra, as root, `env` added to the environment."""

    board: Board
    method: Method
    requested_slot_size: int
    slot_size: int  # APP and APP_b, bytes (the -S value)
    retry_count_max: int
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]  # relative to Linux_for_Tegra
    layout: str  # the layout the flash uses (BSP-relative, or the patched copy when given)
    apply_binaries_argv: tuple[str, ...] = ("./apply_binaries.sh",)
    units_to_mask: tuple[str, ...] = UNITS_TO_MASK

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.env)

    def command_line(self) -> str:
        """The flash command as NVIDIA's documentation writes it: `sudo VAR=value ./tool args`."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.env]
        return " ".join(["sudo", *assignments, shlex.join(self.argv)])

    def to_dict(self) -> dict[str, object]:
        return {
            "board": self.board.board_config,
            "l4t_release": self.board.l4t_release,
            "method": self.method,
            "requested_slot_size": self.requested_slot_size,
            "slot_size": self.slot_size,
            "retry_count_max": self.retry_count_max,
            "env": dict(self.env),
            "argv": list(self.argv),
            "layout": self.layout,
            "apply_binaries": list(self.apply_binaries_argv),
            "units_to_mask": list(self.units_to_mask),
            "sources": [SOURCES[s] for s in self.board.sources],
            "unconfirmed": list(self.board.unconfirmed),
        }


def flash_config(
    board_name: str,
    requested_slot_size: int,
    *,
    retry_count_max: int = 3,
    method: Method | None = None,
    layout: str | None = None,
    align: int = DEFAULT_ALIGN,
) -> FlashConfig:
    """The exact command line and environment for flashing `board_name` with rootfs A/B.

    `requested_slot_size`: bytes for each of APP and APP_b, rounded up to `align`. `layout`: a layout to give
    with `-c` instead of NVIDIA's (the patched copy from `patch_layout`); flash.sh takes it with its own `-c`.
    Raises JetsonFlashError for an unknown board or method, or a value outside NVIDIA's range."""
    b = board(board_name)
    if not RETRY_COUNT_MIN <= retry_count_max <= RETRY_COUNT_MAX:
        raise JetsonFlashError(
            f"ROOTFS_RETRY_COUNT_MAX must be {RETRY_COUNT_MIN} to {RETRY_COUNT_MAX} (NVIDIA's flash.sh ignores "
            f"other values), not {retry_count_max}"
        )
    chosen: Method = method or b.methods[0]
    if chosen not in b.methods:
        raise JetsonFlashError(f"{b.board_config} is flashed with {' or '.join(b.methods)}, not {chosen}")
    size = slot_size(requested_slot_size, align)
    env = (("ROOTFS_AB", "1"), ("ROOTFS_RETRY_COUNT_MAX", str(retry_count_max)))
    used_layout = layout or b.layout
    argv: list[str]
    if chosen == "flash.sh":
        # ROOTFSSIZE cannot be given through the environment: the board's .conf assigns it unconditionally and
        # flash.sh sources the .conf before it parses its options; `-S` is what sets it (bsp-r36.2).
        argv = ["./flash.sh", *(["-c", layout] if layout else []), "-S", str(size), b.board_config, b.rootdev]
    elif b.external_device is not None:
        argv = [f"./{INITRD_FLASH}", "--external-device", b.external_device, "-S", str(size), "-c", used_layout]
        if b.qspi_config:
            argv += ["-p", f"-c {b.qspi_config}"]
        if b.showlogs:
            argv.append("--showlogs")
        if b.network:
            argv += ["--network", b.network]
        argv += [b.board_config, b.rootdev]
    else:
        # Internal storage through initrd: -S of l4t_initrd_flash.sh is the external APP size, so the internal
        # one goes to flash.sh through -p (see Board.unconfirmed).
        argv = [f"./{INITRD_FLASH}", "-p", f"{f'-c {layout} ' if layout else ''}-S {size}", b.board_config, b.rootdev]
    return FlashConfig(
        board=b,
        method=chosen,
        requested_slot_size=requested_slot_size,
        slot_size=size,
        retry_count_max=retry_count_max,
        env=env,
        argv=tuple(argv),
        layout=used_layout,
    )


def render_flash_env(config: FlashConfig) -> str:
    """`flash.env`: the variables NVIDIA's tools get, one `NAME=value` a line (shell-quoted)."""
    lines = [f"# pitstop: rootfs A/B flash of {config.board.board_config} ({config.board.l4t_release})"]
    lines += [f"{k}={shlex.quote(v)}" for k, v in config.env]
    return "\n".join(lines) + "\n"


def render_flash_script(config: FlashConfig) -> str:
    """`flash.sh` for a production line: the documented steps, run from Linux_for_Tegra with the rootfs tree
    pitstop built. No default user is created (l4t_create_default_user.sh): pitstop's rootfs has its users."""
    b = config.board
    mask = []
    for unit in config.units_to_mask:
        path = f"rootfs/etc/systemd/system/{unit}"
        # As mask_units: a unit file NVIDIA's package put there is replaced by the mask.
        mask.append(f"sudo rm -f {path}")
        mask.append(f"sudo ln -s /dev/null {path}")
        mask.append(f"sudo rm -f rootfs/etc/systemd/system/*.target.wants/{unit}")
    lines = [
        "#!/bin/sh",
        f"# Generated by pitstop: rootfs A/B flash of {b.board_config} ({b.description}).",
        f"# NVIDIA Jetson Linux {b.l4t_release}; BSP: {BSP_DOWNLOAD}",
        "# Usage: flash.sh LINUX_FOR_TEGRA_DIR ROOTFS   (the device in recovery mode, USB connected)",
        "# ROOTFS: pitstop's rootfs, a directory or the .rootfs.tar of `pitstop image build`.",
        "set -eu",
        'l4t=$1 tree=$(realpath "$2")',
        'cd "$l4t"',
        "# NVIDIA: rootfs/ starts empty and is populated with the root file system.",
        "if [ -n \"$(ls -A rootfs | grep -v '^README.txt$' || true)\" ]; then",
        '    echo "rootfs/ is not empty: extract a fresh BSP" >&2',
        "    exit 1",
        "fi",
        'if [ -f "$tree" ]; then sudo tar --numeric-owner --xattrs --xattrs-include="*" -xpf "$tree" -C rootfs/',
        'else sudo cp -a --reflink=auto "$tree"/. rootfs/',
        "fi",
        "# NVIDIA's userspace (nv_tegra/) into rootfs/.",
        shlex.join(["sudo", *config.apply_binaries_argv]),
        "# Masked after apply_binaries, which installs and enables it: pitstop commits after its health gate.",
        *mask,
        config.command_line(),
    ]
    return "\n".join(lines) + "\n"


# --- the BSP -----------------------------------------------------------------------------------------------------

Probe = Callable[[Path], Literal["file", "dir"] | None]


def probe(path: Path) -> Literal["file", "dir"] | None:
    """The only I/O of `check_bsp`: what `path` is (symbolic links followed: board .confs are links)."""
    if path.is_dir():
        return "dir"
    if path.exists():
        return "file"
    return None


def bsp_requirements(b: Board | None = None) -> list[tuple[str, Literal["file", "dir"], str]]:
    """(relative path, kind, why) of what a BSP must have to flash `b` (without a board: what every flash needs)."""
    req: list[tuple[str, Literal["file", "dir"], str]] = [
        ("flash.sh", "file", "NVIDIA's flashing script"),
        ("apply_binaries.sh", "file", "adds NVIDIA's userspace to rootfs/"),
        (INITRD_FLASH, "file", "NVIDIA's initrd flashing script"),
        ("bootloader", "dir", "bootloaders and flashing tools (Flashing Support, Before You Begin)"),
        ("kernel", "dir", "kernel image, DTBs and modules (Flashing Support, Before You Begin)"),
        ("rootfs", "dir", "where the root file system goes (Flashing Support, Before You Begin)"),
        ("nv_tegra", "dir", "NVIDIA's userspace packages (Flashing Support, Before You Begin)"),
    ]
    if b is not None:
        req.append((f"{b.board_config}.conf", "file", f"the board configuration of {b.board_config}"))
        req.append((b.layout, "file", "the rootfs A/B flash layout"))
        if b.qspi_config:
            req.append((b.qspi_config, "file", "the QSPI flash configuration"))
    return req


def check_bsp(bsp: Path, b: Board | None = None, *, probe: Probe = probe) -> list[str]:
    """What is missing from the BSP directory `bsp` (Linux_for_Tegra) to flash `b`: one readable line per item
    naming the L4T release expected and where NVIDIA publishes it. Empty when nothing is missing."""
    release = b.l4t_release if b else "R36.x"
    missing = []
    for rel, kind, why in bsp_requirements(b):
        found = probe(bsp / rel)
        if found == kind:
            continue
        what = "missing" if found is None else f"not a {'directory' if kind == 'dir' else 'file'}"
        missing.append(
            f"{bsp / rel}: {what} ({why}; from NVIDIA Jetson Linux {release}, "
            f"Jetson_Linux_R36.x_aarch64.tbz2 at {BSP_DOWNLOAD})"
        )
    return missing


def bsp_release(bsp: Path) -> str | None:
    """The BSP's release (`36.2.0`) from nv_tegra/bsp_version, or None if it cannot be read."""
    try:
        text = (bsp / "nv_tegra" / "bsp_version").read_text(errors="replace")
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("BSP_BRANCH", "BSP_MAJOR", "BSP_MINOR"):
            values[key.strip()] = value.strip().strip('"')
    if len(values) != 3:
        return None
    return f"{values['BSP_BRANCH']}.{values['BSP_MAJOR']}.{values['BSP_MINOR']}"


# --- the layout --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutPartition:
    name: str
    id: str | None
    size: str  # as written: a number, a hex number, or a placeholder NVIDIA's scripts substitute (APPSIZE)
    size_bytes: int | None  # None for a placeholder
    align_boundary: int | None


@dataclass(frozen=True)
class LayoutReport:
    device_type: str  # the <device type=...> holding APP
    partitions: tuple[LayoutPartition, ...]
    missing: tuple[str, ...]  # required partitions the layout lacks

    def partition(self, name: str) -> LayoutPartition | None:
        return next((p for p in self.partitions if p.name == name), None)

    def summary(self) -> list[str]:
        """One line per partition: name, id, size as the layout gives it."""
        lines = []
        for p in self.partitions:
            ident = f" (id {p.id})" if p.id else ""
            if p.size_bytes is not None:
                size = f"{p.size_bytes} bytes"
            else:
                size = f"{p.size or '(none)'} (a placeholder NVIDIA's scripts fill in)"
            lines.append(f"{p.name}{ident}: {size}")
        return lines

    @property
    def align(self) -> int:
        """The alignment of APP (DEFAULT_ALIGN if the layout has none)."""
        app = self.partition("APP")
        return app.align_boundary if app and app.align_boundary else DEFAULT_ALIGN


def _int(text: str) -> int | None:
    try:
        return int(text.strip(), 0)
    except ValueError:
        return None


def _parse(xml: bytes) -> ET.Element:
    if len(xml) > MAX_LAYOUT_BYTES:
        raise JetsonFlashError(f"layout is {len(xml)} bytes; NVIDIA's are a few KiB (limit {MAX_LAYOUT_BYTES})")
    try:
        # The standard parser: no external entities or DTD fetching (expat), and the input is capped above.
        # Comments kept: the patched copy keeps NVIDIA's notices.
        parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))  # noqa: S314
        return ET.fromstring(xml, parser=parser)  # noqa: S314
    except ET.ParseError as e:
        raise JetsonFlashError(f"layout is not valid XML: {e}") from None


def _rootfs_device(root: ET.Element) -> ET.Element:
    if root.tag != "partition_layout":
        raise JetsonFlashError(f"layout's root element is <{root.tag}>, not <partition_layout>")
    for device in root.iter("device"):
        if any(p.get("name") == "APP" for p in device.iter("partition")):
            return device
    raise JetsonFlashError("layout has no device with an APP partition")


def parse_layout(xml: bytes, required: Sequence[str] = AB_PARTITIONS) -> LayoutReport:
    """The partitions of the device holding APP in an NVIDIA layout, and which `required` ones it lacks.
    Raises JetsonFlashError if it is not such a layout at all."""
    device = _rootfs_device(_parse(xml))
    parts = []
    for p in device.iter("partition"):
        size = (p.findtext("size") or "").strip()
        align = p.findtext("align_boundary")
        parts.append(
            LayoutPartition(
                name=p.get("name", ""),
                id=p.get("id"),
                size=size,
                size_bytes=_int(size),
                align_boundary=_int(align) if align is not None else None,
            )
        )
    names = {p.name for p in parts}
    return LayoutReport(
        device_type=device.get("type", ""),
        partitions=tuple(parts),
        missing=tuple(n for n in required if n not in names),
    )


def check_layout(xml: bytes, required: Sequence[str] = AB_PARTITIONS) -> LayoutReport:
    """`parse_layout`, refusing a layout that lacks any `required` partition (not an A/B layout)."""
    report = parse_layout(xml, required)
    if report.missing:
        raise JetsonFlashError(f"layout is not NVIDIA's rootfs A/B layout: no {', '.join(report.missing)} partition")
    return report


_PARTITION = re.compile(rb'(<partition\b[^>]*\bname="([^"]+)"[^>]*>)(.*?)(</partition>)', re.DOTALL)
_SIZE = re.compile(rb"<size>[^<]*</size>")

# pitstop's data partition on a Jetson: NVIDIA's UDA, "may be mounted and used to store user data" (bsp-r36.2).
DATA_PARTITION = "UDA"


def patch_layout(xml: bytes, size: int, data_size: int | None = None) -> bytes:
    """A copy of the layout with APP and APP_b `size` bytes, and UDA `data_size` bytes when given; the input is
    never changed. Refuses a size that is not a multiple of a partition's align_boundary.

    Only those `<size>` elements change, in the text itself: a copy re-serialised by ElementTree would lose
    NVIDIA's notice (a comment before the root element) and every bit of formatting."""
    sizes = {"APP": size, "APP_b": size}
    if data_size is not None:
        sizes[DATA_PARTITION] = data_size
    device = _rootfs_device(_parse(xml))
    for p in device.iter("partition"):
        name = p.get("name", "")
        if name in sizes:
            align = _int(p.findtext("align_boundary") or "")
            if align and sizes[name] % align:
                raise JetsonFlashError(f"{name}: {sizes[name]} is not a multiple of its align_boundary {align}")
    seen: list[str] = []

    def replace(m: re.Match[bytes]) -> bytes:
        name = m.group(2).decode()
        if name not in sizes:
            return m.group(0)
        seen.append(name)
        # NVIDIA writes `<size> N </size>`.
        body, n = _SIZE.subn(f"<size> {sizes[name]} </size>".encode(), m.group(3), count=1)
        if n != 1:
            raise JetsonFlashError(f"{name} has no <size>")
        return m.group(1) + body + m.group(4)

    out = _PARTITION.sub(replace, xml)
    if sorted(seen) != sorted(sizes):
        missing = sorted(set(sizes) - set(seen)) or ["(one more than once)"]
        raise JetsonFlashError(f"layout is not NVIDIA's rootfs A/B layout: no {', '.join(missing)} partition")
    return out


def write_patched_layout(bsp: Path, b: Board, size: int, out_dir: Path, data_size: int | None = None) -> Path:
    """Reads the BSP's A/B layout of `b`, checks it, and writes the copy with APP/APP_b of `size` bytes (and UDA
    of `data_size`) into `out_dir` (the BSP's file is never edited). Returns the copy's path."""
    src = bsp / b.layout
    try:
        xml = src.read_bytes()
    except OSError as e:
        raise JetsonFlashError(f"{src}: cannot read the layout: {e.strerror}") from None
    check_layout(xml)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{src.stem}.pitstop.xml"
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(patch_layout(xml, size, data_size))
    os.replace(tmp, dst)
    return dst


# --- running NVIDIA's tools --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """What the preconditions look at; `current()` on a real host, described in tests."""

    euid: int
    machine: str
    usb_devices: Path = Path("/sys/bus/usb/devices")
    qemu_static: Path = Path("/usr/bin/qemu-aarch64-static")

    @classmethod
    def current(cls) -> Host:
        return cls(euid=os.geteuid(), machine=platform.machine())


def recovery_devices(b: Board, usb_devices: Path) -> list[str]:
    """USB devices in recovery mode for `b`, as `0955:<id>` (NVIDIA's l4t_initrd_flash.sh looks for the same
    ids in the same sysfs files)."""
    found = []
    try:
        entries = sorted(usb_devices.iterdir())
    except OSError:
        return []
    for dev in entries:
        try:
            vendor = (dev / "idVendor").read_text().strip()
            product = (dev / "idProduct").read_text().strip()
        except OSError:
            continue
        if vendor == NVIDIA_USB_VENDOR and product in b.usb_product_ids:
            found.append(f"{vendor}:{product}")
    return found


def integration_problems(bsp: Path, config: FlashConfig, host: Host) -> list[str]:
    """What stops putting a rootfs into the BSP now, one line each: the BSP's gaps, its release, rootfs/ not empty,
    not root, no qemu-aarch64-static for apply_binaries on a non-arm64 host."""
    b = config.board
    problems = check_bsp(bsp, b)
    if problems:
        return problems
    release = bsp_release(bsp)
    if release is None:
        problems.append(f"{bsp}/nv_tegra/bsp_version: cannot read the BSP's release (expected {b.l4t_release})")
    elif release.split(".")[0] != b.bsp_branch:
        problems.append(f"{bsp}: BSP release {release}; {b.board_config} is flashed with {b.l4t_release}")
    leftovers = sorted(p.name for p in (bsp / "rootfs").iterdir() if p.name != "README.txt")
    if leftovers:
        problems.append(f"{bsp}/rootfs is not empty ({', '.join(leftovers[:5])}): extract a fresh BSP")
    if host.euid != 0:
        problems.append("NVIDIA's flashing tools run as root (sudo); pitstop is not running as root")
    if host.machine not in ("aarch64", "arm64") and not host.qemu_static.exists():
        problems.append(f"{host.qemu_static} missing: apply_binaries.sh needs it on a {host.machine} host")
    return problems


def flash_problems(config: FlashConfig, host: Host) -> list[str]:
    """What stops the flash itself: no Jetson of the board in recovery mode on USB."""
    b = config.board
    if recovery_devices(b, host.usb_devices):
        return []
    ids = ", ".join(f"{NVIDIA_USB_VENDOR}:{i}" for i in b.usb_product_ids)
    return [f"no {b.board_config} in recovery mode on USB (looked for {ids} in {host.usb_devices})"]


def preconditions(bsp: Path, config: FlashConfig, host: Host) -> list[str]:
    """`integration_problems`, then `flash_problems` (when the BSP is complete)."""
    problems = integration_problems(bsp, config, host)
    if problems and check_bsp(bsp, config.board):
        return problems
    return problems + flash_problems(config, host)


@dataclass(frozen=True)
class Step:
    what: str
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FlashPlan:
    steps: tuple[Step, ...]
    problems: tuple[str, ...] = field(default=())


# Where extra .debs (JetPack's CUDA, cuDNN, TensorRT) wait inside rootfs/ for `dpkg -i`; removed afterwards.
DEBS_IN_ROOTFS = "var/cache/pitstop-l4t-debs"


def mask_units(rootfs: Path, units: Sequence[str]) -> None:
    """`systemctl mask` done on the tree: /etc/systemd/system/<unit> → /dev/null, its *.wants links removed.

    A unit file at that place is replaced (systemctl would refuse): L4T's packages install their units into
    /etc/systemd/system, and the slot is an image that dpkg never upgrades in place, so nothing restores it."""
    system = rootfs / "etc" / "systemd" / "system"
    system.mkdir(parents=True, exist_ok=True)
    for unit in units:
        target = system / unit
        if target.is_dir() and not target.is_symlink():
            raise JetsonFlashError(f"{target} is a directory: cannot mask {unit}")
        if target.is_symlink() or target.exists():
            if not target.is_symlink():
                log.info("masking %s: NVIDIA's unit file at %s replaced by a link to /dev/null", unit, target)
            target.unlink()
        target.symlink_to("/dev/null")
        # Not Path.glob("*.wants/<unit>"): it skips links that dangle outside the rootfs, as these do.
        for wants in system.glob("*.wants"):
            if (wants / unit).is_symlink():
                (wants / unit).unlink()


def integration_steps(bsp: Path, rootfs_tree: Path, config: FlashConfig, debs: Sequence[Path] = ()) -> list[Step]:
    steps = [
        Step(
            f"copy {rootfs_tree} into {bsp / 'rootfs'}", ("cp", "-a", "--reflink=auto", f"{rootfs_tree}/.", "rootfs/")
        ),
        Step("add NVIDIA's userspace", config.apply_binaries_argv),
    ]
    if debs:
        names = tuple(f"/{DEBS_IN_ROOTFS}/{d.name}" for d in debs)
        steps.append(Step(f"install {len(debs)} more NVIDIA package(s)", ("chroot", "rootfs", "dpkg", "-i", *names)))
    steps.append(Step(f"mask {', '.join(config.units_to_mask)} in rootfs/"))
    return steps


def flash_step(config: FlashConfig) -> Step:
    return Step(f"flash {config.board.board_config} (rootfs A/B)", config.argv, config.env)


def integrate(
    bsp: Path, rootfs_tree: Path, config: FlashConfig, *, debs: Sequence[Path] = (), host: Host | None = None
) -> None:
    """Put `rootfs_tree` into `bsp`/rootfs the way NVIDIA's flow wants it: copied, NVIDIA's userspace added by
    apply_binaries.sh, `debs` (JetPack's CUDA, cuDNN, TensorRT…) installed with dpkg in one transaction,
    UNITS_TO_MASK masked. Every command through pitstop.runner.run, from `bsp`. A foreign rootfs needs binfmt_misc
    for aarch64 (the caller's: image/rootfs.ensure_binfmt).

    The tree is copied, not linked: apply_binaries.sh installs NVIDIA's packages into rootfs/ in place, which must
    not reach pitstop's build cache. Raises JetsonFlashError if a precondition or a step fails."""
    host = host or Host.current()
    bsp = bsp.absolute()
    problems = [] if rootfs_tree.is_dir() else [f"{rootfs_tree}: the rootfs tree is not a directory"]
    problems += integration_problems(bsp, config, host)
    problems += [f"{d}: not a .deb file" for d in debs if not (d.is_file() and d.name.endswith(".deb"))]
    if problems:
        raise JetsonFlashError("cannot put the rootfs into the BSP:\n  " + "\n  ".join(problems))
    steps = integration_steps(bsp, rootfs_tree.absolute(), config, debs)
    try:
        for step in steps:
            log.info("%s", step.what)
            if step.argv and step.argv[0] == "chroot":
                staged = bsp / "rootfs" / DEBS_IN_ROOTFS
                staged.mkdir(parents=True, exist_ok=True)
                for d in debs:
                    shutil.copy2(d, staged / d.name)
                try:
                    runner.run(step.argv, cwd=bsp, capture=False)
                finally:
                    shutil.rmtree(staged, ignore_errors=True)
            elif step.argv:
                runner.run(step.argv, cwd=bsp, capture=step.argv[0] == "cp")
            else:
                mask_units(bsp / "rootfs", config.units_to_mask)
    except CommandError as e:
        raise JetsonFlashError(f"putting the rootfs into the BSP failed: {e.message}") from e


def flash(bsp: Path, config: FlashConfig, *, host: Host | None = None) -> None:
    """Run NVIDIA's flash command of `config` from `bsp` (its rootfs/ integrated). Raises JetsonFlashError when
    no Jetson is in recovery mode or the tool fails."""
    host = host or Host.current()
    problems = flash_problems(config, host)
    if problems:
        raise JetsonFlashError("cannot flash:\n  " + "\n  ".join(problems))
    step = flash_step(config)
    log.info("%s: %s", step.what, config.command_line())
    try:
        runner.run(step.argv, env=dict(step.env), cwd=bsp.absolute(), capture=False)
    except CommandError as e:
        raise JetsonFlashError(f"Jetson flash failed: {e.message}") from e


def run_flash(
    bsp: Path,
    rootfs_tree: Path,
    config: FlashConfig,
    *,
    dry_run: bool,
    host: Host | None = None,
    debs: Sequence[Path] = (),
) -> FlashPlan:
    """`integrate` then `flash`: the whole of NVIDIA's flow for `rootfs_tree`. `dry_run`: nothing is run or
    changed; the plan comes back with the problems that would stop it. Every precondition is checked before
    anything runs. Raises JetsonFlashError if a precondition fails or a step fails."""
    host = host or Host.current()
    bsp = bsp.absolute()
    rootfs_tree = rootfs_tree.absolute()
    steps = (*integration_steps(bsp, rootfs_tree, config, debs), flash_step(config))
    problems = [] if rootfs_tree.is_dir() else [f"{rootfs_tree}: the rootfs tree is not a directory"]
    problems += preconditions(bsp, config, host)
    if dry_run:
        return FlashPlan(steps, tuple(problems))
    if problems:
        raise JetsonFlashError("cannot flash:\n  " + "\n  ".join(problems))
    integrate(bsp, rootfs_tree, config, debs=debs, host=host)
    flash(bsp, config, host=host)
    return FlashPlan(steps)
