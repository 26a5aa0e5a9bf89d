"""A target on the rig host itself, for the rig's own self-tests (`pytest hil/ --target local`) and for trying
hooks before wiring a device: the "device" is a local command whose output is its console.

- power on: the power hook if any, then `boot_command` started (`sh -c`); its output is the console, typing goes
  to its input;
- power cut: SIGKILL to the command's process group, then the power hook's off; power off: SIGTERM (SIGKILL after
  3 s), then the hook's off;
- network: the configured commands, or nothing but the timeline when there are none;
- shell: `sh -c CMD` on the host; flash: the image copied (and provisioned) into the work directory.

The default boot command prints what a booting pitstop device prints on its console (GRUB's slot, the daemon's
READY line) and then echoes what is typed.
"""

from __future__ import annotations

from pathlib import Path

from pitstop.errors import CommandError
from pitstop.hil.console import ProcessSource
from pitstop.hil.errors import ShellError, ShellTimeout
from pitstop.hil.hooks import run_hook
from pitstop.hil.power import PowerControl
from pitstop.hil.shell import ShellResult
from pitstop.hil.target import CONSOLE_IN, FLASH, NETWORK, POWER, SHELL, Provision, Target, copy_image
from pitstop.hil.timeline import Clock
from pitstop.runner import run

BOOT = "echo 'pitstop-grub: booting slot a'; echo 'PITSTOP-READY slot=a'; exec cat"


class LocalTarget(Target):
    kind = "local"

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        boot_command: str = BOOT,
        power: PowerControl | None = None,
        net_down: str | None = None,
        net_up: str | None = None,
        clock: Clock | None = None,
        limit: float | None = None,
    ) -> None:
        super().__init__(name, workdir, clock=clock, limit=limit)
        self.boot_command = boot_command
        self.power = power
        self.net_down = net_down
        self.net_up = net_up
        self.disk = workdir / "disk.img"
        self._source: ProcessSource | None = None

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({FLASH, POWER, NETWORK, SHELL, CONSOLE_IN})

    @property
    def host_address(self) -> str:
        return "127.0.0.1"

    def _flash(self, image: Path, provision: Provision | None) -> str:
        copy_image(image, self.disk)
        if provision is not None:
            provision.apply(self.disk)
        return f"{image.name} copied to {self.disk}"

    def _power_on(self) -> None:
        if self.power is not None:
            self.power.on()
        self._source = ProcessSource(["sh", "-c", self.boot_command])
        self.console.attach(self._source)

    def _stop(self, hard: bool) -> None:
        if self._source is not None and hard:
            self._source.kill()
        self.console.detach()  # closing the source stops (and reaps) what is left of it
        self._source = None
        if self.power is not None:
            self.power.off()

    def _power_cut(self) -> None:
        self._stop(hard=True)

    def _power_off(self, timeout: float) -> bool:
        self._stop(hard=False)
        return True

    def _network(self, up: bool) -> None:
        cmd = self.net_up if up else self.net_down
        if cmd:
            run_hook("network up" if up else "network down", cmd)

    def _shell(self, cmd: str, timeout: float) -> ShellResult:
        try:
            # stderr joins stdout from the second line on, so that a syntax error in `cmd` lands there too.
            res = run(["sh", "-c", f"exec 2>&1\n{cmd}"], check=False, timeout=timeout)
        except CommandError as e:
            if "timed out" in e.message:
                raise ShellTimeout(f"{self.name}: `{cmd}` did not finish within {timeout:g} s") from None
            raise ShellError(f"{self.name}: {e.message}") from None
        return ShellResult(res.returncode, res.text)

    def _close(self) -> None:
        if self._source is not None:
            self._stop(hard=True)
