"""The HIL rig's QEMU side: the QMP client against a real QEMU without a guest (`-machine none`), and the QEMU
target through a power cycle of a real machine (UEFI firmware, TCG) on a small disk built by the image builder.

Link state: QEMU 7.2 shows it nowhere (`info network` and `query-rx-filter` leave it out), so the test looks at
what a pulled cable does: QEMU's user network (slirp) is wired through a hub to a UDP socket netdev, a TCP
connection to a host-forwarded port makes slirp send an ARP request towards the guest, and the test's UDP socket
receives that frame while the link is up and nothing while it is down.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import find_tool
from imagekit import SDE, make_rootfs, need_tools, write_recipe

from pitstop.hil.errors import ConsoleClosed, HilError, QmpError
from pitstop.hil.qemu_target import QemuConfig, QemuTarget, qemu_missing
from pitstop.hil.qmp import Qmp
from pitstop.hil.target import Provision, rig_factory_ca
from pitstop.hil.timeline import Clock
from pitstop.image import disk, provision, recipe


@pytest.fixture
def bare_qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int, socket.socket]]:
    """QEMU with no machine: user network → hub → UDP socket netdev whose frames land on the test's socket."""
    qemu = find_tool("qemu-system-x86_64")
    wire = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wire.bind(("127.0.0.1", 0))
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    fwd = probe.getsockname()[1]
    probe.close()
    path = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [
            qemu, "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{path},server=on,wait=off",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{fwd}-10.0.2.15:22",
            "-netdev", f"socket,id=wire,udp=127.0.0.1:{wire.getsockname()[1]},localaddr=127.0.0.1:0",
            "-netdev", "hubport,id=hp0,hubid=0,netdev=net0",
            "-netdev", "hubport,id=hp1,hubid=0,netdev=wire",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield proc, path, fwd, wire
    finally:
        proc.kill()
        proc.wait()
        wire.close()


def frames_after_connect(fwd: int, wire: socket.socket) -> int:
    """Frames slirp sends towards the guest when something connects to the forwarded port."""
    wire.settimeout(0.05)
    while True:  # drain what earlier probes left
        try:
            wire.recv(2048)
        except TimeoutError:
            break
    with socket.create_connection(("127.0.0.1", fwd)):
        wire.settimeout(1.0)
        n = 0
        try:
            while True:
                frame = wire.recv(2048)
                assert frame[12:14] in (b"\x08\x06", b"\x08\x00")  # ARP or IPv4
                n += 1
                wire.settimeout(0.2)
        except TimeoutError:
            return n


def test_qmp_set_link_cuts_the_wire(bare_qemu: tuple[subprocess.Popen[bytes], Path, int, socket.socket]) -> None:
    proc, path, fwd, wire = bare_qemu
    with Qmp.connect(path, alive=lambda: proc.poll() is None) as qmp:
        assert qmp.greeting["version"]["qemu"]["major"] >= 7
        assert qmp.status() == "running"
        assert "net0: index=0,type=user" in qmp.hmp("info network")
        assert frames_after_connect(fwd, wire) > 0
        qmp.set_link("net0", False)
        assert frames_after_connect(fwd, wire) == 0
        qmp.set_link("net0", True)
        assert frames_after_connect(fwd, wire) > 0
        with pytest.raises(QmpError) as err:
            qmp.set_link("nic9", False)
        assert err.value.error_class == "DeviceNotFound" and "nic9" in err.value.message
        qmp.execute("quit")
        assert proc.wait(10) == 0


def test_qmp_connect_gives_up(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="QEMU exited before it listened"):
        Qmp.connect(tmp_path / "none.sock", wait=30, alive=lambda: False)
    with pytest.raises(QmpError, match=r"after 0\.2 s"):
        Qmp.connect(tmp_path / "none.sock", wait=0.2)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A disk of the image builder's test recipe (ESP with pitstop's GRUB, slot a without a kernel, data):
    enough for GRUB to say which slot it boots. Returns (disk, recipe)."""
    need_tools()
    d = tmp_path_factory.mktemp("hil-image")
    path = write_recipe(d / "recipe")
    disk.build_disk(recipe.load(path), make_rootfs(d / "rootfs.ext4"), d / "disk.img", d / "work", epoch=SDE)
    return d / "disk.img", path


def test_qemu_command_line(tmp_path: Path) -> None:
    t = QemuTarget("dut", tmp_path / "dut", config=QemuConfig(kvm=False, memory_mib=768, cpus=2), limit=None)
    try:
        text = shlex.join(t.argv())
        assert "-accel tcg -cpu max -m 768 -smp 2" in text  # NumPy's wheels need x86-64-v2 under TCG
        assert f"-qmp unix:{t.qmp_path},server=on,wait=off -S" in text
        assert "e1000,netdev=net0,id=nic0,romfile=" in text and "-serial mon:stdio" in text
        assert f"file={t.disk},format=raw,if=virtio" in text and f"file={t.nvram}" in text
        assert len(str(t.qmp_path)) < 100  # a unix socket path must fit in 108 bytes
        with pytest.raises(HilError, match="nothing flashed"):
            t.power_on()
        assert not t.powered
    finally:
        t.close()
    assert not t.qmp_path.parent.exists()


@pytest.mark.vm
def test_flash_provision_and_a_power_cycle(small_image: tuple[Path, Path], tmp_path: Path) -> None:
    """Flash (a grown, provisioned copy), power on to GRUB, pull the cable, cut the power, power on again on the
    same disk: QEMU killed and reaped each time, everything on the device's timeline and in its serial log."""
    image, recipe_path = small_image
    cert, key = rig_factory_ca(tmp_path / "ca")
    assert rig_factory_ca(tmp_path / "ca") == (cert, key)  # made once
    prov = Provision("HIL-7", "http://10.0.2.2:8080", "tok", cert, key, recipe=recipe_path)
    clock = Clock()
    t = QemuTarget("dut", tmp_path / "dut", config=QemuConfig(kvm=False, grow=16 << 20), clock=clock, limit=300)
    try:
        t.flash(image, provision=prov)
        assert t.disk.stat().st_size == image.stat().st_size + (16 << 20)
        assert provision.read_identity(t.disk) == b"HIL-7\n"
        assert provision.read_identity(t.disk, "hostname") == b"dev-hil-7\n"
        assert provision.read_identity(image) is None  # the image itself is left as built
        assert t.nvram.is_file()

        t.power_on()
        first = t.console.wait_for(r"pitstop-grub: booting slot a", 60)
        pid = t._proc.pid if t._proc else 0
        t.network(False)
        assert t.qmp.status() == "running"
        t.power_cut()
        assert not t.running and not t.powered
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        with pytest.raises(ConsoleClosed):
            t.console.wait_for("never", 5)

        start = t.console.mark()
        t.power_on()  # a power cycle: the same disk, the link still down
        t.console.wait_for(r"pitstop-grub: booting slot a", 60, start=start)
        t.network(True)
    finally:
        t.close()
    assert first.index < start
    kinds = [e.kind for e in t.timeline.events]
    assert kinds[0] == "flash" and "provisioned as HIL-7" in t.timeline.events[0].text
    sequence = [k for k in kinds if k in ("power-on", "grub", "network-down", "power-cut", "network-up")]
    assert sequence == ["power-on", "grub", "network-down", "power-cut", "power-on", "grub", "network-up", "power-cut"]
    log = t.console.log_path
    assert log is not None
    text = log.read_text()
    assert "### rig power-cut: power cut" in text and "pitstop-grub: booting slot a" in text
    assert "-qmp unix:" in t.artifacts()["QEMU command line"].read_text()
    t.discard()
    assert not t.disk.exists()


@pytest.mark.vm
def test_the_hard_time_limit_kills_qemu(small_image: tuple[Path, Path], tmp_path: Path) -> None:
    t = QemuTarget("dut", tmp_path / "dut", config=QemuConfig(kvm=False, grow=0), limit=3)
    try:
        t.flash(small_image[0])
        t.power_on()
        with pytest.raises((ConsoleClosed, HilError), match=r"time limit|ended|detached"):
            t.console.wait_for("never", 60)
        deadline = time.monotonic() + 10  # the console's deadline and the limit's timer fire at the same moment
        while t.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not t.running
        assert [e.kind for e in t.timeline.events][-1] == "limit"
        with pytest.raises(HilError, match="past its time limit"):
            t.power_on()
    finally:
        t.close()


def test_qemu_missing_names_what_to_install() -> None:
    reason = qemu_missing("x86_64")
    assert reason is None or "needs" in reason
    assert qemu_missing("sparc") == "no QEMU firmware known for sparc"
