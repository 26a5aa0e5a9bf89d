"""`pitstop daemon` as a process, the way systemd runs it: a real notify socket (READY, STATUS, WATCHDOG,
RELOADING, STOPPING), a private bus, signals; bad configuration and a taken bus name are one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload
from dbuskit import PrivateBus
from devicekit import TestDevice, make_device

from pitstop.daemon.dbus_api import BUS_NAME, INTERFACE, PATH


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.got: list[tuple[float, str]] = []

    def wait_for(self, assignment: str, timeout: float = 30) -> list[str]:
        """Messages up to and including the first that contains `assignment`."""
        end = time.monotonic() + timeout
        seen = []
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.got.append((time.monotonic(), data))
            seen.append(data)
            if assignment in data.split("\n"):
                return seen
        raise AssertionError(f"no {assignment} within {timeout} s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dev(tmp_path: Path, keys: Keys) -> TestDevice:
    return make_device(tmp_path / "dev", keys)


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


def start(bus: PrivateBus, dev: TestDevice, config: Path, notify: Path | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    if notify is not None:
        env.update(NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="2000000")
    return subprocess.Popen(
        [sys.executable, "-m", "pitstop.cli", "daemon", "--bus-address", bus.address,
         "--system-config", str(dev.config_path), "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_file(tmp_path: Path, text: str = "", port: int | None = None) -> Path:
    p = tmp_path / "pitstop.toml"
    listen = f"127.0.0.1:{port or free_port()}"
    p.write_text(
        f'state_dir = "{tmp_path / "state"}"\n{text}\n[health]\ninterval_s = 1\nprometheus_listen = "{listen}"\n'
    )
    return p


def test_daemon_notifies_serves_reloads_and_stops(bus: PrivateBus, dev: TestDevice, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    port = free_port()
    proc = start(bus, dev, config_file(tmp_path, port=port), notify.path)
    try:
        ready = notify.wait_for("READY=1")
        assert any("STATUS=serving: booted slot a" in m for m in ready), ready
        # Nothing on trial: the routine commit of slot a, then the ready line (stdout: the console, in an image).
        notify.wait_for("STATUS=serving: slot a committed")
        # Health: sampled each second, on the Prometheus endpoint and in the Health property.
        text = ""
        for _ in range(50):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                text = ""
            if "system_memory_usage" in text:
                break
            time.sleep(0.2)
        assert "system_memory_usage" in text and 'slot="a"' in text, text[:2000]
        p = bus.send(f"--dest={BUS_NAME}", PATH, "org.freedesktop.DBus.Properties.Get", f"string:{INTERFACE}",
                     "string:Health")  # fmt: skip
        assert p.returncode == 0 and "memory.utilization" in p.stdout, p.stdout + p.stderr
        p = bus.send(f"--dest={BUS_NAME}", PATH, "org.freedesktop.DBus.Properties.Get", f"string:{INTERFACE}",
                     "string:BootedSlot")  # fmt: skip
        assert p.returncode == 0 and '"a"' in p.stdout, p.stderr
        # The watchdog: pings at about half of WATCHDOG_USEC (2 s).
        start_t = time.monotonic()
        notify.wait_for("WATCHDOG=1", 5)
        notify.wait_for("WATCHDOG=1", 5)
        pings = [t for t, m in notify.got if "WATCHDOG=1" in m.split("\n") and t >= start_t]
        assert len(pings) >= 2 and 0.5 < pings[-1] - pings[-2] < 1.6, pings
        proc.send_signal(signal.SIGHUP)
        reload = notify.wait_for("READY=1")
        assert any("RELOADING=1" in m.split("\n") for m in reload), reload
        # An invalid configuration on reload is refused; the daemon keeps serving with the one it has.
        config_file(tmp_path, "bogus_key = 1\n")
        proc.send_signal(signal.SIGHUP)
        refused = notify.wait_for("READY=1")
        assert any("reload refused" in m for m in refused), refused
        p = bus.send(f"--dest={BUS_NAME}", PATH, "org.freedesktop.DBus.Peer.Ping")
        assert p.returncode == 0, p.stderr
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(20) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
        assert (proc.stdout.read() if proc.stdout else "").splitlines() == ["PITSTOP-READY slot=a"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_ready_line_waits_for_the_gate_of_a_slot_on_trial(
    bus: PrivateBus, dev: TestDevice, keys: Keys, tmp_path: Path
) -> None:
    """Booted into a freshly installed slot: `PITSTOP-READY slot=b` only once the health gate has committed it."""
    from pitstop.ota.installer import Installer

    bundle = make_bundle(tmp_path / "v2.pitb", [rootfs_payload(tmp_path / "v2.img", mixed_data(300_000, 2))], keys,
                         version="2.0.0", security_version=2)  # fmt: skip
    Installer(dev.config()).install(str(bundle))
    assert dev.reboot() == "b"
    notify = NotifySocket(tmp_path / "notify")
    proc = start(bus, dev, config_file(tmp_path, "[update]\ngate_hold_s = 1.5\ngate_deadline_s = 20"), notify.path)
    try:
        ready = notify.wait_for("READY=1")
        assert any("STATUS=serving: booted slot b, phase trial" in m for m in ready), ready
        t0 = time.monotonic()
        notify.wait_for("STATUS=serving: slot b committed")
        assert time.monotonic() - t0 >= 1.0, "committed before the gate held for gate_hold_s"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert (proc.stdout.read() if proc.stdout else "").splitlines() == ["PITSTOP-READY slot=b"]
        assert dev.env()["ORDER"].split()[0] == "b" and dev.env()["b_OK"] == "1"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_invalid_configuration_is_one_line_exit_50(bus: PrivateBus, dev: TestDevice, tmp_path: Path) -> None:
    proc = start(bus, dev, config_file(tmp_path, "bogus_key = 1\n"), None)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 50, err
    assert len(err.strip().splitlines()) == 1 and "bogus_key" in err and "Traceback" not in err, err


def test_second_daemon_finds_the_name_taken(bus: PrivateBus, dev: TestDevice, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    first = start(bus, dev, config_file(tmp_path), notify.path)
    try:
        notify.wait_for("READY=1")
        second = start(bus, dev, config_file(tmp_path), None)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 51 and "is taken" in err and "Traceback" not in err, err
    finally:
        first.terminate()
        first.wait(20)
        notify.close()


def _loops(bus: PrivateBus) -> str:
    p = bus.send(f"--dest={BUS_NAME}", PATH, "org.freedesktop.DBus.Properties.Get", f"string:{INTERFACE}",
                 "string:Loops")  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def test_daemon_runs_its_configured_loop_and_stops_it_over_dbus(
    bus: PrivateBus, dev: TestDevice, tmp_path: Path
) -> None:
    """A [[loop]] in the configuration runs in a child of the daemon (the real classifier, CPU); its figures
    reach the Loops property; StopLoop over D-Bus stops it; SIGTERM leaves no child behind."""
    from pitstop.inference.test_models import ORIENTATION, locate

    found = locate(ORIENTATION)
    models = tmp_path / "models"
    models.mkdir()
    (models / "orient.onnx").symlink_to(found.model)
    (models / "orient.toml").write_bytes(found.description.read_bytes())
    loop = f"""
[[loop]]
name = "orient"
model = "{models / "orient.onnx"}"
sink = "jsonl:{tmp_path / "orient.jsonl"}"
source_opts = {{ width = "160", height = "120", fps = "20" }}
runtime = "onnxruntime"
providers = ["cpu"]
threads = 1
"""
    notify = NotifySocket(tmp_path / "notify")
    proc = start(bus, dev, config_file(tmp_path, loop), notify.path)
    try:
        notify.wait_for("READY=1")
        text = ""
        for _ in range(150):
            text = _loops(bus)
            if '"running"' in text and "double 0\n" not in text.split('"running"')[1][:40]:
                break
            time.sleep(0.2)
        assert '"orient"' in text and '"running"' in text, text
        assert _children(proc.pid), "the loop runs in a child process"
        p = bus.send(f"--dest={BUS_NAME}", PATH, f"{INTERFACE}.StopLoop", "string:orient")
        assert p.returncode == 0, p.stderr
        assert '"stopped"' in _loops(bus)
        p = bus.send(f"--dest={BUS_NAME}", PATH, f"{INTERFACE}.StartLoop", "string:orient")
        assert p.returncode == 0, p.stderr
        for _ in range(100):
            if _children(proc.pid):
                break
            time.sleep(0.1)
        assert _children(proc.pid)
        # A reload without the loop stops and forgets it; one with it again starts it.
        notify.got.clear()
        config_file(tmp_path)
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        assert '"orient"' not in _loops(bus)
        assert not _children(proc.pid)
        config_file(tmp_path, loop)
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        assert '"orient"' in _loops(bus)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert (tmp_path / "orient.jsonl").stat().st_size > 0
        # stdout (the console, under systemd): the ready line, and the serving line once per run with results.
        lines = (proc.stdout.read() if proc.stdout else "").splitlines()
        assert "PITSTOP-READY slot=a" in lines and "PITSTOP-SERVING loop=orient" in lines, lines
        assert set(lines) == {"PITSTOP-READY slot=a", "PITSTOP-SERVING loop=orient"}, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
