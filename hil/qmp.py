"""A small client for QEMU's machine protocol (QMP): JSON lines over a unix socket.

    with Qmp.connect(path) as qmp:          # greeting read, capabilities negotiated
        qmp.set_link("nic0", False)         # the virtual cable pulled
        qmp.execute("system_powerdown")     # the ACPI power button
        qmp.hmp("info network")             # a human monitor command, its text

Replies are matched to commands by `id`; asynchronous events (RESET, SHUTDOWN, ...) that arrive meanwhile are
kept in `events`. Every read has a timeout: a QEMU that hangs or dies cannot hang the rig.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pitstop.hil.errors import QmpError

_MAX_MESSAGE = 16 << 20


class Qmp:
    def __init__(self, sock: socket.socket, path: Path, timeout: float) -> None:
        self._sock = sock
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    def connect(
        cls, path: Path, *, wait: float = 10.0, timeout: float = 10.0, alive: Callable[[], bool] | None = None
    ) -> Qmp:
        """Connect to QEMU's `-qmp unix:PATH,server=on,wait=off`, retrying for `wait` s while QEMU starts (and
        `alive()` says it is still there); read the greeting and leave capabilities negotiation mode."""
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if alive is not None and not alive():
                    raise QmpError(f"QMP socket {path}: QEMU exited before it listened") from None
                if time.monotonic() >= deadline:
                    raise QmpError(f"QMP socket {path}: {e.strerror} after {wait:g} s") from None
                time.sleep(0.05)
            except OSError as e:
                sock.close()
                raise QmpError(f"QMP socket {path}: {e}") from None
        qmp = cls(sock, path, timeout)
        try:
            greeting = qmp._message()
            if "QMP" not in greeting:
                raise QmpError(f"QMP socket {path}: not a QMP greeting: {greeting!r}")
            qmp.greeting = greeting["QMP"]
            qmp.execute("qmp_capabilities")
        except BaseException:
            qmp.close()
            raise
        return qmp

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"QMP {self.path}: no answer within {self.timeout:g} s") from None
            except OSError as e:
                raise QmpError(f"QMP {self.path}: {e}") from None
            if not chunk:
                raise QmpError(f"QMP {self.path}: QEMU closed the connection")
            self._buf += chunk
            if len(self._buf) > _MAX_MESSAGE:
                raise QmpError(f"QMP {self.path}: a message larger than {_MAX_MESSAGE} bytes")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP {self.path}: not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP {self.path}: not a JSON object: {line[:200]!r}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a QMP command; its `return` value, or QmpError with QEMU's error class and description."""
        ident = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QMP {self.path}: cannot send {command}: {e}") from None
        while True:
            try:
                msg = self._message()
            except QmpError:
                if command == "quit":  # QEMU may close the socket before its reply gets out
                    return {}
                raise
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != ident:
                continue  # a late reply to a command that timed out earlier
            if "error" in msg:
                err = msg["error"]
                cls = str(err.get("class", ""))
                raise QmpError(f"QMP {command}: {cls}: {err.get('desc', '')}", error_class=cls)
            return msg.get("return")

    def hmp(self, command_line: str) -> str:
        """A human monitor command (`info network`), its output."""
        out = self.execute("human-monitor-command", {"command-line": command_line})
        return str(out or "")

    def set_link(self, name: str, up: bool) -> None:
        """Link state of a NIC or netdev by its id: down drops every frame both ways and tells the guest's NIC
        driver the carrier is gone."""
        self.execute("set_link", {"name": name, "up": up})

    def status(self) -> str:
        """`running`, `paused`, `shutdown`, ..."""
        st = self.execute("query-status")
        return str(st.get("status", "")) if isinstance(st, dict) else ""
