"""The HIL rig's targets other than QEMU: the local target (the rig host itself) and the real-device target (SSH,
a serial console, hooks), with everything that runs without a device: the ssh client against a closed port, the
console from a command, flashing to a regular file through `pitstop image flash` with the hooks around it,
provisioning with the rig's factory CA."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import find_tool
from imagekit import SDE, make_rootfs, need_tools, write_recipe

from pitstop.hil.errors import ConsoleClosed, HilError, ShellError, ShellTimeout
from pitstop.hil.local_target import LocalTarget
from pitstop.hil.power import CommandPower
from pitstop.hil.ssh_target import SshAddress, SshConfig, SshTarget, parse_ssh_url, source_address
from pitstop.hil.target import FLASH, NETWORK, POWER, SHELL, Provision, rig_factory_ca
from pitstop.image import disk, provision, recipe


def test_local_target_life(tmp_path: Path) -> None:
    log = tmp_path / "power.log"
    with LocalTarget("dut", tmp_path / "dut", power=CommandPower(f"echo on >> {log}", f"echo off >> {log}")) as t:
        assert t.capabilities >= {FLASH, POWER, NETWORK, SHELL} and t.host_address == "127.0.0.1"
        t.power_on()
        hit = t.wait_ready("a", 10)
        assert hit[1] == "a"
        with pytest.raises(HilError, match="already powered on"):
            t.power_on()
        start = t.console.mark()
        t.console.send("typed\n")
        t.console.wait_for("^typed$", 5, start=start)
        assert t.shell("echo out; echo err >&2; exit 2") == (2, "out\nerr\n")
        with pytest.raises(ShellError, match="exited 1"):
            t.shell("false", check=True)
        with pytest.raises(ShellTimeout):
            t.shell("sleep 5", 0.3)
        t.network(False)
        t.power_cut()
        with pytest.raises(ConsoleClosed):
            t.console.wait_for("never", 5)
        t.power_on()
        t.wait_ready("a", 10, start=start)
        assert t.power_off() is True
    assert log.read_text() == "on\noff\non\noff\n"
    kinds = [e.kind for e in t.timeline.events]
    assert kinds.count("ready") == 2 and kinds.count("grub") == 2
    rig = [e.kind for e in t.timeline.events if e.source == "rig"]
    assert rig == ["power-on", "shell", "shell", "shell", "network-down", "power-cut", "power-on", "power-off",
                   "power-off-done"]  # fmt: skip


def test_ssh_urls() -> None:
    assert parse_ssh_url("ssh://root@10.0.0.5") == SshAddress("root", "10.0.0.5", 22)
    assert parse_ssh_url("ssh://pi@board.local:2222") == SshAddress("pi", "board.local", 2222)
    v6 = parse_ssh_url("ssh://[fe80::1]:2200")
    assert v6 == SshAddress(None, "fe80::1", 2200) and str(v6) == "ssh://[fe80::1]:2200"
    assert v6.destination == "fe80::1"
    for bad in ("http://x", "ssh://", "ssh://u:pw@host", "ssh://host/path", "ssh://host:port"):
        with pytest.raises(HilError):
            parse_ssh_url(bad)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_ssh_target_commands_and_hooks(tmp_path: Path) -> None:
    find_tool("ssh")
    log = tmp_path / "hooks.log"
    port = closed_port()
    cfg = SshConfig(
        parse_ssh_url(f"ssh://root@127.0.0.1:{port}"),
        console="sh -c 'echo pitstop-grub: booting slot b; echo PITSTOP-READY slot=b; sleep 30'",
        power=CommandPower(f"echo on >> {log}", f"echo off >> {log}"),
        net_down=f"echo down >> {log}",
        net_up=f"echo up >> {log}",
        identity=tmp_path / "id_ed25519",
    )
    with SshTarget("bench", tmp_path / "bench", cfg) as t:
        assert t.capabilities == frozenset({SHELL, POWER, NETWORK, "console"})  # no way to flash configured
        argv = t.ssh_argv("pitstop status --json")
        assert argv[0] == "ssh" and argv[-3:] == [
            "root@127.0.0.1",
            "--",
            "sh -c 'pitstop status --json' </dev/null 2>&1",
        ]
        text = " ".join(argv)
        for opt in ("BatchMode=yes", "ConnectTimeout=10", f"UserKnownHostsFile={t.known_hosts}",
                    "StrictHostKeyChecking=accept-new", "ServerAliveInterval=5", f"-i {tmp_path / 'id_ed25519'}",
                    f"-p {port} root@127.0.0.1 -- sh -c 'pitstop status --json' </dev/null 2>&1"):  # fmt: skip
            assert opt in text, opt
        assert t.host_address == "127.0.0.1"
        with pytest.raises(ShellError, match=r"ssh to ssh://root@127\.0\.0\.1:\d+: .*(refused|Connection)"):
            t.shell("true", 20)
        t.power_on()
        t.wait_ready("b", 10)  # the console came from a command
        t.network(False)
        t.network(True)
        t.power_cut()
        with pytest.raises(HilError, match="cannot do: flash"):
            t.flash(tmp_path / "x.img")
    assert log.read_text() == "on\ndown\nup\noff\n"
    assert [e.kind for e in t.timeline.events if e.source == "console"] == ["grub", "ready"]
    bare = SshTarget("bare", tmp_path / "bare", SshConfig(SshAddress("root", "127.0.0.1"), host_address="10.1.1.1"))
    assert bare.capabilities == frozenset({SHELL}) and bare.host_address == "10.1.1.1"
    with pytest.raises(HilError, match="cannot do: power"):
        bare.power_on()
    with pytest.raises(ConsoleClosed):
        bare.console.wait_for("x", 1)
    bare.close()
    assert source_address("127.0.0.1") == "127.0.0.1"


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    need_tools()
    d = tmp_path_factory.mktemp("hil-image")
    path = write_recipe(d / "recipe")
    disk.build_disk(recipe.load(path), make_rootfs(d / "rootfs.ext4"), d / "disk.img", d / "work", epoch=SDE)
    return d / "disk.img", path


def test_ssh_target_flashes_a_provisioned_copy(small_image: tuple[Path, Path], tmp_path: Path) -> None:
    """The bench's flash: power off, SD-mux to the rig, `pitstop image flash` of a provisioned copy, SD-mux back."""
    image, recipe_path = small_image
    log = tmp_path / "hooks.log"
    card = tmp_path / "card.img"  # the SD card as the rig's reader shows it: a regular file will do
    card.write_bytes(b"old contents" * 1000)
    cfg = SshConfig(
        SshAddress("root", "127.0.0.1"),
        power=CommandPower(f"echo on >> {log}", f"echo off >> {log}"),
        flash_device=card,
        flash_before=f"echo mux-host >> {log}",
        flash_after=f"echo mux-dut >> {log}",
    )
    cert, key = rig_factory_ca(tmp_path / "ca")
    with SshTarget("bench", tmp_path / "bench", cfg) as t:
        t.known_hosts.write_text("old-device ssh-ed25519 AAAA\n")
        t.flash(image, provision=Provision("SN-1", "https://updates.example.com", "tok", cert, key, recipe=recipe_path))
        assert t.known_hosts.read_text() == ""  # the flashed device will make new host keys
        assert not (t.workdir / "flash.img").exists()  # the provisioned copy is gone
    assert log.read_text() == "off\nmux-host\nmux-dut\n"
    assert provision.read_identity(card) == b"SN-1\n"
    assert provision.read_identity(image) is None
    flash_event = t.timeline.events[0]
    assert flash_event.kind == "flash" and f"pitstop image flash to {card}" in flash_event.text
    assert flash_event.data["device_id"] == "SN-1"

    # A vendor's flasher instead: the command gets the provisioned copy.
    out = tmp_path / "flashed.img"
    cfg2 = SshConfig(SshAddress("root", "127.0.0.1"), flash_command=f"cp --sparse=always {{image}} {out}")
    with SshTarget("bench2", tmp_path / "bench2", cfg2) as t2:
        t2.flash(image, provision=Provision("SN-2", "https://u.example.com", "tok", cert, key))
    assert provision.read_identity(out) == b"SN-2\n"
