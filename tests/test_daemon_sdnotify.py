"""daemon/sdnotify.py against a real notify socket: a datagram socket bound in a temporary directory (or the
abstract namespace) standing in for systemd, named by $NOTIFY_SOCKET as systemd would."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitstop.daemon import sdnotify


class Manager:
    """The service manager's end: receives datagrams, records when each arrived."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def messages(self, timeout: float = 2.0, count: int = 1) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return [m for _, m in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    # A short directory: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as d:
        path = os.path.join(d, "notify")
        m = Manager(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            monkeypatch.delenv(name, raising=False)
        try:
            yield m
        finally:
            m.close()


def parse(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n"))


def test_ready_and_status_arrive(manager: Manager) -> None:
    n = sdnotify.Notifier.from_env()
    assert n.enabled
    assert n.ready("serving 2 loops")
    assert n.status("loop text-det\nrestarting")
    msgs = manager.messages(count=2)
    assert parse(msgs[0]) == {"READY": "1", "STATUS": "serving 2 loops"}
    # A newline in a status would start another assignment: it is folded into one line.
    assert parse(msgs[1]) == {"STATUS": "loop text-det restarting"}
    n.close()


def test_reloading_carries_monotonic_usec(manager: Manager) -> None:
    n = sdnotify.Notifier.from_env()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading("reloading configuration")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.ready()
    n.stopping()
    n.errno(5, "cannot read the data partition")
    n.watchdog_trigger()
    n.extend_timeout(30)
    msgs = [parse(m) for m in manager.messages(count=6)]
    assert msgs[0]["RELOADING"] == "1" and msgs[0]["STATUS"] == "reloading configuration"
    assert before <= int(msgs[0]["MONOTONIC_USEC"]) <= after
    assert msgs[1:] == [
        {"READY": "1"},
        {"STOPPING": "1"},
        {"ERRNO": "5", "STATUS": "cannot read the data partition"},
        {"WATCHDOG": "trigger"},
        {"EXTEND_TIMEOUT_USEC": "30000000"},
    ]
    n.close()


def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pitstop-test-{os.getpid()}-{time.monotonic_ns()}"
    m = Manager("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = sdnotify.Notifier.from_env()
        assert n.ready()
        assert m.messages() == ["READY=1"]
        n.close()
    finally:
        m.close()


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = sdnotify.Notifier.from_env()
    assert not n.enabled
    assert not n.ready() and not n.watchdog()


def test_invalid_notify_socket_is_off(caplog: pytest.LogCaptureFixture) -> None:
    n = sdnotify.Notifier("relative/path")
    assert not n.enabled and not n.ready()
    assert "not an absolute path" in caplog.text


def test_send_failure_is_logged_once_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = sdnotify.Notifier(str(tmp_path / "nobody-listens"))
    assert not n.ready()
    assert not n.watchdog()
    assert caplog.text.count("cannot notify the service manager") == 1
    n.close()


def test_from_env_unset_hides_variables_from_children() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1", "HOME": "/root"}
    n = sdnotify.Notifier.from_env(env, unset=True)
    assert n.socket_name == "/run/x"
    assert env == {"HOME": "/root"}


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": pid}) == 3.0
    # Meant for another process (the main PID before a fork, say): not ours to ping.
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3s"}) is None


def test_start_watchdog_without_a_watchdog_starts_nothing(manager: Manager) -> None:
    async def main() -> object:
        return sdnotify.start_watchdog(sdnotify.Notifier.from_env())

    assert asyncio.run(main()) is None


def _pings(manager: Manager) -> list[float]:
    return [t for t, m in manager.received if m == "WATCHDOG=1"]


def test_watchdog_pings_at_half_the_interval(manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def main() -> None:
        task = sdnotify.start_watchdog(sdnotify.Notifier.from_env())
        assert task is not None
        await asyncio.sleep(2.0)
        task.cancel()

    asyncio.run(main())
    time.sleep(0.1)
    pings = _pings(manager)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 8 <= len(pings) <= 12, pings
    assert 0.15 <= statistics.median(gaps) <= 0.3, gaps
    assert max(gaps) < 0.4, gaps  # never as late as the interval itself


def test_blocked_event_loop_stops_the_pings(manager: Manager) -> None:
    interval = 0.4

    async def hang() -> None:
        time.sleep(1.2)  # a blocking call inside a coroutine: the bug the watchdog is there to catch

    async def main() -> None:
        task = sdnotify.start_watchdog(sdnotify.Notifier.from_env(), interval)
        assert task is not None
        await asyncio.sleep(0.8)
        await hang()
        await asyncio.sleep(0.8)
        task.cancel()

    asyncio.run(main())
    time.sleep(0.1)
    pings = _pings(manager)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # systemd would have killed the daemon: one gap exceeds the interval, the others stay near half of it.
    assert max(gaps) > interval * 2, gaps
    assert sorted(gaps)[-2] < interval, gaps
