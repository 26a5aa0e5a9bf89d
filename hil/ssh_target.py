"""A real device on the bench: SSH for commands, a serial console, hooks for power, network and flashing.

- shell: `ssh` (batch mode, connect timeout, keep-alives, the rig's own known_hosts file, emptied at each flash
  since a re-flashed device makes new host keys) running `sh -c CMD </dev/null 2>&1`;
- console: a serial device, `tcp://HOST:PORT` or a command (console.py `open_source`);
- power on / cut: a `PowerControl` (power.py): commands, an HTTP PDU, a USB relay;
- power off: `systemctl poweroff` over SSH, then the kernel's `reboot: Power down` on the console (or SSH gone),
  then the supply off;
- network: the configured commands (a managed switch's port, `ip link set DEV down` on the rig's interface);
- flash: the image copied and provisioned on the rig, then `pitstop image flash` (its library function) to
  `flash_device` (e.g. the reader side of a USB SD-mux, switched by `flash_before`/`flash_after`), or
  `flash_command` with `{image}` filled in.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from pitstop.errors import CommandError
from pitstop.hil.console import open_source
from pitstop.hil.errors import ConsoleTimeout, HilError, ShellError, ShellTimeout
from pitstop.hil.hooks import run_hook
from pitstop.hil.power import PowerControl
from pitstop.hil.shell import ShellResult
from pitstop.hil.target import CONSOLE_IN, FLASH, NETWORK, POWER, SHELL, Provision, Target, copy_image
from pitstop.hil.timeline import Clock
from pitstop.runner import run


@dataclass(frozen=True)
class SshAddress:
    user: str | None
    host: str
    port: int = 22

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}:{self.port}"


def parse_ssh_url(url: str) -> SshAddress:
    """`ssh://[user@]host[:port]` (IPv6 hosts in brackets)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError:
        raise HilError(f"target {url!r}: bad port") from None
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") or parts.password:
        raise HilError(f"target {url!r}: ssh://[user@]host[:port]")
    return SshAddress(parts.username or None, parts.hostname, port)


@dataclass(frozen=True)
class SshConfig:
    address: SshAddress
    console: str | None = None  # a serial device, tcp://HOST:PORT or a command
    power: PowerControl | None = None
    net_down: str | None = None
    net_up: str | None = None
    identity: Path | None = None  # ssh -i
    flash_device: Path | None = None
    flash_command: str | None = None  # `{image}` is the provisioned image's path, shell-quoted
    flash_before: str | None = None  # e.g. switch the SD-mux to the rig
    flash_after: str | None = None  # e.g. switch it back to the device
    host_address: str | None = None  # the rig as the device reaches it; default: the rig's source address
    connect_timeout: int = 10
    ssh_options: tuple[str, ...] = ()
    device_wait: float = 30.0  # for flash_device to appear after flash_before


class SshTarget(Target):
    kind = "ssh"

    def __init__(
        self, name: str, workdir: Path, config: SshConfig, *, clock: Clock | None = None, limit: float | None = None
    ) -> None:
        super().__init__(name, workdir, clock=clock, limit=limit)
        self.config = config
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.touch()
        if config.console:
            self.console.attach(open_source(config.console))

    @property
    def capabilities(self) -> frozenset[str]:
        c = self.config
        caps = {SHELL}
        if c.flash_device is not None or c.flash_command:
            caps.add(FLASH)
        if c.power is not None:
            caps.add(POWER)
        if c.net_down and c.net_up:
            caps.add(NETWORK)
        if c.console:
            caps.add(CONSOLE_IN)
        return frozenset(caps)

    @property
    def host_address(self) -> str:
        if self.config.host_address:
            return self.config.host_address
        return source_address(self.config.address.host, self.config.address.port)

    def ssh_options(self) -> list[str]:
        c = self.config
        opts = [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={c.connect_timeout}",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=accept-new",
            # A power cut under a running command: ssh notices in 15 s instead of the TCP timeout.
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if c.identity is not None:
            opts += ["-o", "IdentitiesOnly=yes", "-i", str(c.identity)]
        return opts + list(c.ssh_options)

    def ssh_argv(self, cmd: str) -> list[str]:
        a = self.config.address
        remote = f"sh -c {shlex.quote(cmd)} </dev/null 2>&1"
        return ["ssh", *self.ssh_options(), "-p", str(a.port), a.destination, "--", remote]

    def _shell(self, cmd: str, timeout: float) -> ShellResult:
        try:
            res = run(self.ssh_argv(cmd), check=False, timeout=timeout)
        except CommandError as e:
            if "timed out" in e.message:
                raise ShellTimeout(f"{self.name}: `{cmd}` did not finish within {timeout:g} s over SSH") from None
            raise ShellError(f"{self.name}: {e.message}") from None
        err = res.stderr.decode("utf-8", "replace").strip()
        # The remote command's stderr is in its stdout (2>&1): what is left on stderr is ssh's own.
        if res.returncode == 255 and err:
            raise ShellError(f"{self.name}: ssh to {self.config.address}: {err.splitlines()[-1]}")
        return ShellResult(res.returncode, res.text)

    def wait_ssh(self, timeout: float = 300.0) -> float:
        """Seconds until SSH answers (the device booted); ShellError after `timeout`."""
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < timeout:
            try:
                if self._shell("true", self.config.connect_timeout + 5.0).rc == 0:
                    return time.monotonic() - t0
            except ShellError as e:
                last = e.message
            time.sleep(2.0)
        raise ShellError(f"{self.name}: no SSH within {timeout:g} s ({last})")

    def _scp(self, src: str, dst: str, timeout: float) -> None:
        try:
            run(["scp", *self.ssh_options(), "-P", str(self.config.address.port), "-q", src, dst], timeout=timeout)
        except CommandError as e:
            raise ShellError(f"{self.name}: scp {src} {dst}: {e.message}") from None

    def put(self, local: Path, remote: str, timeout: float = 600.0) -> None:
        self._scp(str(local), f"{self._scp_host()}:{remote}", timeout)

    def get(self, remote: str, local: Path, timeout: float = 600.0) -> None:
        self._scp(f"{self._scp_host()}:{remote}", str(local), timeout)

    def _scp_host(self) -> str:
        a = self.config.address
        host = f"[{a.host}]" if ":" in a.host else a.host
        return f"{a.user}@{host}" if a.user else host

    def _need_power(self) -> PowerControl:
        if self.config.power is None:
            raise HilError(
                f"{self.name}: no power control configured (--power-on/--power-off, --pdu-on/--pdu-off, --relay)"
            )
        return self.config.power

    def _power_on(self) -> None:
        self._need_power().on()

    def _power_cut(self) -> None:
        self._need_power().off()

    def _power_off(self, timeout: float) -> bool:
        power = self._need_power()
        start = self.console.mark()
        deadline = time.monotonic() + timeout
        clean = False
        with contextlib.suppress(ShellError):
            self._shell("systemctl poweroff", 30.0)
        if self.console.attached:
            try:
                self.console.wait_for(r"reboot: Power down", timeout, start=start)
                clean = True
            except (ConsoleTimeout, HilError):
                clean = False
        else:
            while time.monotonic() < deadline:
                try:
                    self._shell("true", self.config.connect_timeout + 5.0)
                except ShellError:
                    time.sleep(5.0)  # SSH is down before the last filesystems are; give them a moment
                    clean = True
                    break
                time.sleep(1.0)
        power.off()
        return clean

    def _network(self, up: bool) -> None:
        c = self.config
        cmd = c.net_up if up else c.net_down
        if not cmd:
            raise HilError(f"{self.name}: no network hook configured (--net-down/--net-up)")
        run_hook("network up" if up else "network down", cmd)

    def _flash(self, image: Path, provision: Provision | None) -> str:
        c = self.config
        if c.flash_device is None and not c.flash_command:
            raise HilError(f"{self.name}: no way to flash configured (--flash-device or --flash-command)")
        src = image
        copy = self.workdir / "flash.img"
        if provision is not None:
            src = copy_image(image, copy)
            provision.apply(src)
        try:
            if c.power is not None:
                c.power.off()  # the disk changes hands only with the device off
            if c.flash_before:
                run_hook("flash-before", c.flash_before)
            if c.flash_device is not None:
                from pitstop.image import flash  # noqa: PLC0415

                _wait_for_path(c.flash_device, c.device_wait)
                res = flash.flash(src, c.flash_device)
                how = f"pitstop image flash to {c.flash_device} ({res.written >> 20} MiB written, verified)"
            else:
                assert c.flash_command is not None
                run_hook("flash", c.flash_command.format(image=shlex.quote(str(src))), timeout=3600.0)
                how = "flash command"
            if c.flash_after:
                run_hook("flash-after", c.flash_after)
        finally:
            copy.unlink(missing_ok=True)
        self.known_hosts.write_text("")  # a flashed device makes new host keys on first boot
        who = f", provisioned as {provision.device_id}" if provision else ""
        return f"{image.name} by {how}{who}"


def _wait_for_path(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            raise HilError(f"{path} did not appear within {timeout:g} s (is the SD-mux on the rig's side?)")
        time.sleep(0.5)


def source_address(host: str, port: int = 22) -> str:
    """The rig's own address on the route to `host`: what the device reaches it by. A UDP socket's connect sends
    nothing; it only picks the route."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise HilError(f"cannot resolve {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
        except OSError as e:
            raise HilError(f"no route to {host}: {e}") from None
        return str(s.getsockname()[0])
