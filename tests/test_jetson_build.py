"""`pitstop image build` for Jetson recipes (image/jetson_build.py): the recipes and their checks, the Jetson
configuration of the rootfs (nvbootctrl's system.toml, NVIDIA's UDA as the data partition), the flashing files,
the checks made before the long build, and the command line. The full build, with a stand-in BSP, is the slow
test in tests/test_image_jetson.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from imagekit import RECIPE, image_cli_run, write_recipe
from jetsonkit import NVME_AB_LAYOUT, NVME_SINGLE_LAYOUT, calls, make_bsp, make_host, make_tree, sudo_env

from pitstop.errors import UsageError
from pitstop.image import build, jetson, jetson_build, recipe, rootfs, systemconf
from pitstop.image.errors import RecipeError
from pitstop.image.jetson import JetsonFlashError
from pitstop.image.progress import Stages
from pitstop.ota import system_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "jetson-orin-nano-devkit": REPO / "recipes" / "jetson-orin-nano.toml",
    "jetson-agx-orin-devkit": REPO / "recipes" / "jetson-agx-orin.toml",
}
GiB = 1 << 30


def jetson_text(**changes: str) -> str:
    """The tests' small recipe turned into a Jetson one; `changes` replace whole lines (key = value)."""
    text = RECIPE.replace(
        'compatible = "pitstop-test-image"',
        'arch = "arm64"\nboard = "jetson-orin-nano-devkit"\nbootloader = "nvbootctrl"\n'
        'compatible = "pitstop-test-image"',
    )
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        lines.append(f"{key} = {changes.pop(key)}" if key in changes else line)
    text = "\n".join(lines) + "\n"
    for key, value in changes.items():
        text = text.replace("[partitions]\n", f"[partitions]\n{key} = {value}\n")
    return text


# --- the recipes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("board", sorted(RECIPES))
def test_jetson_recipes(board: str) -> None:
    r = recipe.load(RECIPES[board])
    assert (r.target.arch, r.target.board, r.target.bootloader) == ("arm64", board, "nvbootctrl")
    assert 1 <= r.boot.tries <= 3 and r.partitions.data is not None and r.partitions.disk is None
    pkgs = rootfs.packages(r)
    # NVIDIA's kernel and boot chain, not Debian's.
    assert not [p for p in pkgs if p.startswith(("linux-image", "grub", "initramfs-tools"))], pkgs
    assert {"python3-venv", "openssh-server", "systemd", "device-tree-compiler"} <= set(pkgs)
    cfg = jetson_build.flash_config(r)
    assert cfg.board.board_config == board
    assert cfg.slot_size == r.partitions.rootfs and cfg.retry_count_max == r.boot.tries


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"board": '"generic-uefi"'}, r"target\.board: with nvbootctrl the board is a Jetson"),
        ({"arch": '"x86_64"'}, r"target\.arch: jetson-orin-nano-devkit is arm64"),
        ({"tries": "4"}, r"boot\.tries: 4: NVIDIA's firmware counts 1 to 3 tries"),
        ({"data": '"fill"', "disk": '"64GiB"'}, r"partitions\.data: a Jetson's data partition \(UDA\) needs a size"),
        ({"disk": '"64GiB"'}, r"partitions\.disk: not for a Jetson"),
        ({"bootloader": '"grub"'}, r"target\.bootloader: jetson-orin-nano-devkit boots through NVIDIA\'s UEFI"),
    ],
)
def test_jetson_recipe_checks(tmp_path: Path, changes: dict[str, str], message: str) -> None:
    path = write_recipe(tmp_path / "r", jetson_text(**changes))
    with pytest.raises(RecipeError, match=message):
        recipe.load(path)


def test_small_jetson_recipe_loads(tmp_path: Path) -> None:
    r = recipe.load(write_recipe(tmp_path / "r", jetson_text()))
    assert r.target.bootloader == "nvbootctrl" and rootfs.is_jetson(r)


# --- the rootfs: nvbootctrl, UDA ---------------------------------------------------------------------------------


def test_jetson_tree_configuration(tmp_path: Path) -> None:
    r = recipe.load(write_recipe(tmp_path / "r", jetson_text(tries="2")))
    tree = tmp_path / "tree"
    tree.mkdir()
    units = rootfs.configure_tree(r, tree, keyring_pem=b"-----BEGIN CERTIFICATE-----\n")
    cfg = system_config.parse((tree / "etc/pitstop/system.toml").read_text(), Path(systemconf.PATH))
    assert cfg.bootloader.backend == "nvbootctrl" and cfg.bootloader.tries == 2
    assert [(s.name, str(s.device), s.boot_name) for s in cfg.slots] == [
        ("a", "/dev/disk/by-partlabel/APP", "A"),
        ("b", "/dev/disk/by-partlabel/APP_b", "B"),
    ]
    assert cfg.data_dir == Path("/data")
    fstab = (tree / "etc/fstab").read_text()
    data = [line.split() for line in fstab.splitlines() if line.startswith("PARTLABEL=")]
    # pitstop's data is NVIDIA's UDA, made ext4 by systemd at the first boot; nothing mounts NVIDIA's ESP.
    assert data == [["PARTLABEL=UDA", "/data", "ext4", rootfs.JETSON_DATA_OPTIONS, "0", "2"]]
    assert "x-systemd.makefs" in rootfs.JETSON_DATA_OPTIONS
    assert not (tree / rootfs.REPART_DATA[0].lstrip("/")).exists()  # UDA is not grown: NVIDIA's layout fixes it
    assert not (tree / "boot/efi").exists() and (tree / "data").is_dir()
    assert "pitstop.service" in units


def test_grub_tree_configuration_is_unchanged(tmp_path: Path) -> None:
    r = recipe.load(write_recipe(tmp_path / "r"))
    tree = tmp_path / "tree"
    tree.mkdir()
    rootfs.configure_tree(r, tree, keyring_pem=b"x")
    cfg = system_config.parse((tree / "etc/pitstop/system.toml").read_text(), Path(systemconf.PATH))
    assert cfg.bootloader.backend == "grub" and [s.boot_name for s in cfg.slots] == ["a", "b"]
    assert "PARTLABEL=data" in (tree / "etc/fstab").read_text()
    assert (tree / rootfs.REPART_DATA[0].lstrip("/")).is_file()


# --- the flashing files ------------------------------------------------------------------------------------------


def test_flash_files_without_a_bsp() -> None:
    r = recipe.load(RECIPES["jetson-orin-nano-devkit"])
    cfg = jetson_build.flash_config(r)
    files = jetson_build.flash_files(r, cfg, patched_layout=False)
    assert sorted(files) == ["flash-config.json", "flash.env", "flash.sh"]
    data = json.loads(files["flash-config.json"])
    assert data["env"] == {"ROOTFS_AB": "1", "ROOTFS_RETRY_COUNT_MAX": "3"}
    assert data["slot_size"] == 16 * GiB and data["data_size"] == 16 * GiB and data["data_partition"] == "UDA"
    assert data["data_size_applied"] is False
    assert data["layout"] == "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml"
    assert data["argv"][0] == "./tools/kernel_flash/l4t_initrd_flash.sh"
    assert (
        files["flash.env"] == b"# pitstop: rootfs A/B flash of jetson-orin-nano-devkit (R36.x (JetPack 6); "
        b"read from R36.2.0)\nROOTFS_AB=1\nROOTFS_RETRY_COUNT_MAX=3\n"
    )
    subprocess.run(["sh", "-n"], input=files["flash.sh"], check=True)


def test_flash_files_with_the_patched_layout(tmp_path: Path) -> None:
    r = recipe.load(RECIPES["jetson-agx-orin-devkit"])
    layout = tmp_path / "flash_t234_qspi_sdmmc_rootfs_ab.pitstop.xml"
    cfg = jetson_build.flash_config(r, layout)
    data = json.loads(jetson_build.flash_files(r, cfg, patched_layout=True)["flash-config.json"])
    assert data["argv"] == ["./flash.sh", "-c", str(layout), "-S", str(24 * GiB), "jetson-agx-orin-devkit", "internal"]
    assert data["data_size_applied"] is True and data["data_size"] == 8 * GiB


def test_generated_script_takes_the_rootfs_tarball(tmp_path: Path) -> None:
    bsp = make_bsp(tmp_path)
    tree = make_tree(tmp_path)
    tar = tmp_path / "x.rootfs.tar"
    jetson_build.tar_tree(tree, tar)
    with tarfile.open(tar) as t:
        names = t.getnames()
        assert "./etc/pitstop/system.toml" in names and t.getmember("./sbin").issym()
        assert {m.uid for m in t.getmembers()} == {os.getuid()}
    r = recipe.load(RECIPES["jetson-orin-nano-devkit"])
    script = tmp_path / "flash.sh"
    script.write_bytes(jetson_build.flash_files(r, jetson_build.flash_config(r), patched_layout=False)["flash.sh"])
    env = sudo_env(tmp_path)
    subprocess.run(["sh", str(script), str(bsp), str(tar)], env=env, check=True, capture_output=True)
    assert (bsp / "rootfs/etc/pitstop/system.toml").read_text() == 'compatible = "acme-orin-nano"\n'
    assert os.readlink(bsp / "rootfs/sbin") == "usr/sbin"
    assert [c["tool"] for c in calls(tmp_path)] == ["apply_binaries.sh", "l4t_initrd_flash.sh"]
    assert os.readlink(bsp / "rootfs/etc/systemd/system/nv-l4t-bootloader-config.service") == "/dev/null"


# --- before the long build -----------------------------------------------------------------------------------------


def test_nothing_is_checked_without_a_bsp(tmp_path: Path) -> None:
    r = recipe.load(RECIPES["jetson-orin-nano-devkit"])
    jetson_build.check_early(r, jetson_build.L4t(), make_host(tmp_path, euid=1000, product=None))
    board = jetson.board("jetson-orin-nano-devkit")
    missing = jetson_build.missing_without_bsp(board)
    assert missing[0] == "flash.sh (NVIDIA's flashing script)"
    assert "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml (the rootfs A/B flash layout)" in missing


def test_an_incomplete_bsp_stops_the_build_before_it_starts(tmp_path: Path) -> None:
    r = recipe.load(RECIPES["jetson-orin-nano-devkit"])
    bsp = make_bsp(tmp_path)
    (bsp / "apply_binaries.sh").unlink()
    with pytest.raises(JetsonFlashError, match=r"(?s)nothing was built.*apply_binaries\.sh: missing") as e:
        jetson_build.check_early(r, jetson_build.L4t(bsp=bsp), make_host(tmp_path))
    assert e.value.exit_code == 32


def test_a_layout_that_cannot_take_the_recipe_stops_the_build(tmp_path: Path) -> None:
    r = recipe.load(RECIPES["jetson-orin-nano-devkit"])
    bsp = make_bsp(tmp_path)
    layout = bsp / jetson.board("jetson-orin-nano-devkit").layout
    layout.write_bytes(NVME_SINGLE_LAYOUT)
    with pytest.raises(JetsonFlashError, match=r"(?s)nothing was built.*not NVIDIA's rootfs A/B layout"):
        jetson_build.check_early(r, jetson_build.L4t(bsp=bsp), make_host(tmp_path))
    layout.write_bytes(NVME_AB_LAYOUT.replace(b'name="UDA"', b'name="DATA"'))
    with pytest.raises(JetsonFlashError, match="no UDA partition"):
        jetson_build.check_early(r, jetson_build.L4t(bsp=bsp), make_host(tmp_path))
    assert calls(tmp_path) == []


def test_a_missing_device_stops_the_build_unless_no_flash(tmp_path: Path) -> None:
    r = recipe.load(RECIPES["jetson-orin-nano-devkit"])
    bsp = make_bsp(tmp_path)
    host = make_host(tmp_path, product=None)
    with pytest.raises(JetsonFlashError, match="no jetson-orin-nano-devkit in recovery mode"):
        jetson_build.check_early(r, jetson_build.L4t(bsp=bsp), host)
    jetson_build.check_early(r, jetson_build.L4t(bsp=bsp, flash=False), host)
    deb = tmp_path / "notes.txt"
    deb.write_text("x")
    with pytest.raises(JetsonFlashError, match=r"notes\.txt: not a \.deb file"):
        jetson_build.check_early(r, jetson_build.L4t(bsp=bsp, flash=False, debs=(deb,)), host)
    assert calls(tmp_path) == []


def test_the_grub_builder_refuses_a_jetson_recipe(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("build.prepare needs root")
    path = write_recipe(tmp_path / "r", jetson_text())
    req = build.Request(path, tmp_path / "out", tmp_path / "cache", REPO, 1_700_000_000, True)
    with pytest.raises(UsageError, match=r"bootloader 'nvbootctrl': pitstop\.image\.jetson_build builds it"):
        build.build(req, Stages(enabled=False))


# --- the command line ----------------------------------------------------------------------------------------------


def test_check_shows_the_jetson_flash(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    res = image_cli_run(monkeypatch, capsys, "image", "check", str(RECIPES["jetson-agx-orin-devkit"]))
    assert res.rc == 0
    assert "APP and APP_b 24GiB each, UDA 8GiB" in res.out
    assert "NVIDIA's flash: sudo ROOTFS_AB=1 ROOTFS_RETRY_COUNT_MAX=3 ./flash.sh -S 25769803776" in res.out


@pytest.mark.parametrize(
    ("recipe_name", "args", "message"),
    [
        ("ipc-x86_64.toml", ["--l4t", "/nonexistent"], "are for Jetson recipes"),
        ("jetson-orin-nano.toml", ["--no-flash"], "--no-flash needs --l4t"),
        ("jetson-orin-nano.toml", ["--l4t-debs", "/tmp"], "--l4t-debs DIR needs --l4t"),
    ],
)
def test_build_options_are_checked_first(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    recipe_name: str,
    args: list[str],
    message: str,
) -> None:
    res = image_cli_run(
        monkeypatch, capsys, "image", "build", str(REPO / "recipes" / recipe_name), "-o", str(tmp_path), *args
    )
    assert res.rc == 2 and message in res.err
    assert "Traceback" not in res.err
    assert list(tmp_path.iterdir()) == []


def test_summary_lines(tmp_path: Path) -> None:
    r = recipe.load(RECIPES["jetson-orin-nano-devkit"])
    outs = jetson_build.Outputs.of(r, tmp_path, True)
    res = jetson_build.Result(outs, {}, jetson_build.flash_config(r), missing=["flash.sh (NVIDIA's flashing script)"])
    lines = jetson_build.summary(res)
    assert lines[0].startswith("NVIDIA's tools were not run: no BSP given (--l4t DIR")
    assert "  flash.sh (NVIDIA's flashing script)" in lines
    res = jetson_build.Result(outs, {}, jetson_build.flash_config(r), integrated=True)
    assert jetson_build.summary(res)[0].startswith("not flashed (--no-flash)")
    res.flashed = True
    assert jetson_build.summary(res)[0].startswith("flashed jetson-orin-nano-devkit with rootfs A/B: sudo ROOTFS_AB=1")
