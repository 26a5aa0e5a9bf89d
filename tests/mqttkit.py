"""A real MQTT broker (mosquitto) on loopback for tests, and a subscriber that collects what arrives.

    with Broker(tmp_path, mosquitto) as broker:          # mosquitto = mqttkit.find_mosquitto()
        with Subscriber(broker.port, "pitstop/#") as sub:
            ...  # publish to broker.url("pitstop/results")
            sub.wait_for(3)
        broker.kill(); broker.start()                     # same port: clients reconnect

Each broker gets its own generated configuration (one listener on 127.0.0.1, no persistence), a free port,
its own process group, and is SIGKILLed when done. `tls=` (httpkit.make_tls files) makes the listener TLS;
`users=` turns anonymous access off and writes a password file with mosquitto_passwd.
Debian package: mosquitto (the broker lives in /usr/sbin, which a non-root PATH may lack).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from conftest import find_tool
from httpkit import TlsFiles
from paho.mqtt.enums import CallbackAPIVersion


def find_mosquitto() -> str:
    """The broker's path; skips the test when it is missing (fails under CI=true), as the `tool` fixture does."""
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    return path or find_tool("mosquitto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    def __init__(
        self,
        workdir: Path,
        mosquitto: str,
        *,
        tls: TlsFiles | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "mosquitto.log"
        self._mosquitto = mosquitto
        self._proc: subprocess.Popen[bytes] | None = None
        # Started as root, mosquitto drops to user "mosquitto", which cannot read pytest's private tmp files.
        user = pwd.getpwuid(os.getuid()).pw_name
        lines = [f"listener {self.port} 127.0.0.1", f"user {user}", "persistence false", "log_type all"]
        if tls is not None:
            lines += [f"cafile {tls.ca_cert}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}"]
        if users:
            passwd = self.dir / "passwd"
            for user, password in users.items():
                flags = ["-b"] if passwd.exists() else ["-c", "-b"]
                subprocess.run([find_tool("mosquitto_passwd"), *flags, str(passwd), user, password], check=True,
                               capture_output=True)  # fmt: skip
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def url(self, topic: str, scheme: str = "mqtt") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{topic}"

    def start(self, timeout: float = 10.0) -> None:
        assert self._proc is None, "already running"
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([self._mosquitto, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start: {self.log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto not listening on {self.port} after {timeout} s")
            time.sleep(0.02)

    def kill(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()


class Subscriber:
    """A paho client subscribed to `topic`; `messages` fills from its network thread."""

    def __init__(self, port: int, topic: str, qos: int = 1, *, tls: TlsFiles | None = None) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{os.getpid()}-{id(self)}")
        if tls is not None:
            self._client.tls_set(ca_certs=str(tls.ca_cert))
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos)
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"subscriber: no SUBACK for {topic!r} from 127.0.0.1:{port}")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"{len(self.messages)} of {count} messages arrived within {timeout} s")
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
