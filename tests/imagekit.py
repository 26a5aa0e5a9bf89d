"""Test helpers for the image builder: small recipes with their files, small rootfs images, a factory CA, and
reading disk images back with the tools a person would use (sfdisk, mtools, debugfs)."""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bundlekit import CliResult, run_cli
from conftest import find_tool, in_ci
from cryptography import x509

import pitstop.cli
from pitstop.image import cli as image_cli
from pitstop.image import ext4
from pitstop.ota import devkeys
from pitstop.runner import run

SDE = 1_700_000_000  # SOURCE_DATE_EPOCH of the tests' builds
MiB = 1 << 20
BUILD_TOOLS = (
    "mkfs.ext4",
    "debugfs",
    "dumpe2fs",
    "e2fsck",
    "mkfs.vfat",
    "mmd",
    "mcopy",
    "mdir",
    "mtype",
    "sfdisk",
    "grub-mkimage",
)
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}

# A real OpenSSH public key line (its private half was never kept).
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOIfarQIuhc3O6pGG10L2DewTWL2oD9DP1RhXOWJayFp test@pitstop"

RECIPE = """\
name = "small"
description = "a test image"

[target]
compatible = "pitstop-test-image"

[base]
components = ["main"]

[packages]
include = ["systemd", "openssh-server"]

[partitions]
esp = "16MiB"
rootfs = "32MiB"
data = "24MiB"

[boot]
cmdline = "console=ttyS0,115200 panic=1"
tries = 3

[system]
hostname = "dev-{device_id}"

[[user]]
name = "maint"
groups = ["sudo"]
ssh_keys = ["keys/operator.pub"]

[network]
ntp = ["ntp.example.com"]

[[network.interface]]
match = "en*"

[files]
overlay = "overlay"

[daemon]
config = "pitstop.toml"

[keys]
keyring = "keyring.pem"

[bundle]
version = "1.2.3"
security_version = 4

[[model]]
name = "det"
source = "models/det.onnx"
description_file = "models/det.toml"
"""


def need_tools(*names: str) -> None:
    for name in names or BUILD_TOOLS:
        find_tool(name)


def write_recipe(directory: Path, text: str = RECIPE, *, name: str = "small.toml") -> Path:
    """`text` as a recipe in `directory`, with every file the default recipe names."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "keys").mkdir(exist_ok=True)
    (directory / "keys" / "operator.pub").write_text(f"# the operator's key\n{SSH_KEY}\n")
    (directory / "overlay" / "etc").mkdir(parents=True, exist_ok=True)
    (directory / "overlay" / "etc" / "motd").write_text("hello\n")
    (directory / "pitstop.toml").write_text("[update]\npoll_default_s = 60\n")
    (directory / "models").mkdir(exist_ok=True)
    (directory / "models" / "det.onnx").write_bytes(bytes(range(256)) * 64)
    (directory / "models" / "det.toml").write_text('name = "det"\n[[inputs]]\nname = "x"\nshape = [1, 3, 32, 32]\n')
    keyring = directory / "keyring.pem"
    if not keyring.exists():
        pki = devkeys.make_dev_pki(name="recipe test")
        keyring.write_bytes(devkeys.cert_pem(pki.root))
    path = directory / name
    path.write_text(text)
    return path


def make_rootfs(path: Path, size: int = 32 * MiB, *, marker: str = "slot") -> Path:
    """A small ext4 "rootfs" with a few files, reproducible."""
    tree = path.with_name(path.name + ".tree")
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "os-release").write_text(f'NAME="pitstop test"\nVARIANT_ID={marker}\n')
    (tree / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    (tree / "usr" / "bin" / "tool").write_bytes(bytes(range(256)) * 1000)
    return ext4.make_ext4(path, size, tree, label="rootfs", uuid="5a5a5a5a-1111-4000-8000-000000000f50", epoch=SDE)


def sfdisk_json(disk: Path | str) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(run(["sfdisk", "--json", disk]).text)["partitiontable"]
    return table


def part_offset(disk: Path, name: str) -> tuple[int, int]:
    for p in sfdisk_json(disk)["partitions"]:
        if p.get("name") == name:
            return p["start"] * 512, p["size"] * 512
    raise KeyError(name)


def esp_spec(disk: Path) -> str:
    """The disk's ESP as mtools names it."""
    return f"{disk}@@{part_offset(disk, 'esp')[0]}"


def mtype(disk: Path, name: str) -> bytes:
    return run(["mtype", "-i", esp_spec(disk), f"::/{name}"], env=MTOOLS_ENV).stdout


def mcopy_out(disk: Path, name: str) -> bytes:
    return run(["mcopy", "-n", "-i", esp_spec(disk), f"::/{name}", "-"], env=MTOOLS_ENV).stdout


def mdir(disk: Path, directory: str) -> str:
    return run(["mdir", "-b", "-i", esp_spec(disk), f"::/{directory}"], env=MTOOLS_ENV).text


def data_spec(disk: Path, name: str = "data") -> str:
    return f"{disk}?offset={part_offset(disk, name)[0]}"


def debugfs(fs: Path | str, request: str) -> str:
    return run(["debugfs", "-R", request, fs]).text


def debugfs_cat(fs: Path | str, path: str) -> bytes:
    res = run(["debugfs", "-R", f"cat {path}", fs])
    assert b"not found" not in res.stderr, res.stderr
    return res.stdout


def inode_mode(fs: Path | str, path: str) -> int:
    """Permission bits (setuid/setgid/sticky included), as debugfs shows them."""
    m = re.search(r"Mode:\s+(\d+)", debugfs(fs, f"stat {path}"))
    assert m, path
    return int(m[1], 8)


def fsck_clean(fs: Path | str) -> None:
    res = run(["e2fsck", "-fn", fs], check=False)
    assert res.returncode == 0, (res.stdout + res.stderr).decode()


@dataclass(frozen=True)
class Ca:
    cert: Path
    key: Path
    certificate: x509.Certificate


def factory_ca(directory: Path, *, valid: bool = True) -> Ca:
    """A factory CA (certificate and key files)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = devkeys.new_key("ecdsa-p256")
    now = datetime.now(UTC)
    nb, na = (
        (now - timedelta(days=1), now + timedelta(days=3650))
        if valid
        else (now - timedelta(days=20), now - timedelta(days=10))
    )
    cert = devkeys.issue(key, "ACME factory CA", ca=True, path_length=0, not_before=nb, not_after=na)
    (directory / "ca.pem").write_bytes(devkeys.cert_pem(cert))
    (directory / "ca.key").write_bytes(devkeys.key_pem(key))
    return Ca(directory / "ca.pem", directory / "ca.key", cert)


def _with_image(build: Callable[[], argparse.ArgumentParser]) -> Callable[[], argparse.ArgumentParser]:
    def wrapped() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "image" not in sub.choices:  # until pitstop/cli.py registers it
            image_cli.register(sub)
        return parser

    return wrapped


def image_cli_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: Any) -> CliResult:
    """`pitstop ARGS…` with `pitstop image` available; the result of bundlekit.run_cli (rc, out, err)."""
    monkeypatch.setattr(pitstop.cli, "build_parser", _with_image(pitstop.cli.build_parser))
    return run_cli(capsys, *args)


def dedent(text: str) -> str:
    return textwrap.dedent(text)


def guest_kernel_or_skip() -> Path:
    """The tests/vm guest's kernel, with busybox and OVMF present; skips (fails under CI=true) otherwise."""
    from vm import image as vm_image
    from vm import kernel
    from vm.qemu import OVMF_VARS

    find_tool("busybox")
    if not OVMF_VARS.is_file():
        pytest.skip(f"{OVMF_VARS} missing (apt package ovmf)")
    try:
        return vm_image.guest_kernel()
    except kernel.KernelMissing as e:
        if in_ci():
            pytest.fail(str(e))
        pytest.skip(str(e))
