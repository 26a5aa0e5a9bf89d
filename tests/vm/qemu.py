"""Run a UEFI VM under QEMU (TCG, always): serial console captured line by line with timestamps, a hard
timeout, regex waits, and the log kept on disk for diagnosis.

Not through ``pitstop.runner.run``: the VM is a long-running process read while it runs; it gets the same
treatment (own process group, stdin from /dev/null, killed and reaped on any exit path).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from pitstop.hil.console import Console, Line, PipeSource
from pitstop.hil.errors import ConsoleClosed, ConsoleTimeout
from pitstop.hil.timeline import Clock
from pitstop.image import qemu as image_qemu
from pitstop.image.qemu import BootOptions

__all__ = ["OVMF_CODE", "OVMF_VARS", "QEMU", "Line", "Vm", "VmError", "qemu_argv"]

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


class VmError(AssertionError):
    """The VM did not do what the test waited for; the message carries the serial log's tail."""


def qemu_argv(disk: Path, vars_copy: Path, *, memory_mib: int = 512) -> list[str]:
    """q35 + OVMF (read-only code, a private copy of the variables), the disk on virtio, no network."""
    return [
        QEMU,
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-nographic",
        "-drive",
        f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,file={vars_copy}",
        "-drive",
        f"file={disk},format=raw,if=virtio",
        "-serial",
        "mon:stdio",
        "-nic",
        "none",
    ]


class Vm:
    """``with Vm(disk, workdir, limit=120) as vm: vm.wait_for(r"PITSTOP-SLOT=a", 60); vm.wait_exit(60)``.

    `limit` is the hard cap on the VM's whole life: no wait runs past it, whatever its own timeout. The serial
    console is the HIL rig's (pitstop.hil.console): lines timestamped from QEMU's start, the log on disk.
    """

    def __init__(
        self,
        disk: Path,
        workdir: Path,
        *,
        name: str = "vm",
        limit: float = 300.0,
        opts: BootOptions | None = None,
        console_input: bool = False,
    ) -> None:
        """`opts`: boot as `pitstop image boot` does (image/qemu.py: network, more memory); default: the minimal
        machine of `qemu_argv`. `console_input`: keep QEMU's stdin open for `send` (typing on the serial
        console)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.vars = workdir / f"{name}-OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, self.vars)  # fresh firmware variables per run (notes, pitfall 10)
        self.argv = qemu_argv(disk, self.vars) if opts is None else image_qemu.argv(disk, self.vars, opts)
        self.name = name
        self.console_input = console_input
        self.log_path = workdir / f"{name}-serial.log"
        self.limit = limit
        self.console = Console(None, name=name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0

    def __enter__(self) -> Vm:
        self._t0 = time.monotonic()
        self.log_path.write_text(f"# {shlex.join(self.argv)}\n")
        self.console = Console(self.log_path, name=self.name, clock=Clock(), deadline=self._t0 + self.limit)
        try:
            stdin = subprocess.PIPE if self.console_input else subprocess.DEVNULL
            self._proc = subprocess.Popen(
                self.argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
        except BaseException:
            self.console.close()
            raise
        assert self._proc.stdout is not None
        self.console.attach(PipeSource(self._proc.stdout, self._proc.stdin, f"QEMU {self.name} serial console"))
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()
        self.console.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    @property
    def lines(self) -> list[Line]:
        return self.console.lines

    def tail(self, n: int = 40) -> str:
        return self.console.tail(n)

    def _timeout(self, timeout: float) -> float:
        return max(0.0, min(timeout, self.limit - self.elapsed))

    def fail(self, what: str) -> VmError:
        return VmError(f"{what} ({self.elapsed:.1f} s after start; log {self.log_path}); serial tail:\n{self.tail()}")

    def wait_for(self, pattern: str, timeout: float, *, start: int = 0) -> tuple[int, Line]:
        """The first line at index >= `start` matching `pattern`, with its index; VmError after `timeout` s
        or when QEMU exits first."""
        try:
            hit = self.console.wait_for(pattern, timeout, start=start)
        except ConsoleClosed:
            raise self.fail(f"QEMU exited before printing /{pattern}/") from None
        except ConsoleTimeout:
            raise self.fail(f"no /{pattern}/ within {timeout:.0f} s (VM limit {self.limit:.0f} s)") from None
        return hit.index, hit.line

    def wait_exit(self, timeout: float) -> int:
        """QEMU's exit status once it exits by itself (guest power-off); VmError (and kill) after `timeout` s."""
        assert self._proc is not None
        try:
            rc = self._proc.wait(self._timeout(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail(f"QEMU still running after {timeout:.0f} s (VM limit {self.limit:.0f} s)") from None
        self.console.detach()  # the stream has ended: every line is in
        return rc

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self.console.detach()

    def send(self, text: str) -> None:
        """Type `text` on the serial console (needs `console_input`)."""
        assert self.console_input, "Vm(console_input=True) to type"
        self.console.send(text)

    def mark(self) -> int:
        """The index the next line will have: `wait_for(..., start=vm.mark())` sees only what comes after."""
        return self.console.mark()

    def matching(self, pattern: str) -> list[Line]:
        return self.console.matching(pattern)
