"""Block maps, flashing and factory provisioning: what a production line does with an image.

The .bmap format is cross-checked with bmaptool itself. Flash targets are regular files here (one root test
uses a loop device for the block-device path); the safety checks on block devices run against a described
sysfs, plus one real check that this host's own disk is refused (the check only; nothing is ever written).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bundlekit import assert_refused
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from imagekit import (
    SDE,
    Ca,
    MiB,
    data_spec,
    debugfs,
    debugfs_cat,
    factory_ca,
    fsck_clean,
    image_cli_run,
    inode_mode,
    make_rootfs,
    need_tools,
    part_offset,
    sfdisk_json,
    write_recipe,
)

from pitstop.image import blockdev, bmap, disk, flash, provision, recipe, sparse
from pitstop.image.errors import BmapError, FlashError, ProvisionError
from pitstop.runner import run


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A disk image of the test recipe and its block map, built once."""
    need_tools()
    d = tmp_path_factory.mktemp("flash")
    r = recipe.load(write_recipe(d / "recipe"))
    disk.build_disk(r, make_rootfs(d / "rootfs.ext4"), d / "disk.img", d / "work", epoch=SDE)
    bmap.write(bmap.default_path(d / "disk.img"), bmap.create(d / "disk.img"))
    return d / "disk.img"


@pytest.fixture
def fresh(image: Path, tmp_path: Path) -> Path:
    """A private copy of the image (sparse) with its block map."""
    out = tmp_path / "disk.img"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        os.ftruncate(fd, image.stat().st_size)
        sparse.copy_into(image, fd, 0)
    finally:
        os.close(fd)
    shutil.copyfile(bmap.default_path(image), bmap.default_path(out))
    return out


def garbage_file(path: Path, size: int) -> Path:
    """A target that held something else before: every byte non-zero."""
    with path.open("wb") as f:
        block = hashlib.sha256(b"old disk").digest() * (MiB // 32)
        for _ in range(size // MiB):
            f.write(block)
    return path


# --- block maps -----------------------------------------------------------------------------------------------


def test_bmap_lists_data_ranges(tmp_path: Path) -> None:
    f = tmp_path / "sparse.img"
    with f.open("wb") as out:
        out.truncate(10 * MiB)
        out.seek(0)
        out.write(b"A" * 5000)  # blocks 0-1
        out.seek(3 * MiB)
        out.write(b"B" * 4096)  # block 768
        out.seek(10 * MiB - 10)
        out.write(b"C" * 10)  # the last block
    bm = bmap.create(f)
    assert bm.image_size == 10 * MiB and bm.block_size == 4096 and bm.blocks_count == 2560
    assert [(r.first, r.last) for r in bm.ranges] == [(0, 1), (768, 768), (2559, 2559)]
    data = f.read_bytes()
    for r in bm.ranges:
        off, n = r.bytes_in(4096, bm.image_size)
        assert r.sha256 == hashlib.sha256(data[off : off + n]).hexdigest()
    text = bmap.render(bm)
    assert bmap.parse(text.encode()) == bm
    assert "<MappedBlocksCount> 4 </MappedBlocksCount>" in text and '<bmap version="2.0">' in text


def test_bmap_of_a_partial_last_block(tmp_path: Path) -> None:
    f = tmp_path / "odd.img"
    f.write_bytes(b"x" * 5000)
    bm = bmap.create(f)
    assert bm.blocks_count == 2 and bm.ranges[0].bytes_in(4096, 5000) == (0, 5000)
    assert bmap.parse(bmap.render(bm).encode()) == bm


def _bad(text: str, old: str, new: str, *, fix_checksum: bool = True) -> bytes:
    assert old in text, old
    text = text.replace(old, new, 1)
    if fix_checksum:
        stored = re.search(r"<BmapFileChecksum> (\w+) ", text)
        assert stored
        zeroed = text.replace(stored[1], "0" * 64, 1)
        text = zeroed.replace("0" * 64, hashlib.sha256(zeroed.encode()).hexdigest(), 1)
    return text.encode()


def test_bmap_parse_refuses(image: Path) -> None:
    text = bmap.default_path(image).read_text()
    first = re.search(r"<Range chksum=\"\w+\"> (\d+)-(\d+) </Range>", text)
    assert first
    cases = [
        (_bad(text, "</BlockMap>", "</BlockMap>\n<!-- edited -->", fix_checksum=False), "checksum does not match"),
        (_bad(text, 'version="2.0"', 'version="3.0"'), r"version 3\.0 is not supported"),
        (_bad(text, "<ChecksumType> sha256", "<ChecksumType> sha1"), "checksum type 'sha1' is not supported"),
        (_bad(text, "<BlocksCount> ", "<BlocksCount> 1"), "blocks of 4096 bytes do not make"),
        (_bad(text, "<MappedBlocksCount> ", "<MappedBlocksCount> 9"), "MappedBlocksCount> does not match"),
        (_bad(text, first[0], first[0] + "\n" + first[0]), "out of order, overlapping"),
        (_bad(text, f"> {first[1]}-{first[2]} <", "> 0-99999999 <"), "past the image's end"),
        (_bad(text, 'chksum="', 'chksum="x'), "malformed <Range>"),
        (b"<bmap", "not valid XML"),
        (b"<html/>", "not a bmap file"),
    ]
    for data, message in cases:
        with pytest.raises(BmapError, match=message):
            bmap.parse(data, "t.bmap")


def test_bmaptool_reads_ours_and_we_read_bmaptools(fresh: Path, tmp_path: Path, tool: Callable[[str], str]) -> None:
    bmaptool = tool("bmaptool")
    ours = bmap.load(bmap.default_path(fresh))
    theirs_path = tmp_path / "theirs.bmap"
    run([bmaptool, "create", "-o", theirs_path, fresh])
    theirs = bmap.load(theirs_path)
    assert (theirs.image_size, theirs.block_size) == (ours.image_size, ours.block_size)
    assert theirs.ranges == ours.ranges  # the same blocks and the same checksums
    target = garbage_file(tmp_path / "target.img", fresh.stat().st_size)
    run([bmaptool, "copy", "--bmap", bmap.default_path(fresh), fresh, target])
    _assert_mapped_equal(fresh, target, ours)


def _assert_mapped_equal(image: Path, target: Path, bm: bmap.Bmap) -> None:
    with image.open("rb") as a, target.open("rb") as b:
        for off, n, _ in bm.byte_ranges():
            a.seek(off)
            b.seek(off)
            assert a.read(n) == b.read(n), f"bytes {off}+{n} differ"


def test_bmap_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh: Path) -> None:
    out = fresh.with_name("x.bmap")
    r = image_cli_run(monkeypatch, capsys, "-q", "image", "bmap", fresh, "-o", out)
    assert r.rc == 0, r.err
    assert out.read_text() == bmap.default_path(fresh).read_text()


# --- flashing a file ------------------------------------------------------------------------------------------


def test_flash_writes_only_mapped_blocks_and_the_result_is_sound(fresh: Path, tmp_path: Path) -> None:
    size = fresh.stat().st_size
    target = garbage_file(tmp_path / "target.img", size)
    old = target.read_bytes()
    res = flash.flash(fresh, target)
    assert res.verified and not res.block_device and not res.gpt_relocated
    bm = bmap.load(bmap.default_path(fresh))
    assert res.written == bm.mapped_bytes < size // 4
    _assert_mapped_equal(fresh, target, bm)
    # Unmapped blocks keep the old contents: nothing else was written.
    new = target.read_bytes()
    b = bm.byte_ranges()
    gap_start = b[0][0] + b[0][1]
    assert new[gap_start : gap_start + 4096] == old[gap_start : gap_start + 4096] != bytes(4096)
    # And still the partitions are sound on a disk full of old data (image/ext4.py: safe to flash sparsely).
    assert run(["sfdisk", "--verify", target]).returncode == 0
    fsck_clean(data_spec(target))
    fsck_clean(data_spec(target, "rootfs_a"))
    esp_start, esp_size = part_offset(target, "esp")
    esp_copy = tmp_path / "esp.vfat"
    with target.open("rb") as f:
        f.seek(esp_start)
        esp_copy.write_bytes(f.read(esp_size))
    fsck = subprocess.run(["fsck.vfat", "-n", esp_copy], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_flash_to_a_larger_target_moves_the_backup_gpt(fresh: Path, tmp_path: Path) -> None:
    target = tmp_path / "big.img"
    with target.open("wb") as f:
        f.truncate(fresh.stat().st_size + 64 * MiB)
    res = flash.flash(fresh, target)
    assert res.gpt_relocated
    assert target.stat().st_size == fresh.stat().st_size + 64 * MiB  # never shrunk
    table = sfdisk_json(target)
    assert table["lastlba"] > fresh.stat().st_size // 512
    assert run(["sfdisk", "--verify", target]).returncode == 0


def test_flash_grows_a_small_file_target(fresh: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.img"
    target.write_bytes(b"")
    flash.flash(fresh, target)
    assert target.stat().st_size == fresh.stat().st_size
    assert sparse.allocated(target) < fresh.stat().st_size // 2  # only mapped ranges were written


def test_flash_without_a_bmap_makes_one(fresh: Path, tmp_path: Path) -> None:
    bmap.default_path(fresh).unlink()
    target = tmp_path / "t.img"
    target.touch()
    res = flash.flash(fresh, target)
    assert res.verified
    _assert_mapped_equal(fresh, target, bmap.create(fresh))


def test_corrupt_image_is_detected(fresh: Path, tmp_path: Path) -> None:
    bm = bmap.load(bmap.default_path(fresh))
    off, n, _ = bm.byte_ranges()[-1]
    with fresh.open("r+b") as f:
        f.seek(off + n // 2)
        byte = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    target = tmp_path / "t.img"
    target.touch()
    with pytest.raises(BmapError, match="does not match its block map"):
        flash.flash(fresh, target)


def test_bmap_of_another_image_is_refused(fresh: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"x" * 8192)
    bmap.write(tmp_path / "other.bmap", bmap.create(other))
    target = tmp_path / "t.img"
    target.touch()
    with pytest.raises(BmapError, match="is for a 8192-byte image"):
        flash.flash(fresh, target, bmap_path=tmp_path / "other.bmap")


def test_read_back_catches_a_bad_write(fresh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A medium that does not keep what it is given: the read back must notice."""
    real = flash.write_all
    calls = {"n": 0}

    def flaky(fd: int, data: bytes | memoryview, offset: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            data = bytes(len(data))
        real(fd, data, offset)

    monkeypatch.setattr(flash, "write_all", flaky)
    target = tmp_path / "t.img"
    target.touch()
    with pytest.raises(FlashError, match="read back differently"):
        flash.flash(fresh, target)


def test_flash_refuses_odd_targets(fresh: Path, tmp_path: Path) -> None:
    with pytest.raises(FlashError, match="does not exist"):
        flash.flash(fresh, tmp_path / "nope.img")
    with pytest.raises(FlashError, match="is the image itself"):
        flash.flash(fresh, fresh)
    with pytest.raises(FlashError, match="neither a block device nor a regular file"):
        flash.flash(fresh, Path("/dev/null"))
    with pytest.raises(FlashError, match="neither a block device nor a regular file"):
        flash.flash(fresh, tmp_path)


def test_flash_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh: Path, tmp_path: Path
) -> None:
    target = tmp_path / "t.img"
    target.touch()
    r = image_cli_run(monkeypatch, capsys, "image", "flash", fresh, target)
    assert r.rc == 0, r.err
    assert "written, verified" in r.out
    r = image_cli_run(monkeypatch, capsys, "image", "flash", fresh, tmp_path / "missing")
    assert_refused(r, 32)
    bmap.default_path(fresh).write_text("<bmap")
    r = image_cli_run(monkeypatch, capsys, "image", "flash", fresh, target)
    assert_refused(r, 33)


# --- block devices: the safety checks -------------------------------------------------------------------------


class FakeHost:
    """A sysfs and /proc described with files: disks, partitions, holders, mounts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        (self.sys / "dev" / "block").mkdir(parents=True)
        (self.sys / "block").mkdir()
        (self.sys / "class" / "block").mkdir(parents=True)
        self.mounts: list[str] = []

    def disk(self, name: str, dev: tuple[int, int], parts: int = 0) -> None:
        d = self.sys / "devices" / "pci0" / "block" / name
        self._node(d, name, dev)
        (self.sys / "block" / name).symlink_to(d)
        for i in range(1, parts + 1):
            p = d / f"{name}{i}"
            self._node(p, f"{name}{i}", (dev[0], dev[1] + i))
            (p / "partition").write_text(f"{i}\n")

    def virtual(self, name: str, dev: tuple[int, int], slaves: list[str]) -> None:
        d = self.sys / "devices" / "virtual" / "block" / name
        self._node(d, name, dev)
        (d / "slaves").mkdir()
        for s in slaves:
            (d / "slaves" / s).symlink_to(self.sys / "class" / "block" / s)
            (self.sys / "class" / "block" / s / "holders" / name).symlink_to(d)

    def _node(self, d: Path, name: str, dev: tuple[int, int]) -> None:
        d.mkdir(parents=True)
        (d / "dev").write_text(f"{dev[0]}:{dev[1]}\n")
        (d / "holders").mkdir()
        (d / "ro").write_text("0\n")
        (self.sys / "dev" / "block" / f"{dev[0]}:{dev[1]}").symlink_to(d)
        (self.sys / "class" / "block" / name).symlink_to(d)

    def mount(self, dev: tuple[int, int], where: str, source: str) -> None:
        n = len(self.mounts) + 20
        self.mounts.append(f"{n} 1 {dev[0]}:{dev[1]} / {where} rw,relatime shared:1 - ext4 {source} rw")

    def host(self) -> blockdev.Host:
        (self.root / "mountinfo").write_text("\n".join(self.mounts) + "\n")
        (self.root / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
        return blockdev.Host(self.sys, self.root / "mountinfo", self.root / "swaps")


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    h = FakeHost(tmp_path)
    h.disk("vda", (254, 0), parts=2)
    h.disk("sdb", (8, 16), parts=2)
    h.disk("sdc", (8, 32), parts=1)
    h.mount((254, 1), "/", "/dev/vda1")
    return h


def test_an_unused_disk_is_accepted(fake: FakeHost) -> None:
    assert blockdev.busy_reasons(fake.host(), (8, 16)) == []


def test_the_disk_the_host_runs_from_is_refused(fake: FakeHost) -> None:
    assert blockdev.busy_reasons(fake.host(), (254, 0)) == ["vda is the disk this host runs from (/ is on it)"]


def test_a_disk_with_a_mounted_partition_is_refused(fake: FakeHost) -> None:
    fake.mount((8, 18), "/media/usb", "/dev/sdb2")
    assert blockdev.busy_reasons(fake.host(), (8, 16)) == ["/dev/sdb2 on sdb is mounted on /media/usb"]


def test_a_partition_is_refused(fake: FakeHost) -> None:
    assert blockdev.busy_reasons(fake.host(), (8, 17)) == ["sdb1 is a partition; flash the whole disk (sdb)"]


def test_holders_and_stacked_root_are_found(fake: FakeHost) -> None:
    # / on LVM over sdc1: sdc is the host's disk too, and sdc1 is held by dm-0.
    fake.virtual("dm-0", (253, 0), ["sdc1"])
    (fake.sys / "devices" / "virtual" / "block" / "dm-0" / "dm").mkdir()
    (fake.sys / "devices" / "virtual" / "block" / "dm-0" / "dm" / "name").write_text("vg-root\n")
    fake.mount((253, 0), "/", "/dev/mapper/vg-root")
    reasons = blockdev.busy_reasons(fake.host(), (8, 32))
    assert reasons == [
        "sdc is the disk this host runs from (/ is on it)",
        "sdc1 is held by dm-0 (vg-root) (device-mapper, RAID or similar)",
    ]


def test_swap_and_read_only_are_refused(fake: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host = fake.host()
    host.swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n/dev/sdb1  partition\t1024\t0\t-2\n")
    monkeypatch.setattr(blockdev, "_devnum_of", lambda path: (8, 17) if path == "/dev/sdb1" else None)
    (fake.sys / "block" / "sdb" / "ro").write_text("1\n")
    assert blockdev.busy_reasons(host, (8, 16)) == ["/dev/sdb1 on sdb is in use as swap", "sdb is read-only"]


def test_this_hosts_own_disk_is_refused() -> None:
    """The real check on this machine: the disk / lives on. (Only the check runs: nothing is opened for write.)"""
    host = blockdev.Host()
    disks = blockdev.root_disks(host)
    if not disks:
        pytest.skip("/ is not on a block device here (container or network root)")
    name = sorted(disks)[0]
    dev = Path(f"/dev/{name}")
    if not dev.is_block_device():
        pytest.skip(f"{dev} has no device node here")
    with pytest.raises(FlashError, match=f"refusing to write {dev}: {name} is the disk this host runs from"):
        blockdev.check_disk(dev)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    need_tools("losetup")
    backing = tmp_path / "loop.img"
    with backing.open("wb") as f:
        f.truncate(128 * MiB)
    try:
        dev = Path(run(["losetup", "--find", "--show", backing]).text.strip())
    except Exception as e:  # no loop devices in this environment
        pytest.skip(f"cannot attach a loop device: {e}")
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev])


@pytest.mark.root
def test_flash_a_block_device(fresh: Path, loop_device: Path) -> None:
    """Exclusive open, O_DIRECT read back, backup GPT moved to the device's end."""
    res = flash.flash(fresh, loop_device)
    assert res.block_device and res.verified and res.gpt_relocated
    assert run(["sfdisk", "--verify", loop_device]).returncode == 0
    fsck_clean(data_spec(loop_device))
    # Held open exclusively by someone else: refused before anything is written.
    fd = os.open(loop_device, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(FlashError, match="in use"):
            flash.flash(fresh, loop_device)
    finally:
        os.close(fd)


# --- factory provisioning -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return factory_ca(tmp_path_factory.mktemp("ca"))


def _files(ca: Ca, device_id: str = "SN-0042", **kw: str) -> dict[str, tuple[bytes, int]]:
    loaded = provision.load_factory_ca(ca.cert, ca.key)
    return provision.identity_files(
        device_id, loaded, server_url="https://updates.example.com/acme", token="s3cr3t-token", **kw
    )


def test_provision_an_image(fresh: Path, ca: Ca) -> None:
    fs = data_spec(fresh)
    before = debugfs_cat(fs, "/pitstop/state.json")
    provision.provision(fresh, _files(ca, hostname="dev-sn-0042"))
    assert debugfs_cat(fs, "/identity/device-id") == b"SN-0042\n"
    assert debugfs_cat(fs, "/identity/hostname") == b"dev-sn-0042\n"
    upstream = tomllib.loads(debugfs_cat(fs, "/identity/upstream.toml").decode())
    assert upstream == {"url": "https://updates.example.com/acme", "token": "s3cr3t-token"}
    key = serialization.load_pem_private_key(debugfs_cat(fs, "/identity/device.key"), password=None)
    chain = x509.load_pem_x509_certificates(debugfs_cat(fs, "/identity/device.pem"))
    cert, issuer = chain
    assert issuer == ca.certificate == x509.load_pem_x509_certificate(debugfs_cat(fs, "/identity/factory-ca.pem"))
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "SN-0042"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    modes = {n: inode_mode(fs, f"/identity/{n}") for n in ("device.key", "upstream.toml", "device-id", "device.pem")}
    assert modes == {"device.key": 0o600, "upstream.toml": 0o600, "device-id": 0o644, "device.pem": 0o644}
    assert "User:     0   Group:     0" in debugfs(fs, "stat /identity/device.key")
    assert debugfs_cat(fs, "/pitstop/state.json") == before  # the rest is untouched
    assert provision.read_identity(fresh) == b"SN-0042\n"
    fsck_clean(fs)


def test_provision_twice_needs_replace(fresh: Path, ca: Ca) -> None:
    provision.provision(fresh, _files(ca))
    with pytest.raises(ProvisionError, match="already provisioned as 'SN-0042'"):
        provision.provision(fresh, _files(ca, "SN-0043"))
    provision.provision(fresh, _files(ca, "SN-0043"), replace=True)
    assert provision.read_identity(fresh) == b"SN-0043\n"
    fsck_clean(data_spec(fresh))


def test_provision_a_flashed_target(fresh: Path, ca: Ca, tmp_path: Path) -> None:
    """The production line: flash, then provision the flashed disk (here a file)."""
    target = garbage_file(tmp_path / "target.img", fresh.stat().st_size)
    flash.flash(fresh, target)
    provision.provision(target, _files(ca, "SN-7"))
    assert provision.read_identity(target) == b"SN-7\n"
    assert provision.read_identity(fresh) is None  # the image itself stays unprovisioned


def test_provision_refuses_a_dirty_filesystem(fresh: Path, ca: Ca) -> None:
    fs = data_spec(fresh)
    run(["debugfs", "-w", "-R", "feature needs_recovery", fs])
    with pytest.raises(ProvisionError, match="not clean"):
        provision.provision(fresh, _files(ca))
    run(["debugfs", "-w", "-R", "feature ^needs_recovery", fs])
    run(["debugfs", "-w", "-R", "ssv state 0", fs])
    with pytest.raises(ProvisionError, match="not clean"):
        provision.provision(fresh, _files(ca))


def test_provisioned_upstream_is_what_the_daemon_reads(ca: Ca, tmp_path: Path) -> None:
    from pitstop.daemon.config import read_identity

    loaded = provision.load_factory_ca(ca.cert, ca.key)
    files = provision.identity_files("dev-7", loaded, server_url="http://10.0.2.2:8080", token="tok-7",
                                     metrics_url="http://10.0.2.2:8080/v1/metrics")  # fmt: skip
    ident = tmp_path / "data" / "identity"
    ident.mkdir(parents=True)
    for name, (content, _mode) in files.items():
        (ident / name).write_bytes(content)
    got = read_identity(tmp_path / "data")
    assert (got.device_id, got.server, got.token, got.metrics_url) == (
        "dev-7", "http://10.0.2.2:8080", "tok-7", "http://10.0.2.2:8080/v1/metrics"
    )  # fmt: skip
    assert (
        b"metrics_url"
        not in provision.identity_files("a", loaded, server_url="https://x", token="t")["upstream.toml"][0]
    )
    with pytest.raises(ProvisionError, match="metrics URL"):
        provision.identity_files("a", loaded, server_url="https://x", token="t", metrics_url="ftp://x")


def test_provision_refuses_bad_input(ca: Ca, tmp_path: Path) -> None:
    loaded = provision.load_factory_ca(ca.cert, ca.key)
    for device_id in ("", "-x", "a b", "x" * 65, "ü"):
        with pytest.raises(ProvisionError, match="device id"):
            provision.identity_files(device_id, loaded, server_url="https://x", token="t")
    with pytest.raises(ProvisionError, match="update server URL"):
        provision.identity_files("a", loaded, server_url="ftp://x", token="t")
    with pytest.raises(ProvisionError, match="token"):
        provision.identity_files("a", loaded, server_url="https://x", token="two words")
    with pytest.raises(ProvisionError, match="neither a disk image nor a block device"):
        provision.provision(tmp_path, {})
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(MiB))
    with pytest.raises(ProvisionError, match="no partition table"):
        provision.provision(junk, {})


def test_factory_ca_is_checked(tmp_path: Path, ca: Ca) -> None:
    other = factory_ca(tmp_path / "other")
    with pytest.raises(ProvisionError, match="is not the key of"):
        provision.load_factory_ca(ca.cert, other.key)
    expired = factory_ca(tmp_path / "expired", valid=False)
    with pytest.raises(ProvisionError, match="is not valid now"):
        provision.load_factory_ca(expired.cert, expired.key)
    leaf = tmp_path / "leaf.pem"
    from pitstop.ota import devkeys

    pki = devkeys.make_dev_pki()
    leaf.write_bytes(devkeys.cert_pem(pki.signing))
    (tmp_path / "leaf.key").write_bytes(devkeys.key_pem(pki.signing_key))
    with pytest.raises(ProvisionError, match="not a CA certificate"):
        provision.load_factory_ca(leaf, tmp_path / "leaf.key")
    with pytest.raises(ProvisionError, match="cannot load the factory CA"):
        provision.load_factory_ca(tmp_path / "nope.pem", ca.key)


def test_provision_command(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fresh: Path,
    ca: Ca,
    tmp_path: Path,
    image: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    recipe_path = image.parent / "recipe" / "small.toml"
    args = [
        "image",
        "provision",
        fresh,
        "--device-id",
        "SN.9",
        "--ca-cert",
        ca.cert,
        "--ca-key",
        ca.key,
        "--server",
        "https://updates.example.com",
        "--token-file",
        token,
    ]
    r = image_cli_run(monkeypatch, capsys, *args, "--recipe", recipe_path)
    assert r.rc == 0, r.err
    assert "provisioned" in r.out and "host name dev-sn-9" in r.out
    fs = data_spec(fresh)
    assert debugfs_cat(fs, "/identity/hostname") == b"dev-sn-9\n"
    assert tomllib.loads(debugfs_cat(fs, "/identity/upstream.toml").decode())["token"] == "tok-123"
    r = image_cli_run(monkeypatch, capsys, *args)
    assert_refused(r, 34)
    assert "already provisioned as 'SN.9'" in r.err
    # An image of another product is refused when a recipe is given.
    other = write_recipe(
        tmp_path / "other",
        (image.parent / "recipe" / "small.toml")
        .read_text()
        .replace('compatible = "pitstop-test-image"', 'compatible = "another-product"'),
    )
    r = image_cli_run(monkeypatch, capsys, *args, "--replace", "--recipe", other)
    assert_refused(r, 34)
    assert "is not from an image of this recipe" in r.err
