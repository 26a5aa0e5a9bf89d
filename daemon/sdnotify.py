"""systemd's sd_notify protocol, spoken directly: READY, STATUS, RELOADING, STOPPING, WATCHDOG, ERRNO.

Why not systemd-python: it is a C extension that needs a compiler and libsystemd-dev in the image, for a protocol
that is one datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or `@name` for
the abstract namespace), documented as stable in sd_notify(3). Without $NOTIFY_SOCKET every call does nothing,
so the daemon runs the same outside systemd.

The watchdog (`WatchdogSec=`) is pinged from the asyncio event loop itself (`watchdog_task`): if the loop
blocks, the pings stop and systemd kills and restarts the hung daemon. Pinging from a thread would keep a
deadlocked daemon alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

# The variables systemd passes to a Type=notify service.
NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(value: str) -> str | None:
    """The socket address $NOTIFY_SOCKET names, None for a form this module does not speak."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    return None  # relative paths are invalid; vsock: addresses (systemd ≥ 254, VMs) are not spoken here


class Notifier:
    """Sends state changes to the service manager; a no-op when not started by one (no $NOTIFY_SOCKET)."""

    def __init__(self, notify_socket: str | None) -> None:
        self.socket_name = notify_socket or None
        self._address = _address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.warning(
                "%s=%r is not an absolute path or @abstract name: notifications off", NOTIFY_SOCKET, notify_socket
            )
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """The notifier $NOTIFY_SOCKET names. `unset`: remove NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from
        the environment afterwards, so that child processes (inference loops) do not inherit them: read
        `watchdog_interval()` first."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get(NOTIFY_SOCKET))
        if unset:
            for name in (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID):
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments as one datagram. True if sent; False if notifications are off or the
        send failed (logged: a lost notification must not take the daemon down, systemd acts on its absence)."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self._address)
        except OSError as e:
            # Once per run of failures: the watchdog pings every few seconds.
            if not self._failing:
                log.warning("cannot notify the service manager at %s: %s", self.socket_name, e.strerror or e)
            self._failing = True
            return False
        if self._failing:
            log.info("notifying the service manager at %s works again", self.socket_name)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", *([f"STATUS={_line(status)}"] if status is not None else []))

    def status(self, text: str) -> bool:
        """A one-line status `systemctl status` shows."""
        return self.send(f"STATUS={_line(text)}")

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins (Type=notify-reload, systemd ≥ 253): MONOTONIC_USEC tells systemd which reload this
        is; send `ready()` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        extra = [f"STATUS={_line(status)}"] if status is not None else []
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *extra)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown begins."""
        return self.send("STOPPING=1", *([f"STATUS={_line(status)}"] if status is not None else []))

    def watchdog(self) -> bool:
        """Keep-alive ping for WatchdogSec=."""
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog had expired (the daemon knows it is unhealthy)."""
        return self.send("WATCHDOG=trigger")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start-up, reload or shutdown (EXTEND_TIMEOUT_USEC)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1e6))}")

    def errno(self, code: int, status: str | None = None) -> bool:
        """The daemon is failing with this errno (shown by `systemctl status`)."""
        return self.send(f"ERRNO={int(code)}", *([f"STATUS={_line(status)}"] if status is not None else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(text.splitlines())


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds systemd expects pings within (WATCHDOG_USEC), or None when there is no
    watchdog for this process: unset, invalid, or WATCHDOG_PID names another process (sd_watchdog_enabled(3))."""
    env = os.environ if environ is None else environ
    usec = env.get(WATCHDOG_USEC)
    if not usec:
        return None
    pid = env.get(WATCHDOG_PID)
    if pid is not None and pid != str(os.getpid()):
        return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("%s=%r is not a positive number of microseconds: watchdog off", WATCHDOG_USEC, usec)
        return None
    return int(usec) / 1e6


async def watchdog_task(notifier: Notifier, interval: float) -> None:
    """Ping every interval/2 until cancelled, from the event loop, so that a blocked loop stops the pings."""
    loop = asyncio.get_running_loop()
    period = interval / 2
    next_at = loop.time()
    while True:
        notifier.watchdog()
        # Fixed-rate schedule: sleep to the next slot, not a full period after a late ping.
        next_at = max(next_at + period, loop.time())
        await asyncio.sleep(next_at - loop.time())


def start_watchdog(notifier: Notifier, interval: float | None = None) -> asyncio.Task[None] | None:
    """Start `watchdog_task` on the running loop when systemd expects pings (`interval`: from the environment when
    None); None when there is nothing to ping. Cancel the task to stop."""
    if interval is None:
        interval = watchdog_interval()
    if interval is None or not notifier.enabled:
        return None
    return asyncio.get_running_loop().create_task(watchdog_task(notifier, interval), name="sd-watchdog")
