"""Disk assembly without loop mounts: GPT on a plain file, the ESP (GRUB, grub.cfg, grubenv), the data
partition, partition images at their offsets, sparse and byte-for-byte reproducible. Checked with the tools
a person would use: sfdisk --json, mdir/mtype, debugfs, e2fsck, and ota's own grubenv and system.toml
readers. One test boots the result under QEMU."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import find_tool
from imagekit import (
    RECIPE,
    SDE,
    MiB,
    data_spec,
    debugfs,
    debugfs_cat,
    fsck_clean,
    guest_kernel_or_skip,
    image_cli_run,
    inode_mode,
    make_rootfs,
    mcopy_out,
    mdir,
    need_tools,
    part_offset,
    sfdisk_json,
    write_recipe,
)

from pitstop.image import bmap, datafs, disk, esp, ext4, partitions, recipe, rootfs, sparse, systemconf
from pitstop.image.errors import ImageBuildError
from pitstop.ota import grubenv, system_config
from pitstop.ota.device_state import from_json as state_from_json
from pitstop.ota.slot_state import Content
from pitstop.runner import run


@pytest.fixture(scope="module")
def tools() -> None:
    need_tools()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tools: None) -> tuple[recipe.Recipe, disk.DiskParts, Path]:
    """One disk image of the test recipe, built once for the read-only checks below."""
    d = tmp_path_factory.mktemp("image")
    r = recipe.load(write_recipe(d / "recipe"))
    rootfs = make_rootfs(d / "rootfs.ext4")
    parts = disk.build_disk(r, rootfs, d / "disk.img", d / "work", epoch=SDE)
    return r, parts, d / "disk.img"


# --- layout ------------------------------------------------------------------------------------------------


def test_layout_plan() -> None:
    lay = partitions.plan(esp=64 * MiB, rootfs=1024 * MiB, data=None, disk=4096 * MiB, arch="x86_64", identity="acme")
    assert [(p.number, p.name, p.start // MiB, p.size // MiB) for p in lay.partitions] == [
        (1, "esp", 1, 64),
        (2, "rootfs_a", 65, 1024),
        (3, "rootfs_b", 1089, 1024),
        (4, "data", 2113, 1982),
    ]
    assert lay.partitions[-1].end == lay.size - MiB
    assert lay.part("rootfs_a").type_guid == partitions.ROOT_TYPES["x86_64"]
    # Stable per identity, different between roles and identities.
    again = partitions.plan(esp=64 * MiB, rootfs=1024 * MiB, data=None, disk=4096 * MiB, arch="x86_64", identity="acme")
    other = partitions.plan(
        esp=64 * MiB, rootfs=1024 * MiB, data=None, disk=4096 * MiB, arch="x86_64", identity="acme-2"
    )
    ids = [lay.disk_guid, *(p.uuid for p in lay.partitions)]
    assert ids == [again.disk_guid, *(p.uuid for p in again.partitions)]
    assert len(set(ids)) == 5 and not set(ids) & {other.disk_guid, *(p.uuid for p in other.partitions)}
    assert partitions.fat_volume_id("acme") != partitions.fat_volume_id("acme-2")
    with pytest.raises(ValueError, match="partitions need"):
        partitions.plan(esp=64 * MiB, rootfs=1024 * MiB, data=2048 * MiB, disk=4096 * MiB, arch="x86_64", identity="a")


def test_gpt_as_sfdisk_reads_it(built: tuple[recipe.Recipe, disk.DiskParts, Path]) -> None:
    r, parts, img = built
    table = sfdisk_json(img)
    layout = parts.layout
    assert table["label"] == "gpt" and table["id"].lower() == layout.disk_guid
    assert img.stat().st_size == layout.size == (1 + 16 + 32 + 32 + 24 + 1) * MiB
    got = [(p["name"], p["start"] * 512, p["size"] * 512, p["type"], p["uuid"].lower()) for p in table["partitions"]]
    assert got == [(p.name, p.start, p.size, p.type_guid, p.uuid) for p in layout.partitions]
    assert [p["name"] for p in table["partitions"]] == ["esp", "rootfs_a", "rootfs_b", "data"]
    assert run(["sfdisk", "--verify", img]).returncode == 0
    assert layout.disk_guid == partitions.identity_uuid(r.target.compatible, "disk")


# --- ESP -----------------------------------------------------------------------------------------------------


def test_esp_files(built: tuple[recipe.Recipe, disk.DiskParts, Path]) -> None:
    r, parts, img = built
    listing = mdir(img, "EFI/BOOT")
    for name in ("BOOTX64.EFI", "grub.cfg", "grubenv", "pitstop-platform.cfg"):
        assert f"::/EFI/BOOT/{name}" in listing, listing
    assert mcopy_out(img, "EFI/BOOT/grub.cfg") == esp.project_grub_file("grub.cfg")
    efi = mcopy_out(img, "EFI/BOOT/BOOTX64.EFI")
    assert efi[:2] == b"MZ" and b"PE\0\0" in efi[:512] and 500_000 < len(efi) < 4_000_000
    # The embedded config is in the memdisk, found by GRUB at (memdisk)/boot/grub/grub.cfg.
    assert esp.project_grub_file("embedded.cfg") in efi
    platform = mcopy_out(img, "EFI/BOOT/pitstop-platform.cfg").decode()
    layout = parts.layout
    assert f"set pitstop_root_a=PARTUUID={layout.part('rootfs_a').uuid}" in platform
    assert f"set pitstop_root_b=PARTUUID={layout.part('rootfs_b').uuid}" in platform
    assert "set pitstop_part_a=gpt2" in platform and "set pitstop_part_b=gpt3" in platform
    assert f'set pitstop_cmdline="{r.boot.cmdline}"' in platform
    volume = run(["minfo", "-i", f"{img}@@{part_offset(img, 'esp')[0]}"], env={"MTOOLS_SKIP_CHECK": "1"}).text
    assert f"serial number: {partitions.fat_volume_id(r.identity)}" in volume


def test_grubenv_read_by_ota(built: tuple[recipe.Recipe, disk.DiskParts, Path], tool: Callable[[str], str]) -> None:
    _, _, img = built
    block = mcopy_out(img, "EFI/BOOT/grubenv")
    assert len(block) == grubenv.SIZE
    env = grubenv.decode(block)
    assert env == {"ORDER": "a b", "a_OK": "1", "a_TRY": "3", "b_OK": "0", "b_TRY": "0"}
    assert grubenv.check_generation(env) == 0  # no markers: the first pitstop write adds them
    # GRUB's own tool reads it the same.
    f = img.parent / "grubenv.copy"
    f.write_bytes(block)
    assert run([tool("grub-editenv"), f, "list"]).text.splitlines() == [f"{k}={v}" for k, v in env.items()]


def test_grubenv_is_not_sparse_on_the_esp(built: tuple[recipe.Recipe, disk.DiskParts, Path]) -> None:
    """GRUB rewrites grubenv through its block list: its clusters must be real data in the image."""
    _, _, img = built
    block = mcopy_out(img, "EFI/BOOT/grubenv")
    esp_start, esp_size = part_offset(img, "esp")
    with img.open("rb") as f:
        where = f.read(esp_start + esp_size).find(block, esp_start)
    assert where > 0
    fd = os.open(img, os.O_RDONLY)
    try:
        assert any(s <= where and where + 1024 <= s + n for s, n in sparse.data_ranges(fd))
    finally:
        os.close(fd)


def test_memdisk_is_deterministic(tmp_path: Path, tools: None) -> None:
    target = esp.GRUB_TARGETS["x86_64"]
    tar = esp.memdisk_tar(target, b"# cfg\n", SDE)
    assert tar == esp.memdisk_tar(target, b"# cfg\n", SDE)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
    names = [m.name for m in members]
    assert names[0] == "boot/grub/grub.cfg"
    assert {
        "boot/grub/x86_64-efi/fat.mod",
        "boot/grub/x86_64-efi/fshelp.mod",
        "boot/grub/x86_64-efi/moddep.lst",
        "boot/grub/x86_64-efi/loadenv.mod",
    } <= set(names)
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(SDE, 0, 0, 0o644)}
    assert esp.module_closure(
        ("fat", "search"), "fat: fshelp\nfshelp:\nsearch: extcmd search_label\nextcmd:\nsearch_label:\n"
    ) == ["extcmd", "fat", "fshelp", "search", "search_label"]
    with pytest.raises(ImageBuildError, match=r"not in moddep\.lst"):
        esp.module_closure(("nope",), "fat: fshelp\n")
    one = esp.build_grub_efi(tmp_path / "a.efi", tmp_path, epoch=SDE)
    time.sleep(1.1)
    two = esp.build_grub_efi(tmp_path / "b.efi", tmp_path, epoch=SDE)
    assert one.read_bytes() == two.read_bytes()


# --- data partition ------------------------------------------------------------------------------------------


def test_data_partition(built: tuple[recipe.Recipe, disk.DiskParts, Path]) -> None:
    r, _, img = built
    fs = data_spec(img)
    state = json.loads(debugfs_cat(fs, "/pitstop/state.json"))
    parsed = state_from_json(state, ("a", "b"))
    assert parsed.record.slots["a"].content == Content.GOOD and parsed.record.slots["b"].content == Content.EMPTY
    assert parsed.record.committed_security_version == r.bundle.security_version == 4
    assert state["time_floor"] == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH
    model = r.model[0]
    sha = hashlib.sha256(model.source.read_bytes()).hexdigest()
    version = f"1.2.3-{sha[:12]}"
    assert parsed.payloads["models/det"].current == version
    assert debugfs_cat(fs, f"/pitstop/versions/models/det/{version}/det.onnx") == model.source.read_bytes()
    desc = json.loads(debugfs_cat(fs, f"/pitstop/versions/models/det/{version}/model.json"))
    # The recipe's description_file, as a model payload carries it: the daemon's loops read it from here.
    described = {"name": "det", "inputs": [{"name": "x", "shape": [1, 3, 32, 32]}]}
    assert desc == {"name": "det", "file": "det.onnx", "sha256": sha, "description": described}
    link = debugfs(fs, "stat /models/det")
    assert "Type: symlink" in link and f'Fast link dest: "../pitstop/versions/models/det/{version}"' in link
    assert inode_mode(fs, "/identity") == 0o700
    assert inode_mode(fs, "/log/journal") == 0o2755
    assert "User:     0   Group:     0" in debugfs(fs, "stat /pitstop/state.json")
    label = run(["dumpe2fs", "-h", fs]).text
    assert "Filesystem volume name:   data" in label
    assert f"Filesystem UUID:          {partitions.identity_uuid(r.identity, 'fs:data')}" in label
    fsck_clean(fs)
    fsck_clean(data_spec(img, "rootfs_a"))


def test_datafs_refuses_a_model_named_model_json(tmp_path: Path) -> None:
    src = tmp_path / "model.json"
    src.write_text("{}")
    (tmp_path / "tree").mkdir()
    from datetime import UTC, datetime

    with pytest.raises(ImageBuildError, match=r"may not be named model\.json"):
        datafs.build_tree(
            tmp_path / "tree",
            bundle_version="1.0.0",
            security_version=0,
            created=datetime.now(UTC),
            models=[datafs.Preload("m", src, "models/m")],
        )


# --- ext4 ------------------------------------------------------------------------------------------------------


def test_ext4_is_safe_to_flash_sparsely(tmp_path: Path, tools: None) -> None:
    """Nothing mke2fs relies on being zero is left as a hole: the journal is written out, inode tables are not
    flagged zeroed (the kernel zeroes them after the first mount)."""
    img = make_rootfs(tmp_path / "fs.ext4", 64 * MiB)
    dump = run(["dumpe2fs", img]).text
    assert "ITABLE_ZEROED" not in dump
    journal_blocks = debugfs(img, "blocks <8>").split()
    assert len(journal_blocks) >= 1024
    fd = os.open(img, os.O_RDONLY)
    try:
        ranges = list(sparse.data_ranges(fd))
    finally:
        os.close(fd)
    for b in (int(journal_blocks[0]), int(journal_blocks[len(journal_blocks) // 2]), int(journal_blocks[-1])):
        assert any(s <= b * 4096 < s + n for s, n in ranges), f"journal block {b} is a hole"
    assert sparse.allocated(img) < img.stat().st_size // 2
    features = run(["dumpe2fs", "-h", img]).text
    assert "metadata_csum_seed" not in features and "orphan_file" not in features


def test_ext4_times_are_normalized(tmp_path: Path, tools: None) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_text("x")
    os.utime(tree / "d" / "f", (SDE - 100, SDE - 100))
    (tree / "new").write_text("y")  # mtime now: clamped
    img = ext4.make_ext4(
        tmp_path / "t.ext4", 16 * MiB, tree, label="t", uuid=partitions.identity_uuid("t", "fs"), epoch=SDE
    )
    f = debugfs(img, "stat /d/f")
    assert f"mtime: {hex(SDE - 100)}" in f and f"ctime: {hex(SDE)}" in f and f"atime: {hex(SDE)}" in f
    assert f"mtime: {hex(SDE)}" in debugfs(img, "stat /new")
    assert list(ext4.used_inodes(img)) == [2, 11, 12, 13, 14]
    assert ext4.free_inode_ranges("  Free inodes: 15-2048, 3000, 3002-3005\n  Free inodes: \n") == [
        (15, 2048),
        (3000, 3000),
        (3002, 3005),
    ]


# --- the whole disk: sparse and reproducible -----------------------------------------------------------------


def test_disk_is_sparse(built: tuple[recipe.Recipe, disk.DiskParts, Path]) -> None:
    _, parts, img = built
    b = parts.layout.part("rootfs_b")
    fd = os.open(img, os.O_RDONLY)
    try:
        ranges = list(sparse.data_ranges(fd))
    finally:
        os.close(fd)
    assert not any(s < b.end and b.start < s + n for s, n in ranges), "slot b must be left a hole"
    assert sparse.allocated(img) < img.stat().st_size // 4


def _build(base: Path) -> tuple[bytes, bytes]:
    r = recipe.load(write_recipe(base / "recipe"))
    rootfs = make_rootfs(base / "rootfs.ext4")
    disk.build_disk(r, rootfs, base / "disk.img", base / "work", epoch=SDE)
    return (base / "disk.img").read_bytes(), bmap.render(bmap.create(base / "disk.img")).encode()


def test_two_builds_are_identical(tmp_path: Path, tools: None) -> None:
    one = _build(tmp_path / "one")
    time.sleep(1.1)  # every clock-derived value would differ now
    two = _build(tmp_path / "two")
    assert hashlib.sha256(one[0]).hexdigest() == hashlib.sha256(two[0]).hexdigest()
    assert one[1] == two[1]


def test_assemble_refuses_a_rootfs_larger_than_its_slot(tmp_path: Path, tools: None) -> None:
    r = recipe.load(write_recipe(tmp_path / "recipe"))
    big = make_rootfs(tmp_path / "big.ext4", 48 * MiB)
    with pytest.raises(ImageBuildError, match=r"larger than a slot \(33554432 bytes, partitions.rootfs"):
        disk.build_disk(r, big, tmp_path / "disk.img", tmp_path / "work", epoch=SDE)
    assert not (tmp_path / "disk.img").exists()


def test_find_partition(built: tuple[recipe.Recipe, disk.DiskParts, Path], tmp_path: Path) -> None:
    _, parts, img = built
    assert disk.find_partition(img, "data") == (parts.layout.part("data").start, parts.layout.part("data").size)
    with pytest.raises(ImageBuildError, match=r"no partition named 'swap' \(partitions: esp, rootfs_a"):
        disk.find_partition(img, "swap")
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * MiB)
    with pytest.raises(ImageBuildError, match="no partition"):
        disk.find_partition(junk, "data")


def test_assemble_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, tools: None
) -> None:
    path = write_recipe(tmp_path / "recipe")
    rootfs = make_rootfs(tmp_path / "rootfs.ext4")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(SDE))
    out = tmp_path / "out" / "small.img"
    out.parent.mkdir()
    r = image_cli_run(monkeypatch, capsys, "-q", "image", "assemble", path, "--rootfs", rootfs, "-o", out)
    assert r.rc == 0, r.err
    assert "assembled" in r.out and "mapped" in r.out
    bm = bmap.load(out.with_name("small.img.bmap"))
    assert bm.image_size == out.stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.img", "small.img.bmap"]


# --- system.toml ------------------------------------------------------------------------------------------------


def test_system_toml_is_read_back_by_ota(tmp_path: Path) -> None:
    text = systemconf.render(systemconf.SystemToml("pitstop-ipc-x86_64", tries=5, clock="system"))
    cfg = system_config.parse(text, Path("/etc/pitstop/system.toml"))
    assert cfg.compatible == "pitstop-ipc-x86_64" and cfg.bootloader.tries == 5 and cfg.clock.value == "system"
    assert cfg.bootloader.grubenv == Path("/boot/efi/EFI/BOOT/grubenv")
    assert [(s.name, str(s.device), s.boot_name) for s in cfg.slots] == [
        ("a", "/dev/disk/by-partlabel/rootfs_a", "a"),
        ("b", "/dev/disk/by-partlabel/rootfs_b", "b"),
    ]
    assert cfg.booted_slot is None and cfg.data_dir == Path("/data")
    assert cfg.keyring == Path("/etc/pitstop/keyring.pem")
    # Development form: file slots, a pinned booted slot, quotes survive.
    dev = systemconf.SystemToml(
        'dev "x"'.replace(" ", "-"),
        slots=(("a", str(tmp_path / "a.img"), "a"), ("b", str(tmp_path / "b.img"), "b")),
        booted_slot="a",
        boot_id=str(tmp_path / "boot_id"),
        data_dir=str(tmp_path),
    )
    cfg = system_config.parse(systemconf.render(dev), tmp_path / "system.toml")
    assert cfg.compatible == 'dev-"x"' and cfg.booted_slot == "a" and cfg.boot_id == tmp_path / "boot_id"


def test_system_toml_refuses_what_the_device_would(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match=r"would be refused on the device: .*compatible"):
        systemconf.render(systemconf.SystemToml("has space"))
    with pytest.raises(ImageBuildError, match=r"tries must be 1\.\.9"):
        systemconf.render(systemconf.SystemToml("x", tries=12))


# --- boots: the assembled disk under QEMU (TCG) --------------------------------------------------------------


@pytest.mark.vm
def test_assembled_disk_boots_slot_a(tmp_path: Path, tools: None) -> None:
    """The tests/vm guest (a kernel and a busybox initramfs reporting its slot) as slot a of a disk built by
    image/disk.py: UEFI → our GRUB binary → grub.cfg + platform file → slot a; GRUB spends one try."""
    from vm import image as vm_image
    from vm.qemu import Vm

    vmlinuz = guest_kernel_or_skip()
    r = recipe.load(write_recipe(tmp_path / "recipe"))
    slot = vm_image.build_slot(tmp_path / "guest", vmlinuz, "good", r.partitions.rootfs)
    parts = disk.build_disk(r, slot, tmp_path / "disk.img", tmp_path / "work", epoch=SDE)
    with Vm(tmp_path / "disk.img", tmp_path, name="image", limit=90) as vm:
        vm.wait_for(r"pitstop-grub: booting slot a", 60)
        _, line = vm.wait_for(r"PITSTOP-SLOT=", 60)
        assert "PITSTOP-SLOT=a MODE=good" in line.text
        _, cmd = vm.wait_for(r"PITSTOP-CMDLINE=", 5)
        assert f"root=PARTUUID={parts.layout.part('rootfs_a').uuid}" in cmd.text and "panic=1" in cmd.text
        assert vm.wait_exit(30) == 0
    env = grubenv.decode(mcopy_out(tmp_path / "disk.img", "EFI/BOOT/grubenv"))
    assert env["a_TRY"] == "2" and env["ORDER"] == "a b"
    shutil.rmtree(tmp_path / "guest", ignore_errors=True)


# --- the rootfs stage: what can be checked without building Debian ------------------------------------------


def test_mmdebstrap_command(tmp_path: Path) -> None:
    r = recipe.load(write_recipe(tmp_path))
    argv = rootfs.mmdebstrap_argv(r, tmp_path / "base.tar")
    assert argv[:5] == ["mmdebstrap", "--mode=root", "--variant=minbase", "--arch=amd64", "--format=tar"]
    include = next(a for a in argv if a.startswith("--include=")).split("=", 1)[1].split(",")
    assert include == sorted(include)
    assert {"linux-image-amd64", "systemd", "openssh-server", "python3-venv", "e2fsprogs"} <= set(include)
    assert argv[-5:-3] == ["bookworm", str(tmp_path / "base.tar")]
    assert argv[-3:] == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]
    pinned = recipe.load(
        write_recipe(
            tmp_path,
            RECIPE.replace('components = ["main"]', 'components = ["main"]\nsnapshot = "20250601T000000Z"\n'),
            name="pinned.toml",
        )
    )
    argv = rootfs.mmdebstrap_argv(pinned, tmp_path / "base.tar")
    assert "deb http://snapshot.debian.org/archive/debian/20250601T000000Z bookworm main" in argv
    assert "deb http://snapshot.debian.org/archive/debian-security/20250601T000000Z bookworm-security main" in argv
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in argv
    # A recipe naming its own kernel gets no second one.
    cloud = recipe.load(
        write_recipe(tmp_path, RECIPE.replace('"openssh-server"]', '"linux-image-cloud-amd64"]'), name="cloud.toml")
    )
    assert [p for p in rootfs.packages(cloud) if p.startswith("linux-image")] == ["linux-image-cloud-amd64"]


def test_base_stage_key_covers_what_changes_the_base(tmp_path: Path) -> None:
    base = RECIPE
    key = rootfs.base_key(recipe.load(write_recipe(tmp_path / "0", base)), SDE, "1.3.5")
    same = [
        base.replace('hostname = "dev-{device_id}"', 'hostname = "other-{device_id}"'),
        base.replace('name = "maint"', 'name = "ops"'),
        base.replace('version = "1.2.3"', 'version = "2.0.0"'),
        base.replace('rootfs = "32MiB"', 'rootfs = "64MiB"'),
    ]
    other = [
        base.replace('"openssh-server"]', '"openssh-server", "chrony"]'),
        base.replace('components = ["main"]', 'components = ["main", "contrib"]'),
        base.replace('components = ["main"]', 'components = ["main"]\nsnapshot = "20250601T000000Z"'),
    ]
    for n, text in enumerate(same):
        assert rootfs.base_key(recipe.load(write_recipe(tmp_path / f"s{n}", text)), SDE, "1.3.5") == key, text
    for n, text in enumerate(other):
        assert rootfs.base_key(recipe.load(write_recipe(tmp_path / f"o{n}", text)), SDE, "1.3.5") != key, text
    r = recipe.load(write_recipe(tmp_path / "0", base))
    assert rootfs.base_key(r, SDE + 1, "1.3.5") != key and rootfs.base_key(r, SDE, "1.3.6") != key


def test_daemon_files_come_from_the_pitstop_installed_in_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    with pytest.raises(ImageBuildError, match="daemon files not found"):
        rootfs.install_daemon_files(tree)
    data = tree / "opt/pitstop/lib/python3.11/site-packages/pitstop/daemon/data"
    shutil.copytree(Path(__file__).resolve().parent.parent / "daemon" / "data", data)
    rootfs.install_daemon_files(tree)
    unit = (tree / "usr/lib/systemd/system/pitstop.service").read_text()
    assert "Type=notify" in unit and "ExecStart=/opt/pitstop/bin/pitstop daemon" in unit
    policy = (tree / "usr/share/dbus-1/system.d/org.pitstop.Daemon1.conf").read_text()
    assert '<policy group="pitstop">' in policy
    assert (tree / "usr/share/dbus-1/interfaces/org.pitstop.Daemon1.xml").read_text().startswith("<")
    assert rootfs.check_daemon_config() == ["/opt/pitstop/bin/pitstop", "daemon", "--check"]


def test_configure_tree_writes_the_recipes_files(tmp_path: Path) -> None:
    text = RECIPE.replace(
        'match = "en*"',
        'match = "en*"\n[[network.interface]]\nmatch = "enp2s0"\ndhcp = false\n'
        'address = ["192.168.7.2/24"]\ngateway = "192.168.7.1"\ndns = ["192.168.7.1"]',
    )
    r = recipe.load(write_recipe(tmp_path / "recipe", text))
    tree = tmp_path / "tree"
    tree.mkdir()
    units = rootfs.configure_tree(r, tree, keyring_pem=(tmp_path / "recipe" / "keyring.pem").read_bytes())
    assert units == [
        "pitstop-hostname.service",
        "pitstop-ssh-hostkeys.service",
        "pitstop.service",
        "systemd-networkd.service",
    ]
    cfg = system_config.parse((tree / "etc/pitstop/system.toml").read_text(), Path("/etc/pitstop/system.toml"))
    assert cfg.compatible == "pitstop-test-image" and cfg.bootloader.tries == 3
    assert (tree / "etc/pitstop/keyring.pem").read_bytes() == (tmp_path / "recipe" / "keyring.pem").read_bytes()
    assert (tree / "etc/pitstop/pitstop.toml").read_text() == "[update]\npoll_default_s = 60\n"
    # The group the daemon's bus policy names exists before the recipe's users, who may be in it.
    cmds = [*rootfs.group_commands(), *rootfs.user_commands(r)]
    assert cmds[0] == ["groupadd", "--system", "pitstop"]
    fstab = (tree / "etc/fstab").read_text()
    assert "PARTLABEL=data  /data  ext4" in fstab and "PARTLABEL=esp   /boot/efi  vfat" in fstab
    assert (tree / "etc/hostname").read_text() == "dev-unprovisioned\n"
    assert (
        "ExecStart=/bin/hostname -F /data/identity/hostname"
        in (tree / "etc/systemd/system/pitstop-hostname.service").read_text()
    )
    assert (tree / "etc/systemd/network/12-pitstop.network").read_text() == (
        "[Match]\nName=enp2s0\n\n[Network]\nDHCP=no\nAddress=192.168.7.2/24\nGateway=192.168.7.1\nDNS=192.168.7.1\n"
    )
    assert (tree / "etc/chrony/sources.d/pitstop.sources").read_text() == "server ntp.example.com iburst\n"
    sshd = (tree / "etc/ssh/sshd_config.d/50-pitstop.conf").read_text()
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    assert "HostKey /data/ssh/etc/ssh/ssh_host_ed25519_key" in sshd
    assert os.readlink(tree / "var/log") == "/data/log"
    tmpfiles = (tree / "etc/tmpfiles.d/pitstop.conf").read_text()
    assert "d /data/log 0755 root root - -\nd /data/log/journal 2755 root systemd-journal - -\n" in tmpfiles
    fstab_lines = [ln.split() for ln in fstab.splitlines() if ln and not ln.startswith("#")]
    assert all("nofail" not in ln[3] for ln in fstab_lines)  # required: a slot without data never turns good
    assert ["tmpfs", "/tmp", "tmpfs", "mode=1777,nosuid,nodev", "0", "0"] in fstab_lines
    assert os.readlink(tree / "etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"
    assert (tree / "etc/machine-id").read_text() == ""
    assert (tree / "data").is_dir() and (tree / "boot/efi").is_dir()


def test_overlay_and_cleanup(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    (overlay / "etc" / "issue.d").mkdir(parents=True)
    (overlay / "etc" / "issue").write_text("new\n")
    (overlay / "etc" / "link").symlink_to("issue")
    (overlay / "usr" / "bin").mkdir(parents=True)
    (overlay / "usr" / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(overlay / "usr" / "bin" / "tool", 0o750)
    tree = tmp_path / "tree"
    (tree / "etc" / "ssh").mkdir(parents=True)
    (tree / "etc" / "issue").write_text("old\n")
    (tree / "etc" / "link").write_text("a file before")
    (tree / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("secret")
    (tree / "etc" / "passwd-").write_text("backup")
    rootfs.copy_overlay(overlay, tree)
    assert (tree / "etc" / "issue").read_text() == "new\n" and os.readlink(tree / "etc" / "link") == "issue"
    assert (tree / "usr" / "bin" / "tool").stat().st_mode & 0o777 == 0o750
    assert (tree / "usr" / "bin" / "tool").stat().st_uid == 0
    rootfs.clean_tree(tree)
    assert not (tree / "etc" / "ssh" / "ssh_host_ed25519_key").exists() and not (tree / "etc" / "passwd-").exists()
    # Nothing is written through a symlink of the image (it would land outside the tree, on the build host).
    (tree / "var").mkdir()
    (tree / "var" / "run").symlink_to("/run")
    escape = tmp_path / "escape"
    (escape / "var" / "run").mkdir(parents=True)
    (escape / "var" / "run" / "x").write_text("x")
    with pytest.raises(ImageBuildError, match=r"var/run/x goes through the symlink /var/run of the image"):
        rootfs.copy_overlay(escape, tree)
    # A file where the image has a directory is refused, not merged into or replacing it.
    bad = tmp_path / "bad"
    (bad / "etc").mkdir(parents=True)
    (bad / "etc" / "issue.d").write_text("x")
    with pytest.raises(ImageBuildError, match=r"etc/issue\.d is a file, the image has a directory"):
        rootfs.copy_overlay(bad, tree)


def test_account_commands(tmp_path: Path) -> None:
    text = RECIPE.replace('groups = ["sudo"]', 'groups = ["sudo", "adm"]\nuid = 1500')
    r = recipe.load(write_recipe(tmp_path, text))
    assert rootfs.user_commands(r) == [
        ["useradd", "--create-home", "--shell", "/bin/bash", "--uid", "1500", "--groups", "sudo,adm", "maint"],
        ["passwd", "--lock", "maint"],
    ]
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "home" / "maint").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nmaint:x:1500:1500::/home/maint:/bin/bash\n")
    rootfs.install_authorized_keys(r, tree)
    keys = tree / "home" / "maint" / ".ssh" / "authorized_keys"
    assert keys.read_text() == (tmp_path / "keys" / "operator.pub").read_text()
    assert (keys.stat().st_mode & 0o777, keys.stat().st_uid, keys.parent.stat().st_mode & 0o777) == (0o600, 1500, 0o700)


# --- the whole way: recipe → Debian rootfs → disk → QEMU -------------------------------------------------------

ROOTFS_RECIPE_EDITS = (
    ('rootfs = "32MiB"', 'rootfs = "1536MiB"'),
    # The cloud kernel: smaller and quicker to install than linux-image-amd64, enough for QEMU.
    (
        'include = ["systemd", "openssh-server"]',
        'include = ["systemd", "openssh-server", "systemd-resolved", "chrony", "linux-image-cloud-amd64"]',
    ),
)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.vm
def test_rootfs_from_a_recipe_boots_and_marks_itself_good(tmp_path: Path) -> None:
    """mmdebstrap (cached in .cache/image between runs), the recipe's configuration, pitstop from a wheel of this
    tree, the slot image, the disk; then one boot under QEMU: the mark-good unit reports ready from slot a and
    its grubenv write survives QEMU being killed right after. Cold: about 3 minutes here; warm: about 1."""
    from vm.qemu import OVMF_VARS, Vm

    for name in ("mmdebstrap", "chroot", "tar"):
        find_tool(name)
    if not OVMF_VARS.is_file():
        pytest.skip(f"{OVMF_VARS} missing (apt package ovmf)")
    text = RECIPE
    for old, new in ROOTFS_RECIPE_EDITS:
        text = text.replace(old, new)
    r = recipe.load(write_recipe(tmp_path / "recipe", text))
    repo = Path(__file__).resolve().parent.parent
    cache = rootfs.Cache(repo / ".cache" / "image")
    wheels = rootfs.wheelhouse(repo, tmp_path / "wheels", cache)
    keyring = (tmp_path / "recipe" / "keyring.pem").read_bytes()
    built = rootfs.build_rootfs(r, tmp_path / "rootfs.ext4", rootfs.TreeInputs(cache, keyring, wheels, SDE))
    img = built.image
    assert any(p.startswith("systemd ") for p in built.packages) and any(
        p.startswith("chrony ") for p in built.packages
    )
    assert "Type: regular" in debugfs(img, "stat /opt/pitstop/bin/pitstop")
    assert "Type: symlink" in debugfs(img, "stat /usr/local/bin/pitstop")
    assert inode_mode(img, "/home/maint/.ssh/authorized_keys") == 0o600
    assert "ssh_host_" not in debugfs(img, "ls /etc/ssh")  # host keys are made per device, on data
    assert debugfs_cat(img, "/etc/machine-id") == b""
    assert "pitstop.service" in debugfs(img, "ls /etc/systemd/system/multi-user.target.wants")
    fsck_clean(img)

    disk.build_disk(r, img, tmp_path / "disk.img", tmp_path / "work", epoch=SDE)
    vm = Vm(tmp_path / "disk.img", tmp_path, name="rootfs", limit=300)
    # NumPy's wheels need x86-64-v2 instructions, which QEMU's default TCG CPU lacks.
    at = vm.argv.index("-accel") + 2
    vm.argv[at:at] = ["-cpu", "max"]
    with vm:
        _, line = vm.wait_for(r"PITSTOP-READY", 240)
        assert line.text.endswith("PITSTOP-READY slot=a"), line.text  # after journald's console prefix
        assert not vm.matching(r"\[FAILED\]"), "\n".join(ln.text for ln in vm.matching(r"\[FAILED\]"))
    env = grubenv.decode(mcopy_out(tmp_path / "disk.img", "EFI/BOOT/grubenv"))
    assert (env["ORDER"], env["a_OK"], env["a_TRY"], env.get("pitstop_gen")) == ("a b", "1", "3", "1"), env
