"""The device under test, as a scenario sees it, whatever it is (a QEMU virtual device, a real board on the bench):

    target.flash(image, provision=rig.provision("dut-1", server_url=url, token="t"))
    target.power_on()
    hit = target.console.wait_for(r"PITSTOP-READY slot=(\\w)", 300)
    rc, out = target.shell("pitstop status --json")
    target.network(False); target.power_cut(); target.power_on()
    target.timeline.event("install-started", "pitstop install over HTTP")

Every action the rig takes is recorded on the device's timeline (and noted in its serial log, so the log shows
where the power was cut); the console's markers join it as they come. Subclasses implement the `_` methods.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from pitstop.hil.console import Console, Hit
from pitstop.hil.errors import HilError, ShellError, ShellTimeout
from pitstop.hil.shell import ShellResult
from pitstop.hil.timeline import CONSOLE, Clock, Event, Timeline
from pitstop.runner import run

# What a target can do; a scenario that needs something its target lacks is skipped (plugin.py).
FLASH = "flash"
POWER = "power"  # power_on and power_cut
NETWORK = "network"
SHELL = "shell"
CONSOLE_IN = "console"  # a serial console to read (and type on)


@dataclass(frozen=True)
class Provision:
    """A device's factory identity, written into the data partition of its disk before first boot by the image
    builder's provisioning code (`pitstop image provision`, docs/image.md)."""

    device_id: str
    server_url: str
    token: str
    ca_cert: Path
    ca_key: Path
    recipe: Path | None = None  # checks the disk is this product's; sets the host name
    days: int = 7300
    replace: bool = False
    metrics_url: str | None = None  # health reports (OTLP/HTTP), sent with the token

    def apply(self, disk: Path) -> None:
        """Raises ProvisionError (pitstop.image.errors) as `pitstop image provision` would."""
        from pitstop.image import provision  # noqa: PLC0415 (the builder's imports are heavy)

        provision.provision_device(
            disk,
            self.device_id,
            provision.load_factory_ca(self.ca_cert, self.ca_key),
            server_url=self.server_url,
            token=self.token,
            recipe_path=self.recipe,
            days=self.days,
            metrics_url=self.metrics_url,
            replace=self.replace,
        )


def rig_factory_ca(directory: Path) -> tuple[Path, Path]:
    """The rig's own factory CA (certificate, key), made once in `directory`: devices flashed by the rig get
    certificates from it, and a test update server can trust it for mutual TLS."""
    from pitstop.ota import devkeys  # noqa: PLC0415

    cert, key = directory / "factory-ca.pem", directory / "factory-ca.key"
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    k = devkeys.new_key("ecdsa-p256")
    now = datetime.now(UTC)
    c = devkeys.issue(
        k, "pitstop HIL rig factory CA", ca=True, path_length=0, not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=3650),
    )  # fmt: skip
    tmp = key.with_suffix(".tmp")
    tmp.write_bytes(devkeys.key_pem(k))
    tmp.chmod(0o600)
    os.replace(tmp, key)
    cert.write_bytes(devkeys.cert_pem(c))
    return cert, key


def copy_image(image: Path, dest: Path, *, grow: int = 0) -> Path:
    """A private copy of a disk image (sparse; a reflink where the filesystem has them), grown by `grow` bytes as
    a disk larger than the image would be: the data partition grows into the rest on first boot."""
    if not image.is_file():
        raise HilError(f"image {image} is not a file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    run(["cp", "--sparse=always", "--reflink=auto", image, dest])
    if grow:
        os.truncate(dest, dest.stat().st_size + grow)
    return dest


class Target(abc.ABC):
    """One device under test. `limit`: the device's hard time limit in seconds from its creation; no console
    wait runs past it (a QEMU target is also killed then)."""

    kind: ClassVar[str] = "target"

    def __init__(self, name: str, workdir: Path, *, clock: Clock | None = None, limit: float | None = None) -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.clock = clock or Clock()
        self.limit = limit
        self.deadline = time.monotonic() + limit if limit else None
        self.timeline = Timeline(name, self.clock)
        self.console = Console(workdir / "serial.log", name=name, clock=self.clock, deadline=self.deadline)
        self.timeline.watch(self.console)
        self.timeline.subscribe(self._note)
        self.powered = False
        self.link_up = True
        self.flashed: Path | None = None  # the image last flashed
        self._closed = False

    def _note(self, ev: Event) -> None:
        if ev.source != CONSOLE:
            self.console.note(f"{ev.source} {ev.kind}: {ev.text}")

    # --- what each kind provides -------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def capabilities(self) -> frozenset[str]: ...

    @property
    @abc.abstractmethod
    def host_address(self) -> str:
        """The rig host's address as the device reaches it (services a scenario starts listen there)."""

    @abc.abstractmethod
    def _flash(self, image: Path, provision: Provision | None) -> str:
        """Write the image (provisioned) to the device's disk; returns a line for the timeline."""

    @abc.abstractmethod
    def _power_on(self) -> None: ...

    @abc.abstractmethod
    def _power_cut(self) -> None: ...

    def _power_off(self, timeout: float) -> bool:
        """A clean shutdown; False if it had to be cut. Default: no clean way, cut."""
        self._power_cut()
        return False

    @abc.abstractmethod
    def _network(self, up: bool) -> None: ...

    @abc.abstractmethod
    def _shell(self, cmd: str, timeout: float) -> ShellResult: ...

    def _close(self) -> None:  # noqa: B027 (optional: most targets hold nothing beyond the console)
        """Let go of everything (processes, sockets) after the power is off."""

    # --- what scenarios call -----------------------------------------------------------------------------------

    def require(self, *capabilities: str) -> None:
        missing = sorted(set(capabilities) - self.capabilities)
        if missing:
            raise HilError(f"{self.kind} target {self.name} cannot do: {', '.join(missing)}")

    def flash(self, image: Path, *, provision: Provision | None = None) -> None:
        """Put `image` on the device's disk (powered off first), with the factory identity if given."""
        self.require(FLASH)
        if self.powered:
            self.power_cut()
        t0 = time.monotonic()
        what = self._flash(image, provision)
        self.flashed = image
        ident = {"device_id": provision.device_id} if provision else {}
        self.timeline.rig("flash", f"{what} ({time.monotonic() - t0:.1f} s)", image=str(image), **ident)

    def power_on(self) -> None:
        self.require(POWER)
        if self.powered:
            raise HilError(f"{self.name} is already powered on")
        self.timeline.rig("power-on", "power on")
        # Before, not after: a device that stops by itself right away (the guest powers off) is then seen off.
        self.powered = True
        try:
            self._power_on()
        except BaseException:
            self.powered = False
            raise

    def power_cut(self) -> None:
        """Hard and instant: the supply goes away (QEMU killed, the PDU outlet switched off)."""
        self.require(POWER)
        self._power_cut()
        self.powered = False
        self.timeline.rig("power-cut", "power cut")

    def power_off(self, timeout: float = 120.0) -> bool:
        """Clean where the target can (ACPI power button, `systemctl poweroff`), then the supply off; a cut
        after `timeout` s. True when it was clean."""
        self.require(POWER)
        self.timeline.rig("power-off", "clean power off requested")
        clean = self._power_off(timeout)
        self.powered = False
        self.timeline.rig(
            "power-off-done" if clean else "power-cut", "powered off" if clean else "power cut (no clean stop)"
        )
        return clean

    def power_cycle(self, off_seconds: float = 0.0) -> None:
        self.power_cut()
        if off_seconds > 0:
            time.sleep(off_seconds)
        self.power_on()

    def network(self, up: bool) -> None:
        """Plug (True) or pull (False) the device's network cable. Stays as set across power cycles."""
        self.require(NETWORK)
        self._network(up)
        self.link_up = up
        self.timeline.rig("network-up" if up else "network-down", "network up" if up else "network down")

    def shell(self, cmd: str, timeout: float = 60.0, *, check: bool = False, record: bool = True) -> ShellResult:
        """Run `cmd` as root on the device: (exit status, output). `check`: ShellError unless it exits 0."""
        self.require(SHELL)
        t0 = time.monotonic()
        try:
            res = self._shell(cmd, timeout)
        except ShellError as e:
            if record:
                what = "timed out" if isinstance(e, ShellTimeout) else "failed"
                self.timeline.rig("shell", f"$ {cmd}: {what} ({time.monotonic() - t0:.1f} s)", rc=None)
            raise
        if record:
            self.timeline.rig("shell", f"$ {cmd}: exit {res.rc} ({time.monotonic() - t0:.1f} s)", rc=res.rc)
        if check and res.rc != 0:
            raise ShellError(f"{self.name}: `{cmd}` exited {res.rc}:\n{res.output[-4000:]}")
        return res

    def wait_ready(self, slot: str | None = None, timeout: float = 300.0, *, start: int = 0) -> Hit:
        """The daemon's `PITSTOP-READY slot=<s>` (any slot if None) at or after console line `start`."""
        which = re.escape(slot) if slot else r"\w+"
        pattern = rf"PITSTOP-READY slot=({which})\b"
        return self.console.wait_for(pattern, timeout, start=start)

    def wait_serving(self, loop: str | None = None, timeout: float = 300.0, *, start: int = 0) -> Hit:
        """The daemon's `PITSTOP-SERVING loop=<name>` (any loop if None) at or after console line `start`: a run
        of that loop delivered its first results."""
        which = re.escape(loop) if loop else r"[a-z0-9-]+"
        return self.console.wait_for(rf"PITSTOP-SERVING loop=({which})\b", timeout, start=start)

    def artifacts(self) -> dict[str, Path]:
        """Files worth keeping with the run's report, by label."""
        out: dict[str, Path] = {}
        if self.console.log_path is not None:
            out["serial log"] = self.console.log_path
        return out

    def discard(self) -> None:  # noqa: B027 (optional: only targets with a disk copy have something to delete)
        """Delete what the run no longer needs once the device is closed (a QEMU target's disk copy)."""

    def close(self) -> None:
        """Power off (cut) if on, stop reading the console, let go of everything. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.powered:
                with contextlib.suppress(HilError):
                    self._power_cut()
                self.powered = False
                self.timeline.rig("power-cut", "power cut (teardown)")
            self._close()
        finally:
            self.console.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 1.0) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` s have passed (False): for conditions no console line
    announces (a state on the update server, a file on the device)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
