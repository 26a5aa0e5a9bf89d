"""The HIL rig's power hooks (hil/power.py): shell commands, an HTTP PDU (a real loopback HTTP server), the HID USB
relay boards (a regular file standing in for /dev/hidrawN: the bytes written are the reports)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pitstop.hil.errors import PowerError
from pitstop.hil.power import CommandPower, HttpPdu, UsbRelay, parse_auth, relay_from_spec, relay_report


def test_command_power(tmp_path: Path) -> None:
    log = tmp_path / "log"
    p = CommandPower(f"echo on >> {log}", f"echo off >> {log}")
    p.on()
    p.off()
    p.on()
    assert log.read_text() == "on\noff\non\n"
    assert "echo on" in p.description
    bad = CommandPower("echo 'relay not found' >&2; exit 4", "true")
    with pytest.raises(PowerError, match=r"power-on hook .* failed: sh failed: exit status 4: relay not found"):
        bad.on()
    slow = CommandPower("sleep 10", "true", timeout=0.3)
    with pytest.raises(PowerError, match="timed out"):
        slow.on()


@dataclass
class Pdu:
    """What the loopback PDU saw: (method, path, Authorization header, body) per request."""

    url: str
    requests: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def pdu() -> Iterator[Pdu]:
    state = Pdu("")

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.requests.append((self.command, self.path, self.headers.get("Authorization", ""), body))
            self.send_response(state.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST = do_PUT = _any

        def log_message(self, format: str, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    th.start()
    state.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(5)


def test_http_pdu_switches_the_outlet(pdu: Pdu) -> None:
    p = HttpPdu(
        f"{pdu.url}/outlet?{{outlet}}=ON", f"{pdu.url}/outlet?{{outlet}}=OFF", outlet="3", method="GET",
        auth=("admin", "s3:cret"),
    )  # fmt: skip
    p.on()
    p.off()
    creds = "Basic " + base64.b64encode(b"admin:s3:cret").decode()
    assert pdu.requests == [("GET", "/outlet?3=ON", creds, b""), ("GET", "/outlet?3=OFF", creds, b"")]
    post = HttpPdu(f"{pdu.url}/api/outlets/{{outlet}}/on", f"{pdu.url}/api/outlets/{{outlet}}/off", "7", body=b"{}")
    post.off()
    assert pdu.requests[-1] == ("POST", "/api/outlets/7/off", "", b"{}")
    assert post.description.startswith("HTTP PDU POST http://127.0.0.1:")


def test_http_pdu_failures(pdu: Pdu) -> None:
    pdu.status = 401
    with pytest.raises(PowerError, match=r"PDU on: POST http://127\.0\.0\.1:\d+/on answered 401"):
        HttpPdu(f"{pdu.url}/on", f"{pdu.url}/off").on()
    with pytest.raises(PowerError, match=r"only \{outlet\} can be filled in"):
        HttpPdu(f"{pdu.url}/{{port}}", f"{pdu.url}/off").on()
    with pytest.raises(PowerError, match="an http:// or https:// URL"):
        HttpPdu("file:///etc/passwd", "file:///etc/passwd").on()
    with pytest.raises(PowerError, match="Connection refused"):
        HttpPdu("http://127.0.0.1:1/on", "http://127.0.0.1:1/off", timeout=2).on()
    # Credentials never show in messages.
    assert "secret" not in HttpPdu("http://u:secret@pdu/on", "http://pdu/off").description
    assert parse_auth("admin:a:b") == ("admin", "a:b")
    with pytest.raises(PowerError, match="USER:PASSWORD"):
        parse_auth("nopassword")


def test_usb_relay_reports(tmp_path: Path) -> None:
    node = tmp_path / "hidraw0"
    node.write_bytes(b"")
    relay = UsbRelay(node, channel=2)
    relay.on()
    relay.off()
    assert node.read_bytes() == bytes([0, 0xFF, 2, 0, 0, 0, 0, 0, 0]) + bytes([0, 0xFD, 2, 0, 0, 0, 0, 0, 0])
    # Supply through the normally-closed contact: power on releases the relay.
    node.write_bytes(b"")
    nc = relay_from_spec(f"{node}:4:nc")
    assert (nc.channel, nc.normally_closed) == (4, True)
    nc.on()
    assert node.read_bytes() == bytes([0, 0xFD, 4, 0, 0, 0, 0, 0, 0])
    assert relay_from_spec(str(node)) == UsbRelay(node, 1, False)
    assert relay_report(8, True) == bytes([0, 0xFF, 8]) + bytes(6)
    with pytest.raises(PowerError, match="channel 9: 1 to 8"):
        relay_from_spec(f"{node}:9")
    with pytest.raises(PowerError, match=r"/dev/hidrawN\[:CHANNEL\]\[:nc\]"):
        relay_from_spec(f"{node}:one")
    with pytest.raises(PowerError, match="cannot open"):
        UsbRelay(tmp_path / "hidraw9").on()
