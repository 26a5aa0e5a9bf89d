"""A private dbus-daemon for tests: its own socket and configuration, never the host's buses.

Two kinds: `permissive` (every call reaches the service, so the daemon's own authorization is what is tested)
and `system` (the system bus's default deny, plus the daemon's policy file: what a device enforces at the bus).
The socket's directory is world-traversable so that a client running as `nobody` can connect.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

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
