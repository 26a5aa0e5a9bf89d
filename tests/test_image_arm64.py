"""arm64 images: recipes/arm64-uefi.toml built on an x86_64 host (a foreign rootfs through binfmt_misc and
qemu-user, GRUB's arm64-efi modules from the image's own rootfs) and booted in qemu-system-aarch64 with AAVMF.

The pure parts run everywhere: the recipe, mmdebstrap's and grub-mkimage's command lines, the wheels' platform,
the binfmt preflight's decisions, QEMU's command line. The must-show (`slow`, `vm`, root) builds the image
(stages cached in .cache/image, as the x86_64 test does), boots it under TCG to `PITSTOP-READY slot=a`, imports
ONNX Runtime in the guest, installs the first bundle into slot b with `pitstop install`, and sees slot b booted
and committed. docs/image.md "arm64" has the run times.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagekit import write_recipe
from test_image_build import Console, broken_bundle, console_image_request, install_and_reboot, slot_is_up

from pitstop.image import build, esp, partitions, qemu, recipe, rootfs
from pitstop.image.errors import ImageBuildError, RecipeError
from pitstop.image.progress import Stages
from pitstop.ota import grubenv
from pitstop.runner import run

REPO = Path(__file__).resolve().parent.parent
ARM64_RECIPE = REPO / "recipes" / "arm64-uefi.toml"
CACHE = REPO / ".cache" / "image"
SERIAL = "ttyAMA0"


# --- the recipe -----------------------------------------------------------------------------------------------


def test_arm64_recipe_is_valid_and_lean() -> None:
    r = recipe.load(ARM64_RECIPE)
    assert (r.target.arch, r.target.compatible) == ("arm64", "pitstop-arm64-uefi")
    assert f"console={SERIAL}" in r.boot.cmdline
    pkgs = rootfs.packages(r)
    assert {"linux-image-arm64", "grub-efi-arm64-bin", "python3-venv", "openssh-server"} <= set(pkgs)
    assert not [p for p in pkgs if "amd64" in p or p.startswith(("firmware-", "intel-", "amd64-"))], pkgs
    # The slots are "Linux root (64-bit ARM)" partitions.
    layout = r.layout()
    assert layout.part("rootfs_a").type_guid == layout.part("rootfs_b").type_guid == partitions.ROOT_TYPES["arm64"]


def test_arch_is_checked(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r", _recipe_text("x86_64"))
    assert recipe.load(path).target.arch == "x86_64"
    path = write_recipe(tmp_path / "r", _recipe_text("arm64"))
    r = recipe.load(path)
    assert r.target.arch == "arm64" and "linux-image-arm64" in rootfs.packages(r)
    assert "linux-image-amd64" not in rootfs.packages(r)
    path = write_recipe(tmp_path / "r", _recipe_text("riscv64"))
    with pytest.raises(RecipeError, match=r"target\.arch.*'riscv64'.*x86_64.*arm64"):
        recipe.load(path)


def _recipe_text(arch: str) -> str:
    from imagekit import RECIPE

    return RECIPE.replace('compatible = "pitstop-test-image"', f'arch = "{arch}"\ncompatible = "pitstop-test-image"')


def test_mmdebstrap_argv_for_arm64() -> None:
    r = recipe.load(ARM64_RECIPE)
    argv = rootfs.mmdebstrap_argv(r, Path("/out.tar"))
    assert argv[:5] == ["mmdebstrap", "--mode=root", "--variant=minbase", "--arch=arm64", "--format=tar"]
    include = next(a for a in argv if a.startswith("--include=")).removeprefix("--include=").split(",")
    assert "linux-image-arm64" in include and "grub-efi-arm64-bin" in include
    assert argv[-4:] == [
        "/out.tar",
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]
    # The architecture is part of the base stage's key.
    x86 = recipe.load(REPO / "recipes" / "ipc-x86_64.toml")
    assert rootfs.base_key(r, None, "1.3.5") != rootfs.base_key(x86, None, "1.3.5")
    # The initramfs is made once, at the end (mkinitramfs under qemu-user takes minutes); x86_64 is untouched.
    hooks = [a for a in argv if a.startswith(("--essential-hook=", "--customize-hook="))]
    assert hooks == rootfs.initramfs_once_hooks() and len(hooks) == 2
    assert "dpkg-divert" in hooks[0] and "--add /usr/sbin/update-initramfs" in hooks[0]
    assert "--remove /usr/sbin/update-initramfs" in hooks[1] and 'update-initramfs -c -k "$k"' in hooks[1]
    assert not [a for a in rootfs.mmdebstrap_argv(x86, Path("/o")) if a.startswith("--essential-hook")]


# --- GRUB -------------------------------------------------------------------------------------------------------


def test_grub_mkimage_argv_for_arm64(tmp_path: Path) -> None:
    target = esp.grub_target("arm64")
    assert (target.platform, target.binary) == ("arm64-efi", "BOOTAA64.EFI")
    argv = esp.grub_mkimage_argv(target, tmp_path / "grub.efi", tmp_path / "memdisk.tar")
    assert argv[:7] == [
        "grub-mkimage",
        "-O",
        "arm64-efi",
        "-o",
        str(tmp_path / "grub.efi"),
        "-d",
        str(target.modules_dir),
    ]
    assert argv[7:11] == ["-m", str(tmp_path / "memdisk.tar"), "-p", "(memdisk)/boot/grub"]
    assert argv[11:] == ["memdisk", "tar", *esp.GRUB_MODULES]
    # The modules come from the image's rootfs when the build passes them, the host's otherwise.
    tree = tmp_path / "tree" / "usr/lib/grub/arm64-efi"
    assert esp.grub_target("arm64", tree).modules_dir == tree
    assert esp.grub_target("x86_64").modules_dir == Path("/usr/lib/grub/x86_64-efi")
    assert esp.grub_target("arm64").modules_dir == Path("/usr/lib/grub/arm64-efi")
    with pytest.raises(ImageBuildError, match="no UEFI GRUB platform known for riscv64"):
        esp.grub_target("riscv64")


def test_grub_modules_come_from_the_images_tree(tmp_path: Path) -> None:
    tree = tmp_path / "system.tree"
    built = rootfs.Rootfs(tmp_path / "r.ext4", True, True, [], "b", "s", tree)
    assert built.grub_modules("x86_64") is None  # the build host's
    with pytest.raises(ImageBuildError, match=r"no GRUB modules in /usr/lib/grub/arm64-efi.*grub-efi-arm64-bin"):
        built.grub_modules("arm64")
    d = tree / "usr/lib/grub/arm64-efi"
    d.mkdir(parents=True)
    (d / "moddep.lst").write_text("linux: \n")
    assert built.grub_modules("arm64") == d


def test_esp_holds_bootaa64(tmp_path: Path) -> None:
    efi = tmp_path / "grub.efi"
    efi.write_bytes(b"MZ")
    layout = recipe.load(ARM64_RECIPE).layout()
    files = esp.esp_files(layout, efi=efi, cmdline="console=ttyAMA0 panic=5", tries=3, arch="arm64")
    assert files["EFI/BOOT/BOOTAA64.EFI"] == b"MZ" and "EFI/BOOT/BOOTX64.EFI" not in files
    assert "console=ttyAMA0" in files[esp.PLATFORM_CFG].decode()


# --- wheels -----------------------------------------------------------------------------------------------------


def test_wheels_are_for_the_images_python_and_arch() -> None:
    args = rootfs.wheel_platform_args("arm64")
    platforms = [a.removeprefix("--platform=") for a in args if a.startswith("--platform=")]
    assert "manylinux2014_aarch64" in platforms and "manylinux_2_17_aarch64" in platforms
    assert "manylinux_2_36_aarch64" in platforms and "manylinux_2_37_aarch64" not in platforms  # bookworm: glibc 2.36
    assert all(p.endswith("_aarch64") for p in platforms)
    assert {"--python-version=3.11", "--implementation=cp", "--only-binary=:all:"} <= set(args)
    x86 = rootfs.wheel_platform_args("x86_64")
    assert "manylinux2014_x86_64" in [a.removeprefix("--platform=") for a in x86]


def test_wheel_cache_is_keyed_by_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each architecture's dependencies are downloaded into their own cache entry, with its platform."""
    calls: list[list[str]] = []

    def fake_run(argv: list[object], **_: object) -> None:
        cmd = [str(a) for a in argv]
        calls.append(cmd)
        if "wheel" in cmd:
            dest = Path(cmd[cmd.index("--wheel-dir") + 1])
            (dest / "pitstop-0.1.0-py3-none-any.whl").write_bytes(b"")
        else:
            d = Path(cmd[cmd.index("--dest") + 1])
            d.mkdir(parents=True)
            (
                d / f"numpy-2.0-cp311-cp311-{'aarch64' if '--platform=manylinux2014_aarch64' in cmd else 'x86_64'}.whl"
            ).touch()

    monkeypatch.setattr(rootfs, "run", fake_run)
    cache = rootfs.Cache(tmp_path / "cache")
    arm = rootfs.wheelhouse(REPO, tmp_path / "arm", cache, arch="arm64")
    x86 = rootfs.wheelhouse(REPO, tmp_path / "x86", cache, arch="x86_64")
    assert [p.name for p in arm.glob("numpy-*")] == ["numpy-2.0-cp311-cp311-aarch64.whl"]
    assert [p.name for p in x86.glob("numpy-*")] == ["numpy-2.0-cp311-cp311-x86_64.whl"]
    assert len(list((cache.root / "wheels").iterdir())) == 2
    downloads = [c for c in calls if "download" in c]
    assert len(downloads) == 2 and "--platform=manylinux2014_aarch64" in downloads[0]
    rootfs.wheelhouse(REPO, tmp_path / "arm2", cache, arch="arm64")  # cached: no new download
    assert len([c for c in calls if "download" in c]) == 2


# --- binfmt_misc ------------------------------------------------------------------------------------------------


def _state(**kw: object) -> rootfs.BinfmtState:
    fields: dict[str, object] = {
        "host": "amd64",
        "target": "arm64",
        "mounted": True,
        "entry": "enabled",
        "format_known": True,
        "update_binfmts": True,
    }
    fields.update(kw)
    return rootfs.BinfmtState(**fields)  # type: ignore[arg-type]


def test_binfmt_plan() -> None:
    assert rootfs.binfmt_plan(_state(target="amd64", mounted=False, entry=None, format_known=False)) == []
    assert rootfs.binfmt_plan(_state()) == []
    assert rootfs.binfmt_plan(_state(mounted=False)) == ["mount"]  # mounting shows the registered entry
    assert rootfs.binfmt_plan(_state(mounted=False, entry=None)) == ["mount", "enable"]
    assert rootfs.binfmt_plan(_state(entry="disabled")) == ["enable"]
    for missing in ({"format_known": False}, {"update_binfmts": False}):
        with pytest.raises(ImageBuildError, match=r"apt-get install qemu-user-static binfmt-support") as e:
            rootfs.binfmt_plan(_state(entry=None, **missing))
        assert "\n" not in str(e.value) and "qemu-aarch64" in str(e.value)


def test_binfmt_state_reads_the_kernels_entry(tmp_path: Path) -> None:
    assert rootfs.binfmt_state("arm64", tmp_path) == rootfs.BinfmtState(
        rootfs.host_deb_arch(),
        "arm64",
        False,
        None,
        Path("/usr/share/binfmts/qemu-aarch64").is_file(),
        shutil.which("update-binfmts") is not None,
    )
    (tmp_path / "status").write_text("enabled\n")
    (tmp_path / "qemu-aarch64").write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    st = rootfs.binfmt_state("arm64", tmp_path)
    assert st.mounted and st.entry == "disabled"
    assert rootfs.host_deb_arch("x86_64") == "amd64" and rootfs.host_deb_arch("aarch64") == "arm64"


def test_ensure_binfmt_runs_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter([_state(mounted=False, entry=None), _state()])
    ran: list[list[str]] = []
    monkeypatch.setattr(rootfs, "binfmt_state", lambda target: next(states))
    monkeypatch.setattr(rootfs, "host_deb_arch", lambda: "amd64")
    monkeypatch.setattr(rootfs, "run", lambda argv, **_: ran.append([str(a) for a in argv]))
    rootfs.ensure_binfmt("arm64")
    assert ran == [
        ["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"],
        ["update-binfmts", "--enable", "qemu-aarch64"],
    ]
    states = iter([_state(entry="disabled"), _state(entry="disabled")])
    with pytest.raises(ImageBuildError, match="no enabled qemu-aarch64 entry"):
        rootfs.ensure_binfmt("arm64")


# --- booting ----------------------------------------------------------------------------------------------------


def test_aarch64_boot_command_line(tmp_path: Path) -> None:
    argv = qemu.argv(tmp_path / "d.img", tmp_path / "VARS.fd", qemu.BootOptions(arch="arm64", kvm=False, cpus=2))
    text = " ".join(argv)
    assert argv[0] == "qemu-system-aarch64" and "-machine virt -accel tcg -cpu cortex-a57" in text
    assert "file=/usr/share/AAVMF/AAVMF_CODE.fd" in text and f"file={tmp_path / 'VARS.fd'}" in text
    assert argv == qemu.argv(tmp_path / "d.img", tmp_path / "VARS.fd", qemu.BootOptions("aarch64", kvm=False, cpus=2))
    assert qemu.qemu_arch("arm64") == "aarch64" and qemu.qemu_arch("x86_64") == "x86_64"


# --- the must-show: build recipes/arm64-uefi.toml, boot it, update it -------------------------------------------


@pytest.fixture(scope="module")
def arm64_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[build.Result]:
    tmp = tmp_path_factory.mktemp("arm64")
    req = console_image_request(ARM64_RECIPE, tmp, SERIAL)
    t0 = time.monotonic()
    result = build.build(req, Stages(enabled=True))
    print(f"arm64 build {time.monotonic() - t0:.0f} s: {result.seconds} reused {result.reused}")
    yield result
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.slow
def test_arm64_image_ab_update(arm64_image: build.Result, tmp_path: Path) -> None:
    """An arm64 machine under TCG: slot a up and marked good, ONNX Runtime imports, the first bundle installed
    into slot b over HTTP with `pitstop install`, slot b booted and committed; then a bundle whose rootfs cannot
    boot installed into slot a: GRUB spends its tries on it (kernel panics) and falls back to slot b by itself."""
    from arm64kit import Arm64Vm, aarch64_missing
    from httpkit import FileServer

    if (missing := aarch64_missing()) is not None:
        pytest.skip(missing)
    o, m = arm64_image.outputs, arm64_image.manifest
    assert o.bundle is not None
    names = {p["name"] for p in m["packages"]}
    assert {"linux-image-arm64", "grub-efi-arm64-bin", "openssh-server"} <= names
    assert any(p["wheel"].endswith("_aarch64.whl") for p in m["python"] if p["name"] == "onnxruntime"), m["python"]
    efi = run(["mcopy", "-n", "-i", f"{o.disk}@@{1 << 20}", "::/EFI/BOOT/BOOTAA64.EFI", "-"], env=esp.MTOOLS_ENV)
    assert efi.stdout[:2] == b"MZ"
    # The broken update: the image's own arm64 kernel with an initrd whose /init is an x86_64 program (the
    # test kit's busybox): the kernel cannot run it and panics (panic=5 reboots). Signed like a good bundle.
    system = rootfs.Cache(CACHE).path("system", m["stages"]["system"]["key"], ".tree")
    bad = broken_bundle(tmp_path, system / "vmlinuz", "pitstop-arm64-uefi", 96 << 20)
    disk = tmp_path / "disk.img"
    run(["cp", "--sparse=always", o.disk, disk])  # the build's image stays as built
    opts = qemu.BootOptions(arch="arm64", memory_mib=1536, cpus=2, kvm=False)
    with FileServer() as srv:
        srv.add("first.pitb", o.bundle)
        srv.add("broken.pitb", bad)
        port = srv.base_url.rsplit(":", 1)[1]
        with Arm64Vm(disk, tmp_path, name="arm64", limit=5400, opts=opts, console_input=True) as vm:
            sh = Console(vm)
            _, ready = vm.wait_for(r"PITSTOP-READY", 900)
            ready_a = ready.t
            slot_is_up(sh, "a", 0)
            t = time.monotonic()
            rc, out = sh.run(
                "/opt/pitstop/bin/python -c 'import onnxruntime as o, numpy, platform; "
                'print("ORT", o.__version__, o.get_available_providers(), platform.machine())\'',
                600,
            )
            assert rc == 0 and any(re.search(r"ORT \S+ \[.*'CPUExecutionProvider'.*\] aarch64", ln) for ln in out), out
            ort_s = time.monotonic() - t
            t = time.monotonic()
            start = install_and_reboot(sh, f"http://10.0.2.2:{port}/first.pitb", 3000)
            install_s = time.monotonic() - t
            vm.wait_for(r"pitstop-grub: booting slot b", 300, start=start)
            _, ready = vm.wait_for(r"PITSTOP-READY", 900, start=start)
            slot_is_up(sh, "b", start, update="committed")
            ready_b = ready.t
            start = install_and_reboot(sh, f"http://10.0.2.2:{port}/broken.pitb", 3000)
            # GRUB's tries of the broken slot, each a kernel panic and a reset, then the fallback to b.
            for _ in range(3):
                vm.wait_for(r"pitstop-grub: booting slot a", 300, start=start)
                panic, _ = vm.wait_for(r"Kernel panic", 300, start=start)
                start = panic + 1
            vm.wait_for(r"pitstop-grub: booting slot b", 300, start=start)
            _, ready = vm.wait_for(r"PITSTOP-READY", 900, start=start)
            slot_is_up(sh, "b", start, other_bad=True, update="failed")
            print(
                f"arm64: slot a ready {ready_a:.0f} s after QEMU started; import onnxruntime {ort_s:.0f} s; "
                f"install {install_s:.0f} s; slot b ready {ready_b:.0f} s; back on b after the broken "
                f"update {ready.t:.0f} s; whole scenario {vm.elapsed:.0f} s"
            )
            vm.send("poweroff\n")
            vm.wait_exit(300)
    env = grubenv.decode(run(["mcopy", "-n", "-i", f"{disk}@@{1 << 20}", "::/EFI/BOOT/grubenv", "-"]).stdout)
    assert env["ORDER"].split()[0] == "b" and env["b_OK"] == "1", env


def test_vars_copy_is_per_arch(tmp_path: Path) -> None:
    from arm64kit import aarch64_missing

    if (missing := aarch64_missing()) is not None:
        pytest.skip(missing)
    dest = qemu.vars_copy("arm64", tmp_path / "VARS.fd")
    assert dest.stat().st_size == qemu.FIRMWARE["aarch64"].vars.stat().st_size
    os.unlink(dest)
