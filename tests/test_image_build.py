"""`pitstop image build` and `pitstop image boot`.

The pieces without Debian (keys, sizes, stage keys, the first bundle, progress, QEMU's command line) run
everywhere. The must-show runs in the default suite on CI (root, QEMU): recipes/ipc-x86_64.toml built with
mmdebstrap (cached in .cache/image between runs), booted under QEMU (TCG) to `PITSTOP-READY slot=a`; inside
it `pitstop install` of the build's first bundle from a real HTTP server, through the pitstop daemon, which
reboots into slot b by itself and commits it after its health gate; then a bundle whose rootfs cannot boot,
the fall back to slot b by GRUB's boot counting alone, and the daemon there recording the failed update.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bundlekit import run_cli
from conftest import find_tool
from imagekit import (
    RECIPE,
    SDE,
    SSH_KEY,
    debugfs,
    debugfs_cat,
    fsck_clean,
    guest_kernel_or_skip,
    make_rootfs,
    mcopy_out,
    need_tools,
    write_recipe,
)

from pitstop.image import build, qemu, recipe, rootfs
from pitstop.image.datafs import file_sha256
from pitstop.image.errors import ImageBuildError
from pitstop.image.progress import Stages, format_duration
from pitstop.ota import grubenv
from pitstop.ota.bundle_spec import BundleSpec, PayloadSpec
from pitstop.ota.bundle_writer import create_bundle
from pitstop.ota.signing import KeyFileSigner
from pitstop.runner import run

REPO = Path(__file__).resolve().parent.parent
IPC_RECIPE = REPO / "recipes" / "ipc-x86_64.toml"
CACHE = REPO / ".cache" / "image"


# --- keys and the first bundle ------------------------------------------------------------------------------


def test_dev_keys_are_made_once_and_valid_for_any_build_epoch(tmp_path: Path) -> None:
    d = build.dev_keys(tmp_path)
    first = (d / "keyring.pem").read_bytes()
    assert build.dev_keys(tmp_path) == d and (d / "keyring.pem").read_bytes() == first
    assert oct(os.stat(d / "signing.key").st_mode & 0o777) == "0o600"
    signer = KeyFileSigner.load(d / "signing.key", [d / "chain.pem"])
    for cert in signer.certificates:
        assert cert.not_valid_before_utc <= datetime.fromtimestamp(SDE, UTC)


def test_first_bundle_verifies_as_the_device_will(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_tools("mkfs.ext4", "debugfs")
    path = write_recipe(tmp_path / "recipe", RECIPE.replace('keyring = "keyring.pem"', 'keyring = "dev"'))
    r = recipe.load(path)
    img = make_rootfs(tmp_path / "rootfs.ext4", 8 << 20)
    req = build.Request(path, tmp_path / "out", tmp_path / "c", REPO, SDE, True)
    keys = build.resolve_keys(r, req)
    stages = Stages(enabled=False)
    info = build.first_bundle(r, img, tmp_path / "first.pitb", keys, SDE, stages, source=tmp_path / "first.pitb")
    assert (info["version"], info["security_version"], info["compatible"]) == ("1.2.3", 4, "pitstop-test-image")
    assert info["created"] == "2023-11-14T22:13:20Z" and info["payloads"] == ["rootfs"]
    res = run_cli(
        capsys,
        "bundle",
        "verify",
        str(tmp_path / "first.pitb"),
        "--keyring",
        str(tmp_path / "c" / "dev-keys" / "keyring.pem"),
        "--compatible",
        "pitstop-test-image",
    )
    assert res.rc == 0, res.err


def test_a_real_keyring_needs_a_signer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path / "recipe")
    res = run_cli(capsys, "image", "build", str(path), "-o", str(tmp_path / "out"), "--cache", str(tmp_path / "c"))
    if os.geteuid() != 0:
        assert res.rc == 31 and "needs root" in res.err
        return
    assert res.rc == 2 and "sign the first bundle with --key/--cert" in res.err, res.err
    assert not (tmp_path / "out").exists()  # refused before anything was made


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[boot]", "[boot]\nbogus = 1"), "unknown key"),
        (("tries = 3", 'tries = "3"'), "tries"),
        (('overlay = "overlay"', 'overlay = "nowhere"'), "nowhere"),
        (('data = "24MiB"', 'data = "24MiB"\ndisk = "64MiB"'), "too small"),
    ],
)
def test_bad_recipes_fail_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], message: str
) -> None:
    path = write_recipe(tmp_path / "recipe", RECIPE.replace(*edit))
    res = run_cli(capsys, "image", "build", str(path), "-o", str(tmp_path / "out"), "--cache", str(tmp_path / "c"))
    assert res.rc == 30, res.err
    assert str(path) in res.err and message in res.err and "Traceback" not in res.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


# --- stage keys and sizes ------------------------------------------------------------------------------------


def test_system_key_ignores_what_later_stages_use(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "recipe")
    r = recipe.load(path)

    def key(text: str = RECIPE) -> str:
        path.write_text(text)
        return rootfs.system_key(recipe.load(path), "base", "wheels", b"keyring", None)

    k = key()
    assert key(RECIPE.replace('rootfs = "32MiB"', 'rootfs = "48MiB"')) == k
    assert key(RECIPE.replace('version = "1.2.3"', 'version = "1.2.4"')) == k
    (tmp_path / "recipe" / "overlay" / "etc" / "motd").write_text("changed\n")
    assert key() == k  # the overlay is applied after the system stage
    assert key(RECIPE.replace('hostname = "dev-{device_id}"', 'hostname = "x-{device_id}"')) != k
    assert rootfs.system_key(r, "base", "wheels", b"other keyring", None) != k
    assert rootfs.system_key(r, "base", "wheels", b"keyring", SDE) != k
    (tmp_path / "recipe" / "keys" / "operator.pub").write_text(SSH_KEY.replace("test@", "other@") + "\n")
    assert key() != k


def test_wheels_digest_ignores_zip_timestamps(tmp_path: Path) -> None:
    def wheel(d: Path, when: tuple[int, int, int, int, int, int], body: bytes = b"x = 1\n") -> None:
        d.mkdir(exist_ok=True)
        with zipfile.ZipFile(d / "demo-1.0-py3-none-any.whl", "w") as z:
            z.writestr(zipfile.ZipInfo("demo/__init__.py", when), body)

    wheel(tmp_path / "a", (2020, 1, 1, 0, 0, 0))
    wheel(tmp_path / "b", (2024, 5, 5, 5, 5, 6))
    wheel(tmp_path / "c", (2020, 1, 1, 0, 0, 0), b"x = 2\n")
    assert rootfs.wheels_digest(tmp_path / "a") == rootfs.wheels_digest(tmp_path / "b")
    assert rootfs.wheels_digest(tmp_path / "a") != rootfs.wheels_digest(tmp_path / "c")


def test_rootfs_is_sized_to_its_content(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"x" * 10_000)
    os.link(tree / "d" / "f", tree / "hard")
    (tree / "short").symlink_to("d/f")
    used, inodes = rootfs.tree_usage(tree)
    assert (used, inodes) == (4 * 4096, 4)  # d (1 block), f once (3 blocks); the short symlink is in its inode
    assert rootfs.fs_size(used, inodes, 2 << 30) == 80 << 20
    assert rootfs.fs_size(1 << 30, 40_000, 2 << 30) == 1216 << 20
    with pytest.raises(ImageBuildError, match=r"needs about 1216 MiB, a slot has 1024 MiB"):
        rootfs.fs_size(1 << 30, 40_000, 1 << 30)


# --- progress -------------------------------------------------------------------------------------------------


def test_stages_log_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    st = Stages(stream=out)
    with st.step("base", "mmdebstrap") as s:
        s.note("reused from the cache")
        with st.bar("bundle", 100) as update:
            update(50)
            update(50)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "base: mmdebstrap" and lines[1] == "  base: reused from the cache"
    assert re.fullmatch(r"base: done in \d+\.\d s", lines[-1]) and "base" in st.seconds
    assert format_duration(125) == "2 min 05 s" and format_duration(3.14) == "3.1 s"
    quiet = io.StringIO()
    with Stages(stream=quiet, enabled=False).step("x", "y"):
        pass
    assert quiet.getvalue() == ""


# --- booting --------------------------------------------------------------------------------------------------


def test_kvm_only_with_hardware_virtualization(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    machine = os.uname().machine
    assert not qemu.kvm_usable(machine, "flags : fpu sse2 hypervisor", dev)
    assert qemu.kvm_usable("x86_64", "flags : fpu vmx sse2", dev) == (machine == "x86_64")
    assert not qemu.kvm_usable("x86_64", "flags : vmx", tmp_path / "missing")


def test_boot_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = qemu.argv(tmp_path / "d.img", tmp_path / "VARS.fd", qemu.BootOptions(kvm=False, ssh_port=2222))
    text = " ".join(argv)
    assert "-accel tcg -cpu max" in text and "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22" in text
    assert f"file={tmp_path / 'd.img'},format=raw,if=virtio" in text and "-serial mon:stdio" in text
    assert "snapshot=on" in " ".join(qemu.argv(tmp_path / "d.img", tmp_path / "V", qemu.BootOptions(snapshot=True)))
    if not qemu.FIRMWARE["x86_64"].vars.is_file():
        pytest.skip("OVMF missing (apt package ovmf)")
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    res = run_cli(capsys, "image", "boot", str(img), "--print", "--accel", "tcg", "--no-network")
    assert res.rc == 0 and "-nic none" in res.out and "-accel tcg" in res.out
    res = run_cli(capsys, "image", "boot", str(tmp_path / "missing.img"))
    assert res.rc == 4 and "is not a file" in res.err


# --- the must-show: build recipes/ipc-x86_64.toml, boot it, update it, roll back -------------------------------

# Development hooks for the test, applied after the recipe's overlay: a root shell on the serial console so
# the test can type `pitstop install`, as a person at the console would.
AUTOLOGIN = """\
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
"""


def console_image_request(recipe_path: Path, tmp: Path, serial: str) -> build.Request:
    """A build of `recipe_path` into `tmp`/out whose `serial` console logs root in (an extra overlay), with the
    tests' cache and epoch; the build tools are checked first."""
    for name in ("mmdebstrap", "chroot", "tar", "mkfs.ext4", "sfdisk", "grub-mkimage"):
        find_tool(name)
    dropin = tmp / "hooks" / f"etc/systemd/system/serial-getty@{serial}.service.d"
    dropin.mkdir(parents=True)
    (dropin / "autologin.conf").write_text(AUTOLOGIN)
    return build.Request(recipe_path, tmp / "out", CACHE, REPO, SDE, True, extra_overlay=tmp / "hooks")


@pytest.fixture(scope="module")
def ipc_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[build.Result]:
    tmp = tmp_path_factory.mktemp("ipc")
    yield build.build(console_image_request(IPC_RECIPE, tmp, "ttyS0"), Stages(enabled=True))
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.root
@pytest.mark.vm
def test_ipc_build_outputs(ipc_image: build.Result, capsys: pytest.CaptureFixture[str]) -> None:
    o, m = ipc_image.outputs, ipc_image.manifest
    assert m["recipe"]["name"] == "ipc-x86_64" and m["source_date_epoch"] == SDE and m["reproducible"]
    names = {p["name"]: p["version"] for p in m["packages"]}
    for pkg in ("systemd", "systemd-resolved", "openssh-server", "chrony", "python3", "linux-image-amd64"):
        assert pkg in names, pkg
    wheels = {p["name"] for p in m["python"]}
    assert {"pitstop", "onnxruntime", "numpy"} <= wheels
    assert m["artifacts"]["rootfs"]["sha256"] == file_sha256(o.rootfs)
    assert o.bundle is not None and m["artifacts"]["bundle"]["sha256"] == file_sha256(o.bundle)
    assert m["artifacts"]["disk"]["bmap"]["sha256"] == file_sha256(o.bmap)
    assert json.loads(o.manifest.read_text()) == m
    # The rootfs is sized to its content, not to the slot.
    assert o.rootfs.stat().st_size < recipe.load(IPC_RECIPE).partitions.rootfs
    fsck_clean(o.rootfs)
    assert "Type: regular" in debugfs(o.rootfs, "stat /opt/pitstop/bin/pitstop")
    assert b"--autologin root" in debugfs_cat(
        o.rootfs, "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
    )
    assert "pitstop.service" in debugfs(o.rootfs, "ls /etc/systemd/system/multi-user.target.wants")
    assert b'<policy group="pitstop">' in debugfs_cat(o.rootfs, "/usr/share/dbus-1/system.d/org.pitstop.Daemon1.conf")
    assert re.search(rb"^pitstop:x:\d+:", debugfs_cat(o.rootfs, "/etc/group"), re.M)
    res = run_cli(
        capsys,
        "bundle",
        "verify",
        str(o.bundle),
        "--keyring",
        str(CACHE / "dev-keys" / "keyring.pem"),
        "--compatible",
        "pitstop-ipc-x86_64",
    )
    assert res.rc == 0, res.err


class Console:
    """A root shell on the VM's serial console: type a command, wait for its exit status."""

    def __init__(self, vm: object) -> None:
        from vm.qemu import Vm

        assert isinstance(vm, Vm)
        self.vm = vm
        self.n = 0

    def ready(self, timeout: float = 60) -> None:
        """Wait until the shell answers (autologin has run)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            self.n += 1
            start = self.vm.mark()
            self.vm.send(f"echo @@alive-{self.n}@@\n")
            try:
                self.vm.wait_for(rf"^@@alive-{self.n}@@", min(5.0, max(0.1, deadline - time.monotonic())), start=start)
                self.vm.send("stty cols 250; export SYSTEMD_PAGER=\n")
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def run(self, cmd: str, timeout: float) -> tuple[int, list[str]]:
        """(exit status, the console lines printed while it ran)."""
        self.n += 1
        start = self.vm.mark()
        self.vm.send(f"{cmd}; echo @@done-{self.n} rc=$?@@\n")
        i, line = self.vm.wait_for(rf"@@done-{self.n} rc=(\d+)@@", timeout, start=start)
        m = re.search(rf"@@done-{self.n} rc=(\d+)@@", line.text)
        assert m
        return int(m[1]), [ln.text for ln in self.vm.lines[start:i]]


def install_and_reboot(sh: Console, url: str, timeout: float) -> int:
    """`pitstop install URL` at the console: the daemon installs, the command exits 0, and the daemon reboots by
    its policy (immediate). Returns the line where the reboot's output may begin."""
    sh.n += 1
    start = sh.vm.mark()
    sh.vm.send(f"pitstop -q install {url}; echo @@done-{sh.n} rc=$?@@\n")
    # The reboot follows the command's end at once: take whichever line comes first.
    i, line = sh.vm.wait_for(rf"@@done-{sh.n} rc=(\d+)@@|pitstop-grub: booting slot", timeout, start=start)
    m = re.search(rf"@@done-{sh.n} rc=(\d+)@@", line.text)
    assert m is None or m[1] == "0", "\n".join(ln.text for ln in sh.vm.lines[start : i + 1][-20:])
    return i if m is None else i + 1


def slot_is_up(sh: Console, slot: str, start: int, *, other_bad: bool = False, update: str | None = None) -> float:
    """After line `start`: `PITSTOP-READY slot=<slot>`, no failed unit, and `pitstop status` calling that slot
    good, booted and primary (and, with `other_bad`, the other one not good). Returns when it reported ready."""
    _, line = sh.vm.wait_for(r"PITSTOP-READY", 300, start=start)
    # journald forwards the daemon's stdout to the console with its own prefix (`[  53.1] pitstop[348]: `).
    assert re.search(r"PITSTOP-READY slot=(\S+)", line.text)[1] == slot, line.text  # type: ignore[index]
    failed = [ln.text for ln in sh.vm.lines[start:] if "[FAILED]" in ln.text]
    assert not failed, "\n".join(failed)
    sh.ready()
    rc, out = sh.run("pitstop status", 60)
    assert rc == 0 and any(re.search(rf"slot {slot}: good .* booted primary", ln) for ln in out), out
    other = "b" if slot == "a" else "a"
    assert not (other_bad and any(re.search(rf"slot {other}: good", ln) for ln in out)), out
    # The daemon answered (not the --local fallback), and its update agent ended where the scenario says.
    assert any(re.search(rf"^daemon: pitstop \S+, update {update or ''}", ln) for ln in out), out
    return line.t


def broken_bundle(tmp_path: Path, vmlinuz: Path, compatible: str, size: int) -> Path:
    """A bundle, signed with the builder's development keys, whose rootfs holds `vmlinuz` and the test kit's initrd
    in its "bad" mode (an init that exits, or one the kernel cannot run): the kernel panics at every boot."""
    from vm import image as vm_image

    bad_slot = vm_image.build_slot(tmp_path / "bad", vmlinuz, "bad", size)
    bad = tmp_path / "broken.pitb"
    keys = CACHE / build.DEV_KEYS_DIR
    spec = BundleSpec(
        "1.0.1",
        1,
        compatible,
        (PayloadSpec("rootfs", "rootfs", bad_slot, "rootfs"),),
        created=datetime.fromtimestamp(SDE + 60, UTC),
    )
    create_bundle(spec, bad, KeyFileSigner.load(keys / "signing.key", [keys / "chain.pem"]))
    return bad


@pytest.mark.root
@pytest.mark.vm
def test_ipc_image_boots_updates_to_b_and_rolls_back_a_broken_bundle(ipc_image: build.Result, tmp_path: Path) -> None:
    """One machine, three boots of real Debian and three failed ones: slot a up and marked good; the first bundle
    installed into slot b over HTTP with `pitstop install`; slot b booted and committed; a bundle whose rootfs
    cannot boot installed into slot a; GRUB spends its tries on it and falls back to slot b by itself."""
    from httpkit import FileServer
    from vm.qemu import Vm

    vmlinuz = guest_kernel_or_skip()
    o = ipc_image.outputs
    assert o.bundle is not None
    # The broken update: a rootfs whose init exits (the kernel panics, panic=5 reboots), signed like a good one.
    bad = broken_bundle(tmp_path, vmlinuz, "pitstop-ipc-x86_64", 64 << 20)
    disk = tmp_path / "disk.img"
    run(["cp", "--sparse=always", o.disk, disk])  # the build's image stays as built
    data_size = recipe.load(IPC_RECIPE).layout().part("data").size
    os.truncate(disk, disk.stat().st_size + (1 << 30))  # flashed to a larger disk: data grows into the rest
    opts = qemu.BootOptions(memory_mib=1024, cpus=1, kvm=False)
    with FileServer() as srv:
        srv.add("first.pitb", o.bundle)
        srv.add("broken.pitb", bad)
        port = srv.base_url.rsplit(":", 1)[1]
        with Vm(disk, tmp_path, name="ipc", limit=1500, opts=opts, console_input=True) as vm:
            sh = Console(vm)
            ready_a = slot_is_up(sh, "a", 0)
            rc, out = sh.run("lsblk -bno SIZE /dev/disk/by-partlabel/data; df -B1 --output=size /data | tail -1", 60)
            assert rc == 0, out
            part, fs = (int(x) for x in [ln.strip() for ln in out if ln.strip().isdigit()][-2:])
            assert part >= data_size + (1 << 30) - (1 << 20), (part, data_size)  # less the backup GPT
            assert fs > data_size, (fs, data_size)
            # Over D-Bus to the daemon, which installs and reboots at once ([update] reboot = "immediate").
            start = install_and_reboot(sh, f"http://10.0.2.2:{port}/first.pitb", 900)
            vm.wait_for(r"pitstop-grub: booting slot b", 180, start=start)
            # Slot b on trial: the daemon's health gate holds, then it commits and says so.
            slot_is_up(sh, "b", start, update="committed")
            start = install_and_reboot(sh, f"http://10.0.2.2:{port}/broken.pitb", 300)
            # Three tries of the broken slot, each a kernel panic and a reset, then GRUB falls back to b.
            for _ in range(3):
                _, failed = vm.wait_for(r"PITSTOP-BOOT-FAILED slot=a", 240, start=start)
                start = vm.lines.index(failed) + 1
            vm.wait_for(r"pitstop-grub: booting slot b", 60, start=start)
            slot_is_up(sh, "b", start, other_bad=True, update="failed")
            print(f"slot a ready {ready_a:.0f} s after QEMU started; whole scenario {vm.elapsed:.0f} s")
            vm.send("poweroff\n")
            vm.wait_exit(120)
    env = grubenv.decode(mcopy_out(disk, "EFI/BOOT/grubenv"))
    assert env["ORDER"].split()[0] == "b" and env["b_OK"] == "1", env


@pytest.mark.root
@pytest.mark.slow
def test_rootfs_is_reproducible(ipc_image: build.Result, tmp_path: Path) -> None:
    """Two rootfs builds of the reference recipe with the same SOURCE_DATE_EPOCH from the same base (the
    package snapshot): the system stage made twice from scratch, then the image: the same bytes."""
    r = recipe.load(IPC_RECIPE)
    base = rootfs.Cache(CACHE).path("base", ipc_image.manifest["stages"]["base"]["key"], ".tar")
    keyring = (CACHE / "dev-keys" / "keyring.pem").read_bytes()
    hashes = []
    for n in (1, 2):
        cache = rootfs.Cache(tmp_path / f"cache{n}")
        (cache.root / "base").mkdir(parents=True)
        os.link(base, cache.root / "base" / base.name)  # the same packages: the base is not rebuilt
        wheels = rootfs.wheelhouse(REPO, tmp_path / f"wheels{n}", rootfs.Cache(CACHE))
        built = rootfs.build_rootfs(r, tmp_path / f"rootfs{n}.ext4", rootfs.TreeInputs(cache, keyring, wheels, SDE))
        assert built.base_reused and not built.system_reused
        hashes.append(file_sha256(built.image))
        shutil.rmtree(cache.root)
    assert hashes[0] == hashes[1]
