"""Run a UEFI VM under QEMU (TCG, always): serial console captured line by line with timestamps, a hard
timeout, regex waits, and the log kept on disk for diagnosis.

Not through ``pitstop.runner.run``: the VM is a long-running process read while it runs; it gets the same
treatment (own process group, stdin from /dev/null, killed and reaped on any exit path).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TextIO

from pitstop.image import qemu as image_qemu
from pitstop.image.qemu import BootOptions

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

_ANSI = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|[()][A-Z0-9]|[=>])")


@dataclass(frozen=True)
class Line:
    t: float  # seconds since QEMU started
    text: str


class VmError(AssertionError):
    """The VM did not do what the test waited for; the message carries the serial log's tail."""


def qemu_argv(disk: Path, vars_copy: Path, *, memory_mib: int = 512) -> list[str]:
    """q35 + OVMF (read-only code, a private copy of the variables), the disk on virtio, no network."""
    return [QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", "1", "-nographic",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
            "-drive", f"file={disk},format=raw,if=virtio",
            "-serial", "mon:stdio", "-nic", "none"]


def _clean(raw: bytes) -> str:
    return _ANSI.sub(b"", raw).replace(b"\r", b"").decode("utf-8", "replace")


class Vm:
    """``with Vm(disk, workdir, limit=120) as vm: vm.wait_for(r"PITSTOP-SLOT=a", 60); vm.wait_exit(60)``.

    `limit` is the hard cap on the VM's whole life: no wait runs past it, whatever its own timeout.
    """

    def __init__(self, disk: Path, workdir: Path, *, name: str = "vm", limit: float = 300.0,
                 opts: BootOptions | None = None, console_input: bool = False) -> None:
        """`opts`: boot as `pitstop image boot` does (image/qemu.py: network, more memory); default: the minimal
        machine of `qemu_argv`. `console_input`: keep QEMU's stdin open for `send` (typing on the serial
        console)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.vars = workdir / f"{name}-OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, self.vars)  # fresh firmware variables per run (notes, pitfall 10)
        self.argv = qemu_argv(disk, self.vars) if opts is None else image_qemu.argv(disk, self.vars, opts)
        self.console_input = console_input
        self.log_path = workdir / f"{name}-serial.log"
        self.limit = limit
        self.lines: list[Line] = []
        self._partial = b""
        self._cond = threading.Condition()
        self._eof = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._t0 = 0.0
        self._log: TextIO | None = None

    def __enter__(self) -> Vm:
        self._t0 = time.monotonic()
        self._log = self.log_path.open("w", encoding="utf-8")
        self._log.write(f"# {shlex.join(self.argv)}\n")
        try:
            stdin = subprocess.PIPE if self.console_input else subprocess.DEVNULL
            self._proc = subprocess.Popen(self.argv, stdin=stdin, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._read, name="vm-serial", daemon=True)
        self._reader.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()
        if self._log is not None:
            self._log.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._feed(chunk)
        with self._cond:
            if self._partial:
                self._add(self._partial)
                self._partial = b""
            self._eof = True
            self._cond.notify_all()

    def _feed(self, chunk: bytes) -> None:
        with self._cond:
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            for raw in complete:
                self._add(raw)
            self._cond.notify_all()

    def _add(self, raw: bytes) -> None:
        line = Line(round(self.elapsed, 2), _clean(raw))
        self.lines.append(line)
        if self._log is not None:
            self._log.write(f"[{line.t:7.2f}] {line.text}\n")
            self._log.flush()

    def tail(self, n: int = 40) -> str:
        with self._cond:
            text = [f"[{ln.t:7.2f}] {ln.text}" for ln in self.lines[-n:]]
            if self._partial:
                text.append(f"[partial] {_clean(self._partial)}")
        return "\n".join(text)

    def _timeout(self, timeout: float) -> float:
        return max(0.0, min(timeout, self.limit - self.elapsed))

    def fail(self, what: str) -> VmError:
        return VmError(f"{what} ({self.elapsed:.1f} s after start; log {self.log_path}); serial tail:\n{self.tail()}")

    def wait_for(self, pattern: str, timeout: float, *, start: int = 0) -> tuple[int, Line]:
        """The first line at index >= `start` matching `pattern`, with its index; VmError after `timeout` s
        or when QEMU exits first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + self._timeout(timeout)
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i].text):
                        return i, self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if self._eof:
                    raise self.fail(f"QEMU exited before printing /{pattern}/")
                if left <= 0:
                    raise self.fail(f"no /{pattern}/ within {timeout:.0f} s (VM limit {self.limit:.0f} s)")
                self._cond.wait(left)

    def wait_exit(self, timeout: float) -> int:
        """QEMU's exit status once it exits by itself (guest power-off); VmError (and kill) after `timeout` s."""
        assert self._proc is not None
        try:
            rc = self._proc.wait(self._timeout(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail(f"QEMU still running after {timeout:.0f} s (VM limit {self.limit:.0f} s)") from None
        if self._reader is not None:
            self._reader.join(10)
        return rc

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(10)

    def send(self, text: str) -> None:
        """Type `text` on the serial console (needs `console_input`)."""
        assert self._proc is not None and self._proc.stdin is not None, "Vm(console_input=True) to type"
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def mark(self) -> int:
        """The index the next line will have: `wait_for(..., start=vm.mark())` sees only what comes after."""
        with self._cond:
            return len(self.lines)

    def matching(self, pattern: str) -> list[Line]:
        rx = re.compile(pattern)
        with self._cond:
            return [ln for ln in self.lines if rx.search(ln.text)]
