"""A root shell on a serial console (the rig image's autologin, hil/overlay.py): type a command, read its output
and exit status back from the console.

Each command is typed as

    printf '@@%s@@\\n' hil-7-begin; sh -c '<command>' </dev/null 2>&1; printf '@@%s rc=%d@@\\n' hil-7 $?

The terminal echoes what is typed, but the echo holds `printf '@@%s@@…' hil-7-begin`, never `@@hil-7-begin@@`:
only the command's own output lies between the two markers. The command runs under `sh -c` (as over SSH, see
ssh_target.py) with stdin from /dev/null, so it cannot swallow what is typed next.

Kernel messages share the console (`console=ttyS0`): lines that look like printk (`[   12.345678] e1000: ...`)
are left out of the output unless asked for; they stay in the console's log.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import threading
import time
from typing import NamedTuple

from pitstop.hil.console import Console
from pitstop.hil.errors import ConsoleClosed, ConsoleTimeout, ShellError, ShellTimeout


class ShellResult(NamedTuple):
    rc: int
    output: str  # stdout and stderr as the device printed them


KERNEL_LINE = re.compile(r"^\s*\[\s*\d+\.\d+\]\s")
# A line that means the machine started again: the login shell the last `ready` found is gone.
NEW_BOOT = re.compile(r"pitstop-grub: booting slot|Linux version \d|BdsDxe: ")
_TYPED = "printf '@@%s"  # in the echo of every line the rig types
# agetty's line when it logs root in by itself (hil/overlay.py).
AUTOLOGIN = re.compile(r"login: \S+ \(automatic login\)")
# Wide enough that `systemctl`, `pitstop status` and friends do not cut their lines; no pager, no colours.
SETUP = "stty cols 250 rows 50 2>/dev/null; export SYSTEMD_PAGER= PAGER=cat SYSTEMD_COLORS=0 NO_COLOR=1"


class SerialShell:
    """`run(cmd, timeout) -> ShellResult` on `console`. Waits for the shell after each boot it sees on the
    console; one command at a time."""

    def __init__(self, console: Console, *, ready_timeout: float = 120.0, setup: str = SETUP) -> None:
        self.console = console
        self.ready_timeout = ready_timeout
        self.setup = setup
        self._n = 0
        self._ready_at: int | None = None
        self._lock = threading.Lock()

    def _next(self) -> int:
        self._n += 1
        return self._n

    def ready(self, timeout: float | None = None) -> None:
        """Wait until a shell answers (autologin has run), then set the terminal up. After a boot seen on the
        console, nothing is typed before agetty's autologin line: keys reach the firmware, GRUB and the kernel's
        line buffer otherwise."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        boot = self._last_boot()
        if boot is not None:
            try:
                self.console.wait_for(AUTOLOGIN, timeout, start=boot)
            except ConsoleTimeout:
                raise ShellError(
                    self.console.describe(f"no autologin on the serial console within {timeout:g} s of the boot")
                ) from None
            except ConsoleClosed as e:
                raise ShellError(f"no shell on the serial console: {e}") from None
        while True:
            n = self._next()
            start = self.console.mark()
            try:
                self.console.send(f"{self.setup}; printf '@@%s@@\\n' hil-alive-{n}\n")
                self.console.wait_for(
                    rf"@@hil-alive-{n}@@\s*$", min(3.0, max(0.1, deadline - time.monotonic())), start=start
                )
            except ConsoleClosed as e:
                raise ShellError(f"no shell on the serial console: {e}") from None
            except ConsoleTimeout:
                if time.monotonic() >= deadline:
                    raise ShellError(
                        self.console.describe(f"no shell answered on the serial console within {timeout:g} s")
                    ) from None
                continue
            self._ready_at = start
            return

    def _last_boot(self, start: int = 0) -> int | None:
        """The last line at or after `start` that shows a boot; the terminal's echo of what the rig typed (a
        command mentioning GRUB's line) does not count."""
        lines = self.console.lines
        for i in range(len(lines) - 1, start - 1, -1):
            text = lines[i].text
            if NEW_BOOT.search(text) and _TYPED not in text:
                return i
        return None

    def _needs_ready(self) -> bool:
        return self._ready_at is None or self._last_boot(self._ready_at) is not None

    def run(self, cmd: str, timeout: float = 60.0, *, kernel_lines: bool = False) -> ShellResult:
        """Run `cmd` (a shell command line) as root on the device; ShellTimeout if it does not finish in time (it
        is then interrupted with Ctrl-C), ShellError if the console goes away."""
        with self._lock:
            if self._needs_ready():
                self.ready()
            n = self._next()
            start = self.console.mark()
            typed = (
                f"printf '@@%s@@\\n' hil-{n}-begin; sh -c {shlex.quote(cmd)} </dev/null 2>&1; "
                f"printf '@@%s rc=%d@@\\n' hil-{n} $?\n"
            )
            try:
                self.console.send(typed)
                begin = self.console.wait_for(rf"@@hil-{n}-begin@@\s*$", timeout, start=start)
                done = self.console.wait_for(rf"@@hil-{n} rc=(\d+)@@\s*$", timeout, start=begin.index + 1)
            except ConsoleTimeout:
                self._ready_at = None
                with contextlib.suppress(ConsoleClosed):
                    self.console.send("\x03")
                raise ShellTimeout(
                    self.console.describe(f"`{cmd}` did not finish within {timeout:g} s on the serial console")
                ) from None
            except ConsoleClosed as e:
                self._ready_at = None
                raise ShellError(f"`{cmd}`: {e}") from None
            lines = self.console.lines[begin.index + 1 : done.index]
            texts = [ln.text for ln in lines if kernel_lines or not KERNEL_LINE.match(ln.text)]
            # The marker may share its line with output that did not end in a newline.
            tail = done.text[: done.match.start()]
            if tail:
                texts.append(tail)
            rc = done[1]
            assert rc is not None
            return ShellResult(int(rc), "".join(t + "\n" for t in texts))
