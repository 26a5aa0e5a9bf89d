"""Power control of a real device under test: something that switches its supply on and off, hard.

- `CommandPower`: a shell command each for on and off (a vendor tool, `usbrelay`, `uhubctl`, a script);
  `--power-on CMD --power-off CMD`;
- `HttpPdu`: an HTTP request to a switched PDU, one URL template each (`{outlet}` filled in), method, basic auth;
  `--pdu-on URL --pdu-off URL [--pdu-outlet N] [--pdu-method M] [--pdu-auth USER:PASSWORD]`;
- `UsbRelay`: the common HID USB relay boards (`usb_relay_device`, 16c0:05df): a 9-byte output report written to
  `/dev/hidrawN`; `--relay /dev/hidrawN[:CHANNEL][:nc]`.

Off is always a cut: the supply goes away at once. A clean shutdown is the target's business (ssh_target.py
powers the system off first, then cuts). Every hook raises PowerError when it cannot do what it was asked.
"""

from __future__ import annotations

import base64
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pitstop.hil.errors import PowerError
from pitstop.hil.hooks import run_hook


class PowerControl(Protocol):
    @property
    def description(self) -> str: ...

    def on(self) -> None: ...

    def off(self) -> None: ...


@dataclass(frozen=True)
class CommandPower:
    on_command: str
    off_command: str
    timeout: float = 60.0

    @property
    def description(self) -> str:
        return f"commands `{self.on_command}` / `{self.off_command}`"

    def on(self) -> None:
        run_hook("power-on", self.on_command, timeout=self.timeout, error=PowerError)

    def off(self) -> None:
        run_hook("power-off", self.off_command, timeout=self.timeout, error=PowerError)


@dataclass(frozen=True)
class HttpPdu:
    """A switched PDU's HTTP interface. `on_url`/`off_url` are templates: `{outlet}` becomes `outlet`. A 2xx
    answer is success; anything else, or no answer within `timeout`, is a PowerError."""

    on_url: str
    off_url: str
    outlet: str = ""
    method: str = "POST"
    auth: tuple[str, str] | None = None  # HTTP basic
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0

    @property
    def description(self) -> str:
        return f"HTTP PDU {self.method} {_redact(self.url(self.on_url))}"

    def url(self, template: str) -> str:
        try:
            return template.format(outlet=self.outlet)
        except (KeyError, IndexError, ValueError) as e:
            raise PowerError(f"PDU URL template {template!r}: only {{outlet}} can be filled in ({e})") from None

    def _request(self, what: str, template: str) -> None:
        url = self.url(template)
        if not url.startswith(("http://", "https://")):
            raise PowerError(f"PDU {what} URL {url!r}: an http:// or https:// URL")
        # The scheme is checked above: no file:// or custom schemes.
        req = urllib.request.Request(url, self.body, dict(self.headers), method=self.method.upper())  # noqa: S310
        if self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (checked above)
                resp.read()
                status = int(resp.status)
        except urllib.error.HTTPError as e:
            raise PowerError(f"PDU {what}: {self.method} {_redact(url)} answered {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise PowerError(f"PDU {what}: {self.method} {_redact(url)}: {reason}") from None
        if not 200 <= status < 300:
            raise PowerError(f"PDU {what}: {self.method} {_redact(url)} answered {status}")

    def on(self) -> None:
        self._request("on", self.on_url)

    def off(self) -> None:
        self._request("off", self.off_url)


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)


RELAY_ON = 0xFF
RELAY_OFF = 0xFD


def relay_report(channel: int, closed: bool) -> bytes:
    """The output report of the HID USB relay boards: report id 0, 0xFF (close) or 0xFD (open), the channel
    (1-8), zeros to 9 bytes."""
    if not 1 <= channel <= 8:
        raise PowerError(f"USB relay channel {channel}: 1 to 8")
    return bytes([0, RELAY_ON if closed else RELAY_OFF, channel, 0, 0, 0, 0, 0, 0])


@dataclass(frozen=True)
class UsbRelay:
    """One channel of a HID USB relay board. `normally_closed`: the supply runs through the relay's NC contact,
    so power on means the relay released."""

    device: Path
    channel: int = 1
    normally_closed: bool = False

    @property
    def description(self) -> str:
        nc = " (NC contact)" if self.normally_closed else ""
        return f"USB relay {self.device} channel {self.channel}{nc}"

    def _set(self, closed: bool) -> None:
        report = relay_report(self.channel, closed)
        try:
            # O_APPEND is ignored by a hidraw node (one write is one report); a regular file standing in for it
            # keeps every report in order.
            fd = os.open(self.device, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            raise PowerError(f"{self.description}: cannot open: {e.strerror}") from None
        try:
            if os.write(fd, report) != len(report):
                raise PowerError(f"{self.description}: short write")
        except OSError as e:
            raise PowerError(f"{self.description}: {e.strerror}") from None
        finally:
            os.close(fd)

    def on(self) -> None:
        self._set(not self.normally_closed)

    def off(self) -> None:
        self._set(self.normally_closed)


def relay_from_spec(spec: str) -> UsbRelay:
    """`/dev/hidrawN[:CHANNEL][:nc]`."""
    parts = spec.split(":")
    path, rest = parts[0], parts[1:]
    nc = bool(rest) and rest[-1].lower() == "nc"
    if nc:
        rest = rest[:-1]
    if len(rest) > 1 or (rest and not rest[0].isdigit()) or not path:
        raise PowerError(f"--relay {spec!r}: /dev/hidrawN[:CHANNEL][:nc]")
    channel = int(rest[0]) if rest else 1
    relay_report(channel, True)  # checks the channel now, not at the first power-on
    return UsbRelay(Path(path), channel, nc)


def parse_auth(value: str) -> tuple[str, str]:
    """`USER:PASSWORD`."""
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise PowerError("PDU credentials: USER:PASSWORD")
    return user, password
