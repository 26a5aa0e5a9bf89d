"""The Jetson build end to end (`slow`, root): recipes/jetson-orin-nano.toml built on this x86_64 host (an arm64
rootfs through binfmt_misc and qemu-user, stages cached in .cache/image), first without a BSP (the rootfs, the
flashing files, and what a BSP must have), then into a stand-in BSP (tests/jetsonkit.py) whose apply_binaries.sh
and flash tool record what they were given. A real .deb goes in through `--l4t-debs`: dpkg runs in the arm64 tree
under qemu-user. The rootfs image and the first bundle are checked for NVIDIA's files, the masked commit service,
pitstop's Jetson configuration, and the bundle against the image's keyring.

NVIDIA's real tools and a Jetson were not available: what they would do with this is in docs/jetson.md.
"""

from __future__ import annotations

import json
import os
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from imagekit import SDE, debugfs, debugfs_cat
from jetsonkit import calls, make_bsp, make_host

from pitstop.image import build, jetson, jetson_build
from pitstop.image.datafs import file_sha256
from pitstop.image.progress import Stages
from pitstop.ota import system_config
from pitstop.ota.bundle_reader import Policy, open_verified, verify_payloads
from pitstop.ota.clock import Clock, ClockPolicy
from pitstop.ota.keyring import load_keyring
from pitstop.runner import run

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "jetson-orin-nano.toml"
CACHE = REPO / ".cache" / "image"
GiB = 1 << 30

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="building an image needs root (mmdebstrap, chroot)"),
]


def make_deb(tmp: Path) -> Path:
    """A real package, as JetPack's would be given with --l4t-debs."""
    pkg = tmp / "deb"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        "Package: pitstop-test-jetpack\nVersion: 6.0-1\nArchitecture: arm64\nMaintainer: pitstop <dev@pitstop>\n"
        "Description: stands in for JetPack's CUDA, cuDNN and TensorRT packages\n"
    )
    (pkg / "usr/lib/pitstop-test").mkdir(parents=True)
    (pkg / "usr/lib/pitstop-test/jetpack").write_text("tensorrt stand-in\n")
    out = tmp / "debs"
    out.mkdir()
    run(["dpkg-deb", "--root-owner-group", "--build", pkg, out / "pitstop-test-jetpack_6.0-1_arm64.deb"])
    return out / "pitstop-test-jetpack_6.0-1_arm64.deb"


def test_jetson_build_without_and_with_a_bsp(tmp_path: Path) -> None:
    # Without a BSP: pitstop's rootfs and NVIDIA's configuration, and what is missing.
    out = tmp_path / "out"
    req = build.Request(RECIPE, out, CACHE, REPO, SDE, True)
    res = jetson_build.build_jetson(req, jetson_build.L4t(), Stages(enabled=False))
    o = res.outputs
    assert res.missing and not res.integrated and not res.flashed
    assert sorted(p.name for p in o.flash_dir.iterdir()) == ["flash-config.json", "flash.env", "flash.sh"]
    assert not o.rootfs.exists() and o.bundle is not None and not o.bundle.exists()
    with tarfile.open(o.rootfs_tar) as t:
        names = set(t.getnames())
        system_toml = t.extractfile("./etc/pitstop/system.toml")
        assert system_toml is not None
        cfg = system_config.parse(system_toml.read().decode(), Path("/etc/pitstop/system.toml"))
        fstab = t.extractfile("./etc/fstab")
        assert fstab is not None and b"PARTLABEL=UDA  /data  ext4" in fstab.read()
    assert cfg.bootloader.backend == "nvbootctrl" and [str(s.device) for s in cfg.slots] == [
        "/dev/disk/by-partlabel/APP",
        "/dev/disk/by-partlabel/APP_b",
    ]
    assert "./opt/pitstop/bin/pitstop" in names and "./usr/lib/systemd/system/pitstop.service" in names
    assert not [n for n in names if n.startswith(("./boot/vmlinuz", "./usr/lib/grub"))]
    manifest = json.loads(o.manifest.read_text())
    assert manifest["jetson"]["integrated"] is False and "rootfs" not in manifest["artifacts"]
    assert manifest["artifacts"]["rootfs_tar"]["sha256"] == file_sha256(o.rootfs_tar)

    # Into a stand-in BSP, with one more package, flashed to a stand-in Jetson in recovery mode.
    bsp = make_bsp(tmp_path)
    deb = make_deb(tmp_path)
    out2 = tmp_path / "out2"
    req = build.Request(RECIPE, out2, CACHE, REPO, SDE, True)
    l4t = jetson_build.L4t(bsp=bsp, debs=(deb,), host=make_host(tmp_path))
    res = jetson_build.build_jetson(req, l4t, Stages(enabled=False))
    o = res.outputs
    assert res.integrated and res.flashed and not res.missing
    assert res.manifest["reproducible"] is True and res.reused["base"] and res.reused["system"]
    apply, flash = calls(tmp_path)
    assert (apply["tool"], flash["tool"]) == ("apply_binaries.sh", "l4t_initrd_flash.sh")
    patched = o.flash_dir / "flash_l4t_t234_nvme_rootfs_ab.pitstop.xml"
    argv = flash["argv"]
    assert isinstance(argv, list) and argv[argv.index("-c") + 1] == str(patched)
    assert argv[argv.index("-S") + 1] == str(16 * GiB)
    layout = jetson.check_layout(patched.read_bytes())
    uda, app_b = layout.partition("UDA"), layout.partition("APP_b")
    assert uda is not None and uda.size_bytes == 16 * GiB and app_b is not None and app_b.size_bytes == 16 * GiB
    # The rootfs image is what NVIDIA's tools made of pitstop's tree.
    fs = o.rootfs
    assert debugfs_cat(fs, "/nvidia-userspace") == b"applied\n"  # the stand-in apply_binaries.sh's mark
    assert debugfs_cat(fs, "/usr/lib/pitstop-test/jetpack") == b"tensorrt stand-in\n"  # dpkg, under qemu-user
    assert b"Package: pitstop-test-jetpack\nStatus: install ok installed" in debugfs_cat(fs, "/var/lib/dpkg/status")
    assert 'Fast link dest: "/dev/null"' in debugfs(fs, "stat /etc/systemd/system/nv-l4t-bootloader-config.service")
    assert b'backend = "nvbootctrl"' in debugfs_cat(fs, "/etc/pitstop/system.toml")
    assert not (bsp / "rootfs" / jetson.DEBS_IN_ROOTFS).exists()
    # The first bundle holds that image, and a device of this recipe accepts it.
    keyring = load_keyring(CACHE / build.DEV_KEYS_DIR / "keyring.pem")
    assert o.bundle is not None
    with o.bundle.open("rb") as f:
        vp = open_verified(
            f, Policy(keyring, Clock(ClockPolicy("floor"), datetime.now(UTC)), "pitstop-jetson-orin-nano", 1)
        )
        verify_payloads(f, vp.manifest)
    (payload,) = vp.manifest.payloads
    assert payload.sha256 == file_sha256(fs)
    manifest = json.loads(o.manifest.read_text())
    assert manifest["jetson"]["flashed"] is True and manifest["jetson"]["l4t_release"] == "36.2.0"
    assert manifest["jetson"]["debs"] == [deb.name]
    assert manifest["artifacts"]["rootfs"]["sha256"] == file_sha256(fs)
