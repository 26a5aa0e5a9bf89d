"""Jetson rootfs A/B flashing (image/jetson.py): the commands and environment handed to NVIDIA's tools, the BSP
check, the A/B layout, and the run against a FAKE BSP whose scripts record their argv, environment and working
directory. The expected commands are written out literally below, from NVIDIA's documentation and the R36.2.0
BSP's scripts (cited in image/jetson.py), never computed from the code under test.

No real BSP and no Jetson are involved: NVIDIA's tools are stand-ins here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from jetsonkit import (
    EMMC_AB_LAYOUT,
    NVME_AB_LAYOUT,
    NVME_SINGLE_LAYOUT,
    calls,
    make_bsp,
    make_host,
    make_tree,
    sudo_env,
)

from pitstop.image import jetson
from pitstop.image.errors import FlashError
from pitstop.image.jetson import JetsonFlashError
from pitstop.runner import clean_env

GiB = 1 << 30

ORIN_NANO_16G = (
    "sudo ROOTFS_AB=1 ROOTFS_RETRY_COUNT_MAX=3 ./tools/kernel_flash/l4t_initrd_flash.sh --external-device nvme0n1p1"
    " -S 17179869184 -c tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml"
    " -p '-c bootloader/generic/cfg/flash_t234_qspi.xml' --showlogs --network usb0 jetson-orin-nano-devkit external"
)
ORIN_NANO_16G_ARGS = [
    "--external-device",
    "nvme0n1p1",
    "-S",
    "17179869184",
    "-c",
    "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml",
    "-p",
    "-c bootloader/generic/cfg/flash_t234_qspi.xml",
    "--showlogs",
    "--network",
    "usb0",
    "jetson-orin-nano-devkit",
    "external",
]


# --- the boards and the configuration ----------------------------------------------------------------------------


def test_boards_are_data_with_sources() -> None:
    assert set(jetson.BOARDS) == {"jetson-orin-nano-devkit", "jetson-agx-orin-devkit"}
    for b in jetson.BOARDS.values():
        assert b.sources, b.board_config
        assert all(s in jetson.SOURCES for s in b.sources)
        assert b.usb_product_ids and b.methods and b.layout
        assert b.unconfirmed, "every board says what could not be confirmed"
    nano = jetson.board("jetson-orin-nano-devkit")
    assert (nano.storage, nano.external_device, nano.rootdev) == ("nvme", "nvme0n1p1", "external")
    assert nano.qspi_config == "bootloader/generic/cfg/flash_t234_qspi.xml"
    agx = jetson.board("jetson-agx-orin-devkit")
    assert (agx.storage, agx.rootdev, agx.methods[0]) == ("emmc", "internal", "flash.sh")
    with pytest.raises(JetsonFlashError, match="unknown Jetson board 'jetson-tx2'"):
        jetson.board("jetson-tx2")


def test_error_type_and_exit_code() -> None:
    # 30-34 are all taken in image/errors.py: the flash error's code is reused.
    assert issubclass(JetsonFlashError, FlashError)
    assert JetsonFlashError.exit_code == FlashError.exit_code == 32


def test_orin_nano_nvme_command() -> None:
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    assert cfg.command_line() == ORIN_NANO_16G
    assert list(cfg.argv) == ["./tools/kernel_flash/l4t_initrd_flash.sh", *ORIN_NANO_16G_ARGS]
    assert cfg.environment == {"ROOTFS_AB": "1", "ROOTFS_RETRY_COUNT_MAX": "3"}
    assert (cfg.method, cfg.slot_size, cfg.requested_slot_size) == ("initrd", 16 * GiB, 16 * GiB)
    # ROOTFSSIZE is never passed through the environment: the board's .conf overwrites it; -S sets it.
    assert "ROOTFSSIZE" not in cfg.environment


def test_agx_orin_emmc_commands() -> None:
    cfg = jetson.flash_config("jetson-agx-orin-devkit", 20 * GiB, retry_count_max=2)
    assert cfg.command_line() == (
        "sudo ROOTFS_AB=1 ROOTFS_RETRY_COUNT_MAX=2 ./flash.sh -S 21474836480 jetson-agx-orin-devkit internal"
    )
    assert cfg.layout == "bootloader/generic/cfg/flash_t234_qspi_sdmmc_rootfs_ab.xml"
    initrd = jetson.flash_config("jetson-agx-orin-devkit", 20 * GiB, retry_count_max=2, method="initrd")
    assert initrd.command_line() == (
        "sudo ROOTFS_AB=1 ROOTFS_RETRY_COUNT_MAX=2 ./tools/kernel_flash/l4t_initrd_flash.sh"
        " -p '-S 21474836480' jetson-agx-orin-devkit internal"
    )


@pytest.mark.parametrize("count", [1, 2, 3])
def test_retry_count_in_nvidia_range(count: int) -> None:
    cfg = jetson.flash_config("jetson-orin-nano-devkit", GiB, retry_count_max=count)
    assert cfg.environment["ROOTFS_RETRY_COUNT_MAX"] == str(count)


@pytest.mark.parametrize("count", [0, 4, -1, 255])
def test_retry_count_out_of_range_refused(count: int) -> None:
    with pytest.raises(JetsonFlashError, match="ROOTFS_RETRY_COUNT_MAX must be 1 to 3"):
        jetson.flash_config("jetson-orin-nano-devkit", GiB, retry_count_max=count)


def test_slot_size_rounded_to_alignment() -> None:
    assert jetson.slot_size(16 * GiB) == 16 * GiB
    assert jetson.slot_size(10**9) == 61036 * 16384 == 1000013824
    assert jetson.slot_size(1) == 16384
    assert jetson.slot_size(10**9, align=1 << 20) == 954 * (1 << 20)
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 10**9)
    assert (cfg.requested_slot_size, cfg.slot_size) == (10**9, 1000013824)
    assert "-S 1000013824" in cfg.command_line()
    for bad in (0, -5):
        with pytest.raises(JetsonFlashError, match="must be positive"):
            jetson.slot_size(bad)


def test_wrong_method_or_layout_refused() -> None:
    with pytest.raises(JetsonFlashError, match=r"flashed with initrd, not flash\.sh"):
        jetson.flash_config("jetson-orin-nano-devkit", GiB, method="flash.sh")
    # flash.sh takes a replacement for the .conf's layout with its own -c (R36.2.0 flash.sh: `c) CFGFILE=${OPTARG}`).
    agx = jetson.flash_config("jetson-agx-orin-devkit", 20 * GiB, layout="/out/emmc.pitstop.xml")
    assert agx.command_line() == (
        "sudo ROOTFS_AB=1 ROOTFS_RETRY_COUNT_MAX=3 ./flash.sh -c /out/emmc.pitstop.xml -S 21474836480 "
        "jetson-agx-orin-devkit internal"
    )
    agx = jetson.flash_config("jetson-agx-orin-devkit", 20 * GiB, layout="/out/emmc.pitstop.xml", method="initrd")
    assert agx.argv[1:3] == ("-p", "-c /out/emmc.pitstop.xml -S 21474836480")
    cfg = jetson.flash_config("jetson-orin-nano-devkit", GiB, layout="/out/flash_l4t_t234_nvme_rootfs_ab.pitstop.xml")
    assert cfg.argv[cfg.argv.index("-c") + 1] == "/out/flash_l4t_t234_nvme_rootfs_ab.pitstop.xml"


def test_config_to_dict_is_json() -> None:
    d = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB).to_dict()
    again = json.loads(json.dumps(d))
    assert again["argv"][1:] == ORIN_NANO_16G_ARGS
    assert again["env"] == {"ROOTFS_AB": "1", "ROOTFS_RETRY_COUNT_MAX": "3"}
    assert again["units_to_mask"] == ["nv-l4t-bootloader-config.service"]
    assert again["sources"] and again["unconfirmed"]


def test_flash_env_text() -> None:
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB, retry_count_max=1)
    assert jetson.render_flash_env(cfg) == (
        "# pitstop: rootfs A/B flash of jetson-orin-nano-devkit (R36.x (JetPack 6); read from R36.2.0)\n"
        "ROOTFS_AB=1\n"
        "ROOTFS_RETRY_COUNT_MAX=1\n"
    )


def test_flash_script_text() -> None:
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    script = jetson.render_flash_script(cfg)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert "set -eu" in lines
    assert 'cd "$l4t"' in lines
    order = [
        'else sudo cp -a --reflink=auto "$tree"/. rootfs/',
        "sudo ./apply_binaries.sh",
        "sudo ln -s /dev/null rootfs/etc/systemd/system/nv-l4t-bootloader-config.service",
        ORIN_NANO_16G,
    ]
    assert [lines.index(x) for x in order] == sorted(lines.index(x) for x in order)
    assert lines[-1] == ORIN_NANO_16G
    assert "l4t_create_default_user" not in script
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)


# --- the BSP check -------------------------------------------------------------------------------------------------


def test_check_bsp_complete(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    for b in jetson.BOARDS.values():
        assert jetson.check_bsp(bsp, b) == []
    assert jetson.bsp_release(bsp) == "36.2.0"


def test_check_bsp_without_bsp_lists_every_item(tmp_path: Path) -> None:
    nano = jetson.board("jetson-orin-nano-devkit")
    missing = jetson.check_bsp(tmp_path / "Linux_for_Tegra", nano)
    expected = [
        "flash.sh",
        "apply_binaries.sh",
        "tools/kernel_flash/l4t_initrd_flash.sh",
        "bootloader",
        "kernel",
        "rootfs",
        "nv_tegra",
        "jetson-orin-nano-devkit.conf",
        "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml",
        "bootloader/generic/cfg/flash_t234_qspi.xml",
    ]
    assert len(missing) == len(expected)
    for line, rel in zip(missing, expected, strict=True):
        assert line.startswith(f"{tmp_path / 'Linux_for_Tegra' / rel}: missing (")
        assert "R36.x (JetPack 6)" in line
        assert "https://developer.nvidia.com/embedded/jetson-linux-archive" in line
        assert "\n" not in line
    generic = jetson.check_bsp(tmp_path / "Linux_for_Tegra")
    assert len(generic) == 7


def test_check_bsp_one_gap_one_line(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    (bsp / "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml").unlink()
    (bsp / "nv_tegra/bsp_version").unlink()
    (bsp / "nv_tegra").rmdir()
    (bsp / "nv_tegra").write_text("not a directory\n")
    (bsp / "p3737-0000-p3701-0000.conf").unlink()  # jetson-agx-orin-devkit.conf: a dangling link
    nano = jetson.check_bsp(bsp, jetson.board("jetson-orin-nano-devkit"))
    assert [line.split(": ")[0] for line in nano] == [
        str(bsp / "nv_tegra"),
        str(bsp / "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml"),
    ]
    assert ": not a directory (" in nano[0]
    agx = jetson.check_bsp(bsp, jetson.board("jetson-agx-orin-devkit"))
    assert any(line.startswith(f"{bsp / 'jetson-agx-orin-devkit.conf'}: missing") for line in agx)


def test_check_bsp_io_is_the_probe_only() -> None:
    seen: list[Path] = []

    def probe(p: Path) -> None:
        seen.append(p)

    missing = jetson.check_bsp(Path("/nowhere/L4T"), jetson.board("jetson-agx-orin-devkit"), probe=probe)
    assert len(missing) == len(seen) == 9


# --- the layout -----------------------------------------------------------------------------------------------------


def test_parse_nvidia_nvme_ab_layout() -> None:
    report = jetson.check_layout(NVME_AB_LAYOUT)
    assert report.device_type == "external"
    assert report.missing == ()
    app, app_b = report.partition("APP"), report.partition("APP_b")
    assert app is not None and app_b is not None
    assert (app.id, app.size, app.size_bytes, app.align_boundary) == ("1", "APPSIZE", None, 16384)
    assert (app_b.id, app_b.size, app_b.size_bytes) == ("2", "APPSIZE", None)
    esp = report.partition("esp")
    assert esp is not None and esp.size_bytes == 67108864
    gpt = report.partition("secondary_gpt")
    assert gpt is not None and gpt.size_bytes == 0xFFFFFFFFFFFFFFFF
    assert report.align == 16384
    summary = report.summary()
    assert summary[0] == "A_kernel (id 3): 134217728 bytes"
    assert "APP (id 1): APPSIZE (a placeholder NVIDIA's scripts fill in)" in summary
    patched = jetson.parse_layout(jetson.patch_layout(NVME_AB_LAYOUT, 8 * GiB)).summary()
    assert "APP_b (id 2): 8589934592 bytes" in patched


def test_parse_nvidia_emmc_ab_layout_finds_the_rootfs_device() -> None:
    report = jetson.check_layout(EMMC_AB_LAYOUT)
    assert report.device_type == "sdmmc_user"
    assert report.partition("BCT") is None  # the QSPI device is not the rootfs device
    assert [p.name for p in report.partitions][-2:] == ["APP", "APP_b"]


def test_single_rootfs_layout_refused() -> None:
    report = jetson.parse_layout(NVME_SINGLE_LAYOUT)
    assert report.missing == ("APP_b", "A_kernel-dtb", "B_kernel", "B_kernel-dtb", "esp_alt")
    with pytest.raises(JetsonFlashError, match="not NVIDIA's rootfs A/B layout: no APP_b, A_kernel-dtb"):
        jetson.check_layout(NVME_SINGLE_LAYOUT)
    with pytest.raises(JetsonFlashError, match="no APP_b"):
        jetson.patch_layout(NVME_SINGLE_LAYOUT, 16 * GiB)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (b"<partition_layout><device", "not valid XML"),
        (b"<bmap version='2.0'/>", "not <partition_layout>"),
        (b"<partition_layout><device type='spi'><partition name='BCT'/></device></partition_layout>", "no device"),
        (b"<partition_layout>" + b" " * jetson.MAX_LAYOUT_BYTES + b"</partition_layout>", "limit"),
    ],
)
def test_not_a_layout_refused(xml: bytes, message: str) -> None:
    with pytest.raises(JetsonFlashError, match=message):
        jetson.parse_layout(xml)


def test_patch_layout_sets_both_slots_only() -> None:
    original = bytes(NVME_AB_LAYOUT)
    patched = jetson.patch_layout(NVME_AB_LAYOUT, 16 * GiB)
    assert original == NVME_AB_LAYOUT
    before = jetson.parse_layout(NVME_AB_LAYOUT)
    after = jetson.check_layout(patched)
    for p in after.partitions:
        if p.name in ("APP", "APP_b"):
            assert (p.size, p.size_bytes) == (str(16 * GiB), 16 * GiB)
        else:
            assert p == before.partition(p.name)
    # Byte for byte NVIDIA's file but for the two sizes: notice, declaration, formatting, placeholders kept.
    assert patched.replace(b"<size> 17179869184 </size>", b"<size> APPSIZE </size>") == NVME_AB_LAYOUT
    assert patched.count(b"<size> 17179869184 </size>") == 2
    assert b"excerpt of NVIDIA's flash_l4t_t234_nvme_rootfs_ab.xml" in patched  # comments kept
    assert b"<unique_guid> APPUUID_b </unique_guid>" in patched  # NVIDIA's placeholders left to NVIDIA's scripts
    with pytest.raises(JetsonFlashError, match="not a multiple of its align_boundary 16384"):
        jetson.patch_layout(NVME_AB_LAYOUT, 16 * GiB + 512)


def test_patch_layout_sets_the_data_partition() -> None:
    patched = jetson.patch_layout(NVME_AB_LAYOUT, 16 * GiB, data_size=4 * GiB)
    after = jetson.check_layout(patched)
    uda = after.partition("UDA")
    assert uda is not None and uda.size_bytes == 4 * GiB  # NVIDIA's is 419430400 (400 MiB)
    assert patched.replace(b"<size> 4294967296 </size>", b"<size> 419430400 </size>") == jetson.patch_layout(
        NVME_AB_LAYOUT, 16 * GiB
    )
    with pytest.raises(JetsonFlashError, match=r"UDA: .* not a multiple of its align_boundary 16384"):
        jetson.patch_layout(NVME_AB_LAYOUT, 16 * GiB, data_size=4 * GiB + 512)
    no_uda = NVME_AB_LAYOUT.replace(b'name="UDA"', b'name="UDX"')
    with pytest.raises(JetsonFlashError, match="no UDA partition"):
        jetson.patch_layout(no_uda, 16 * GiB, data_size=4 * GiB)


def test_write_patched_layout_never_edits_the_bsp(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    nano = jetson.board("jetson-orin-nano-devkit")
    src = bsp / nano.layout
    before = src.read_bytes()
    out = jetson.write_patched_layout(bsp, nano, 8 * GiB, tmp_path / "out")
    assert out == tmp_path / "out/flash_l4t_t234_nvme_rootfs_ab.pitstop.xml"
    assert src.read_bytes() == before
    app = jetson.check_layout(out.read_bytes()).partition("APP_b")
    assert app is not None and app.size_bytes == 8 * GiB
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 8 * GiB, layout=str(out))
    assert cfg.argv[cfg.argv.index("-c") + 1] == str(out)
    src.write_bytes(NVME_SINGLE_LAYOUT)
    with pytest.raises(JetsonFlashError, match="no APP_b"):
        jetson.write_patched_layout(bsp, nano, 8 * GiB, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# --- running NVIDIA's tools (stand-ins) ---------------------------------------------------------------------------


def test_run_flash_orin_nano_reaches_nvidia_tools_as_documented(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    tree = make_tree(tmp_path)
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    plan = jetson.run_flash(bsp, tree, cfg, dry_run=False, host=make_host(tmp_path))
    assert plan.problems == ()
    recorded = calls(tmp_path)
    assert [c["tool"] for c in recorded] == ["apply_binaries.sh", "l4t_initrd_flash.sh"]
    apply, flash = recorded
    assert apply["argv"] == []
    assert apply["cwd"] == flash["cwd"] == str(bsp)
    assert flash["argv"] == ORIN_NANO_16G_ARGS
    env = flash["env"]
    assert isinstance(env, dict)
    assert (env["ROOTFS_AB"], env["ROOTFS_RETRY_COUNT_MAX"]) == ("1", "3")
    # Exactly pitstop's clean environment plus NVIDIA's two variables: nothing of the caller's leaks in.
    assert env == clean_env({"ROOTFS_AB": "1", "ROOTFS_RETRY_COUNT_MAX": "3"})
    assert not {k for k in env if k.startswith("ROOTFS") or k in ("LDK_ROOTFS_DIR", "BOARDID")} - {
        "ROOTFS_AB",
        "ROOTFS_RETRY_COUNT_MAX",
    }
    assert apply["env"] == clean_env()
    # The tree was copied in (links kept), and apply_binaries worked on the copy only.
    rootfs = bsp / "rootfs"
    assert (rootfs / "etc/pitstop/system.toml").read_text() == 'compatible = "acme-orin-nano"\n'
    assert os.readlink(rootfs / "sbin") == "usr/sbin"
    assert os.access(rootfs / "usr/bin/tool", os.X_OK)
    assert (rootfs / "nvidia-userspace").exists()
    assert not (tree / "nvidia-userspace").exists()
    # NVIDIA's automatic commit masked after apply_binaries enabled it.
    assert os.readlink(rootfs / "etc/systemd/system/nv-l4t-bootloader-config.service") == "/dev/null"
    assert not os.path.lexists(rootfs / "etc/systemd/system/multi-user.target.wants/nv-l4t-bootloader-config.service")


def test_run_flash_agx_orin_flash_sh(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    cfg = jetson.flash_config("jetson-agx-orin-devkit", 20 * GiB, retry_count_max=2)
    jetson.run_flash(bsp, make_tree(tmp_path), cfg, dry_run=False, host=make_host(tmp_path, product="7023"))
    recorded = calls(tmp_path)
    assert [c["tool"] for c in recorded] == ["apply_binaries.sh", "flash.sh"]
    assert recorded[1]["argv"] == ["-S", "21474836480", "jetson-agx-orin-devkit", "internal"]
    assert recorded[1]["env"] == clean_env({"ROOTFS_AB": "1", "ROOTFS_RETRY_COUNT_MAX": "2"})


def test_generated_script_runs_the_same_commands(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    tree = make_tree(tmp_path)
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    script = tmp_path / "flash.sh"
    script.write_text(jetson.render_flash_script(cfg))
    env = sudo_env(tmp_path)
    subprocess.run(["sh", str(script), str(bsp), str(tree)], env=env, check=True, capture_output=True)
    apply, flash = calls(tmp_path)
    assert (apply["tool"], flash["tool"]) == ("apply_binaries.sh", "l4t_initrd_flash.sh")
    assert flash["argv"] == ORIN_NANO_16G_ARGS
    assert isinstance(flash["env"], dict)
    assert (flash["env"]["ROOTFS_AB"], flash["env"]["ROOTFS_RETRY_COUNT_MAX"]) == ("1", "3")
    rootfs = bsp / "rootfs"
    assert (rootfs / "etc/pitstop/system.toml").exists()
    assert os.readlink(rootfs / "etc/systemd/system/nv-l4t-bootloader-config.service") == "/dev/null"
    assert not os.path.lexists(rootfs / "etc/systemd/system/multi-user.target.wants/nv-l4t-bootloader-config.service")
    # A second run refuses: rootfs/ is no longer empty.
    again = subprocess.run(["sh", str(script), str(bsp), str(tree)], env=env, capture_output=True, check=False)
    assert again.returncode == 1
    assert b"rootfs/ is not empty" in again.stderr
    assert len(calls(tmp_path)) == 2


def test_dry_run_changes_nothing_and_reports(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    tree = make_tree(tmp_path)
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    host = make_host(tmp_path, euid=1000, product=None, machine="x86_64")
    plan = jetson.run_flash(bsp, tree, cfg, dry_run=True, host=host)
    assert calls(tmp_path) == []
    assert sorted(p.name for p in (bsp / "rootfs").iterdir()) == ["README.txt"]
    assert [s.argv for s in plan.steps] == [
        ("cp", "-a", "--reflink=auto", f"{tree}/.", "rootfs/"),
        ("./apply_binaries.sh",),
        (),
        ("./tools/kernel_flash/l4t_initrd_flash.sh", *ORIN_NANO_16G_ARGS),
    ]
    assert plan.steps[3].env == (("ROOTFS_AB", "1"), ("ROOTFS_RETRY_COUNT_MAX", "3"))
    assert len(plan.problems) == 3
    assert "not running as root" in plan.problems[0]
    assert "qemu-aarch64-static missing: apply_binaries.sh needs it on a x86_64 host" in plan.problems[1]
    assert "no jetson-orin-nano-devkit in recovery mode on USB (looked for 0955:7323, 0955:7423" in plan.problems[2]


def test_dry_run_without_bsp_lists_what_is_missing(tmp_path: Path) -> None:
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    plan = jetson.run_flash(tmp_path / "L4T", make_tree(tmp_path), cfg, dry_run=True, host=make_host(tmp_path))
    assert len(plan.problems) == 10
    assert all("missing" in p for p in plan.problems)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("not-root", "not running as root"),
        ("no-device", "no jetson-orin-nano-devkit in recovery mode"),
        ("wrong-device", "no jetson-orin-nano-devkit in recovery mode"),
        ("r35", "BSP release 35.4.1; jetson-orin-nano-devkit is flashed with R36.x"),
        ("no-release", "cannot read the BSP's release"),
        ("rootfs-used", "rootfs is not empty (bin)"),
        ("no-layout", "flash_l4t_t234_nvme_rootfs_ab.xml: missing"),
        ("no-tree", "the rootfs tree is not a directory"),
    ],
)
def test_preconditions_refuse_before_anything_runs(tmp_path: Path, change: str, message: str) -> None:
    bsp = make_bsp(tmp_path, release=("35", "4", "1") if change == "r35" else ("36", "2", "0"))
    tree = make_tree(tmp_path)
    host = make_host(
        tmp_path,
        euid=1000 if change == "not-root" else 0,
        product={"no-device": None, "wrong-device": "7023"}.get(change, "7523"),
    )
    if change == "no-release":
        (bsp / "nv_tegra/bsp_version").write_text("garbage\n")
    if change == "rootfs-used":
        (bsp / "rootfs/bin").mkdir()
    if change == "no-layout":
        (bsp / "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml").unlink()
    if change == "no-tree":
        tree = tmp_path / "absent"
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    with pytest.raises(JetsonFlashError, match="cannot flash") as e:
        jetson.run_flash(bsp, tree, cfg, dry_run=False, host=host)
    assert message in e.value.message
    assert calls(tmp_path) == []


def test_qemu_static_present_on_x86_host_is_enough(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    host = make_host(tmp_path, machine="x86_64")
    (tmp_path / "no-qemu-aarch64-static").write_text("")
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    assert jetson.run_flash(bsp, make_tree(tmp_path), cfg, dry_run=True, host=host).problems == ()


def test_failing_flash_tool_is_a_jetson_error(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path, flash_status=3)
    cfg = jetson.flash_config("jetson-orin-nano-devkit", 16 * GiB)
    with pytest.raises(JetsonFlashError, match=r"Jetson flash failed: .*l4t_initrd_flash.sh failed: exit status 3"):
        jetson.run_flash(bsp, make_tree(tmp_path), cfg, dry_run=False, host=make_host(tmp_path))
    assert [c["tool"] for c in calls(tmp_path)] == ["apply_binaries.sh", "l4t_initrd_flash.sh"]


def test_mask_units(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    jetson.mask_units(rootfs, jetson.UNITS_TO_MASK)  # nothing installed yet: masked all the same
    link = rootfs / "etc/systemd/system/nv-l4t-bootloader-config.service"
    assert os.readlink(link) == "/dev/null"
    jetson.mask_units(rootfs, jetson.UNITS_TO_MASK)  # again: unchanged
    assert os.readlink(link) == "/dev/null"
    # L4T's packages put their unit files into /etc/systemd/system: the file is replaced by the mask.
    link.unlink()
    link.write_text("[Service]\n")
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "nv-l4t-bootloader-config.service").symlink_to("../nv-l4t-bootloader-config.service")
    jetson.mask_units(rootfs, jetson.UNITS_TO_MASK)
    assert os.readlink(link) == "/dev/null"
    assert list(wants.iterdir()) == []
    link.unlink()
    link.mkdir()
    with pytest.raises(JetsonFlashError, match="is a directory"):
        jetson.mask_units(rootfs, jetson.UNITS_TO_MASK)
