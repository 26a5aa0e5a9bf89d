"""A private dbus-daemon for tests: its own socket and configuration, never the host's buses.

Two kinds: `permissive` (every call reaches the service, so the daemon's own authorization is what is tested)
and `system` (the system bus's default deny, plus the daemon's policy file: what a device enforces at the bus).
The socket's directory is world-traversable so that a client running as `nobody` can connect.

`ServedDaemon` serves the real daemon core and its API on such a bus from a thread, for tests written as plain
synchronous code (the `pitstop` command run against it as a subprocess).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

PERMISSIVE = """
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true"/>
    <allow receive_type="*"/>
  </policy>
"""
# The essentials of Debian's /usr/share/dbus-1/system.conf: deny by default, replies and signals allowed.
SYSTEM = """
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
  </policy>
"""


class PrivateBus:
    def __init__(self, kind: str = "permissive", include: Path | None = None) -> None:
        exe = shutil.which("dbus-daemon")
        if exe is None:
            pytest.skip("dbus-daemon missing (apt package dbus-daemon)")
        self.dir = Path(tempfile.mkdtemp(prefix="pitstop-bus-"))
        os.chmod(self.dir, 0o755)
        sock = self.dir / "bus"
        policy = PERMISSIVE if kind == "permissive" else SYSTEM
        extra = f"<include>{include}</include>" if include else ""
        conf = self.dir / "bus.conf"
        conf.write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" '
            '"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            f"<busconfig><type>pitstop-test</type><listen>unix:path={sock}</listen><auth>EXTERNAL</auth>"
            f"{policy}{extra}</busconfig>\n"
        )
        self.proc = subprocess.Popen(
            [exe, "--config-file", str(conf), "--nofork", "--nopidfile", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"dbus-daemon did not start: {err}")
        self.address = line
        os.chmod(sock, 0o777)

    def send(self, *args: str, user: int | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """dbus-send on this bus (as `user`, a uid, when given): returns the finished process."""
        return subprocess.run(
            ["dbus-send", f"--bus={self.address}", "--print-reply", "--reply-timeout=15000", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
            check=False,
        )

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateBus:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ServedDaemon:
    """The daemon core (pitstop.daemon.core) and its D-Bus API served on `bus` from an event loop in a thread of
    its own, the name requested last as `pitstop daemon` does: tests in plain synchronous code (a CLI run as a
    subprocess, say) talk to a real daemon. `core_kw` goes to DaemonCore (installer=, reboot=, ...). With
    `update` (an UpdateConfig), installs go through the update agent, as in `pitstop daemon`: its state is kept
    in `state_dir`."""

    def __init__(
        self,
        bus: PrivateBus,
        system_config: Path,
        *,
        control_group: str = "pitstop",
        update: Any = None,
        state_dir: Path | None = None,
        **core_kw: Any,
    ) -> None:
        self.bus = bus
        self.system_config = system_config
        self.control_group = control_group
        self.update = update
        self.state_dir = state_dir
        self.core_kw = core_kw
        self.core: Any = None  # the DaemonCore, once serving
        self.agent: Any = None  # the UpdateAgent, with `update`
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="served-daemon", daemon=True)

    def __enter__(self) -> ServedDaemon:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the daemon core did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        from dbus_fast.aio import MessageBus

        from pitstop.daemon import dbus_api
        from pitstop.daemon.core import DaemonCore
        from pitstop.ota.system_config import load

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sbus = await MessageBus(bus_address=self.bus.address).connect()
        core = DaemonCore(load(self.system_config), **self.core_kw)
        if self.update is not None:
            from pitstop.daemon.update_agent import UpdateAgent

            assert self.state_dir is not None, "an update agent keeps its record in state_dir"
            self.agent = core.flow = UpdateAgent(core, self.update, self.state_dir)
        obj, _ = dbus_api.serve(sbus, core, control_group=self.control_group)
        try:
            await sbus.request_name(dbus_api.BUS_NAME)
            self.core = core
            self._ready.set()
            await self._stop.wait()
        finally:
            if self.agent is not None:
                await self.agent.close()
                self.agent.shutdown()
            await core.close()
            obj.unexport()
            sbus.disconnect()
