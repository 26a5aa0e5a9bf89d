"""The QEMU virtual device: an image from the image builder booted as `pitstop image boot` boots it (image/qemu.py:
UEFI, the disk on virtio, user-mode networking, KVM only where the CPU really has it, TCG with `-cpu max`
otherwise), with the controls of a bench:

- flash: a private copy of the image (sparse), grown by `grow` bytes as a larger disk would be, provisioned; a
  fresh copy of the firmware variables;
- power on: QEMU started paused (`-S`), its QMP socket connected, the link state applied, then `cont`;
- power cut: SIGKILL to QEMU's process group. Nothing of the guest's is flushed; what QEMU had written to the disk
  file is there, as on a disk whose write cache survived;
- power off: the ACPI power button (QMP `system_powerdown`); a cut if the guest has not stopped in time;
- network: QMP `set_link` on the NIC (`nic0`): frames dropped both ways, the guest's driver sees the carrier go;
- shell: the autologin root shell on the serial console (overlay.py, shell.py).

The guest reaches the rig host at 10.0.2.2. A power cycle keeps the disk and the firmware variables, as a real
device keeps its disk and NVRAM. QEMU runs in its own process group with stdin and stdout on pipes (the serial
console); it is killed and reaped on every path out (close, the hard time limit, interpreter exit).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from pitstop.hil.console import PipeSource
from pitstop.hil.errors import HilError, QmpError
from pitstop.hil.qmp import Qmp
from pitstop.hil.shell import SerialShell, ShellResult
from pitstop.hil.target import CONSOLE_IN, FLASH, NETWORK, POWER, SHELL, Provision, Target, copy_image
from pitstop.hil.timeline import Clock
from pitstop.image import qemu as image_qemu
from pitstop.runner import clean_env

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    """The last line of defence: no QEMU outlives the rig, whatever skipped its teardown."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


@dataclass(frozen=True)
class QemuConfig:
    arch: str = "x86_64"
    memory_mib: int = 1024
    cpus: int = 1
    kvm: bool | None = None  # None: where usable (image/qemu.py kvm_usable)
    grow: int = 1 << 30  # bytes added to the disk copy: the data partition grows into them on first boot
    ssh_port: int | None = None  # a host port on 127.0.0.1 forwarded to the guest's 22
    extra_args: tuple[str, ...] = ()


def qemu_missing(arch: str = "x86_64") -> str | None:
    """Why a QEMU target cannot run here, or None."""
    fw = image_qemu.FIRMWARE.get(arch)
    if fw is None:
        return f"no QEMU firmware known for {arch}"
    missing = []
    if shutil.which(fw.qemu) is None:
        missing.append(f"{fw.qemu} (apt package qemu-system-x86 / qemu-system-arm)")
    for p in (fw.code, fw.vars):
        if not p.is_file():
            missing.append(f"{p} (apt package ovmf / qemu-efi-aarch64)")
    return "needs " + ", ".join(missing) if missing else None


class QemuTarget(Target):
    kind = "qemu"

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        config: QemuConfig = QemuConfig(),
        clock: Clock | None = None,
        limit: float | None = 3600.0,
    ) -> None:
        super().__init__(name, workdir, clock=clock, limit=limit)
        self.config = config
        self.disk = workdir / "disk.img"
        self.nvram = workdir / "efivars.fd"
        self.argv_file = workdir / "qemu-argv.txt"
        # unix socket paths are limited to 108 bytes; the run directory can be deep.
        self._sockdir = Path(tempfile.mkdtemp(prefix="pitstop-hil-"))
        self.qmp_path = self._sockdir / "qmp.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._lock = threading.RLock()
        self._expected_exit = False
        self._limit_hit = False
        self._timer: threading.Timer | None = None
        if limit:
            self._timer = threading.Timer(limit, self._on_limit)
            self._timer.daemon = True
            self._timer.start()
        self.serial_shell = SerialShell(self.console)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({FLASH, POWER, NETWORK, SHELL, CONSOLE_IN})

    @property
    def host_address(self) -> str:
        return "10.0.2.2"  # QEMU's user-mode network: the host as the guest sees it

    @property
    def running(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.poll() is None

    @property
    def qmp(self) -> Qmp:
        """The monitor of the running QEMU, for what the target does not wrap (`qmp.hmp("info block")`)."""
        with self._lock:
            if self._qmp is None:
                raise HilError(f"{self.name}: QEMU is not running")
            return self._qmp

    def argv(self) -> list[str]:
        c = self.config
        opts = image_qemu.BootOptions(
            arch=c.arch, memory_mib=c.memory_mib, cpus=c.cpus, kvm=c.kvm, network=True, ssh_port=c.ssh_port
        )
        # Paused until the link state is applied: a pulled cable must be pulled from the first instruction on.
        return [
            *image_qemu.argv(self.disk, self.nvram, opts),
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-S",
            *c.extra_args,
        ]  # fmt: skip

    # --- Target ------------------------------------------------------------------------------------------------

    def _flash(self, image: Path, provision: Provision | None) -> str:
        copy_image(image, self.disk, grow=self.config.grow)
        if provision is not None:
            provision.apply(self.disk)
        image_qemu.vars_copy(self.config.arch, self.nvram)
        grown = f", grown by {self.config.grow >> 20} MiB" if self.config.grow else ""
        who = f", provisioned as {provision.device_id}" if provision else ""
        return f"{image.name} copied to {self.disk.name}{grown}{who}"

    def _power_on(self) -> None:
        if self._limit_hit:
            raise HilError(f"{self.name}: past its time limit of {self.limit:.0f} s")
        if not self.disk.is_file() or not self.nvram.is_file():
            raise HilError(f"{self.name}: nothing flashed (target.flash(image) first)")
        image_qemu.firmware(self.config.arch)  # a readable error if OVMF is missing
        argv = self.argv()
        self.argv_file.write_text(shlex.join(argv) + "\n")
        self.qmp_path.unlink(missing_ok=True)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=clean_env(),
                start_new_session=True,
            )
        except FileNotFoundError:
            raise HilError(f"{argv[0]} not found (apt package qemu-system-x86)") from None
        with _live_lock:
            _live.add(proc)
        with self._lock:
            self._expected_exit = False
            self._proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self.console.attach(PipeSource(proc.stdout, proc.stdin, f"QEMU (pid {proc.pid}) serial console"))
        threading.Thread(target=self._reap, args=(proc,), name=f"qemu-reaper-{self.name}", daemon=True).start()
        try:
            qmp = Qmp.connect(self.qmp_path, wait=15.0, alive=lambda: proc.poll() is None)
            with self._lock:
                self._qmp = qmp
            if not self.link_up:
                qmp.set_link(image_qemu.NIC_ID, False)
            qmp.execute("cont")
        except QmpError as e:
            self._kill()
            raise HilError(self.console.describe(f"QEMU did not start: {e}")) from None

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        rc = proc.wait()
        with _live_lock:
            _live.discard(proc)
        with self._lock:
            if self._proc is not proc or self._expected_exit:
                return
            self._proc = None
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            self.powered = False
        self.timeline.rig("qemu-exit", f"QEMU exited by itself (status {rc}): the guest powered off", status=rc)

    def _kill(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            self._expected_exit = True
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            with _live_lock:
                _live.discard(proc)
        # The stream has ended with the process: stop reading, close the pipes.
        self.console.detach()

    def _power_cut(self) -> None:
        self._kill()

    def _power_off(self, timeout: float) -> bool:
        with self._lock:
            proc, qmp = self._proc, self._qmp
            self._expected_exit = True
        if proc is None or proc.poll() is not None:
            self._kill()
            return True
        try:
            if qmp is not None:
                qmp.execute("system_powerdown")
            proc.wait(timeout)
            clean = True
        except (QmpError, subprocess.TimeoutExpired):
            clean = False
        self._kill()
        return clean

    def _network(self, up: bool) -> None:
        with self._lock:
            qmp = self._qmp if self.running else None
        if qmp is not None:
            qmp.set_link(image_qemu.NIC_ID, up)

    def _shell(self, cmd: str, timeout: float) -> ShellResult:
        return self.serial_shell.run(cmd, timeout)

    def _on_limit(self) -> None:
        self._limit_hit = True
        if self.running:
            self.timeline.rig("limit", f"hard time limit of {self.limit:.0f} s reached: QEMU killed")
            self._kill()
            self.powered = False

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._kill()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def artifacts(self) -> dict[str, Path]:
        out = super().artifacts()
        if self.argv_file.is_file():
            out["QEMU command line"] = self.argv_file
        return out

    def discard(self) -> None:
        """Delete the disk copy (GiBs) once the run no longer needs it."""
        self.disk.unlink(missing_ok=True)
        self.nvram.unlink(missing_ok=True)
