"""The HIL rig's serial console (hil/console.py) and the shell on it (hil/shell.py), against real byte streams: a
subprocess printing lines, a loopback TCP server, a pseudo-terminal standing in for a serial device, and an
interactive bash standing in for the device's autologin shell."""

from __future__ import annotations

import os
import re
import socket
import termios
import threading
import time
from pathlib import Path

import pytest

from pitstop.hil.console import Console, Line, ProcessSource, TcpSource, TtySource, clean, open_source
from pitstop.hil.errors import ConsoleClosed, ConsoleTimeout, HilError, ShellError, ShellTimeout
from pitstop.hil.shell import SerialShell
from pitstop.hil.timeline import Clock, Timeline


def sh(script: str) -> ProcessSource:
    return ProcessSource(["sh", "-c", script])


def test_clean_strips_escapes_and_carriage_returns() -> None:
    assert clean(b"\x1b[2J\x1b[01;01H\x1b[=3h\x1b[1m\x1b[33mShell> \x1b[0m\r") == "Shell> "
    assert clean(b"caf\xc3\xa9 \xff\x00") == "café \ufffd"


def test_lines_are_cleaned_timestamped_and_logged(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    with Console(log, name="dut") as c:
        c.attach(
            sh(r"printf 'one\r\n\033[1;33mtwo\033[0m\n\033[=3hthree'; sleep 0.3; printf ' and more\nfour\n'; sleep 5")
        )
        hit = c.wait_for(r"^fo(u)r$", 5)
        assert [ln.text for ln in c.lines] == ["one", "two", "three and more", "four"]
        assert (hit.index, hit.text, hit[1]) == (3, "four", "u")
        times = [ln.t for ln in c.lines]
        assert times == sorted(times) and times[2] - times[0] >= 0.25  # "three" is stamped when its line ends
        assert c.mark() == 4 and c.text(2) == "three and more\nfour\n"
        assert [ln.text for ln in c.matching(r"^t")] == ["two", "three and more"]
    text = log.read_text()
    assert re.search(r"^\[\s+\d+\.\d\d\] ### attached: sh -c ", text, re.M)
    assert re.search(r"^\[\s+\d+\.\d\d\] three and more$", text, re.M) and "\x1b" not in text


def test_waits_start_after_a_mark(tmp_path: Path) -> None:
    with Console(tmp_path / "log") as c:
        c.attach(sh("echo READY slot=a; sleep 0.3; echo READY slot=b; sleep 5"))
        first = c.wait_for(r"READY slot=(\w)", 5)
        assert first[1] == "a"
        second = c.wait_for(r"READY slot=(\w)", 5, start=first.index + 1)
        assert second[1] == "b" and second.t > first.t


def test_timeouts_closed_streams_and_the_hard_limit(tmp_path: Path) -> None:
    c = Console(tmp_path / "log", name="dut")
    with pytest.raises(ConsoleClosed, match="no console is attached"):
        c.wait_for("x", 10)
    with pytest.raises(ConsoleClosed, match="cannot type"):
        c.send("x")
    c.attach(sh("echo 'last words'; sleep 30"))
    t0 = time.monotonic()
    with pytest.raises(ConsoleTimeout) as err:
        c.wait_for("never", 0.3)
    assert 0.25 < time.monotonic() - t0 < 2
    assert "no /never/ within 0.3 s" in str(err.value) and "last words" in str(err.value)
    assert str(tmp_path / "log") in str(err.value)
    # The device's hard time limit caps any wait.
    c.deadline = time.monotonic() + 0.3
    t0 = time.monotonic()
    with pytest.raises(ConsoleTimeout, match="time limit"):
        c.wait_for("never", 60)
    assert time.monotonic() - t0 < 2
    c.deadline = None
    c.attach(sh("echo bye"))  # the previous source is let go (its sleep killed)
    t0 = time.monotonic()
    with pytest.raises(ConsoleClosed, match="ended before /never/"):
        c.wait_for("never", 30)
    assert time.monotonic() - t0 < 2
    assert [ln.text for ln in c.lines] == ["last words", "bye"]
    c.close()


def test_typing_and_a_second_source_continue_the_same_console(tmp_path: Path) -> None:
    with Console(tmp_path / "log") as c:
        c.attach(ProcessSource(["cat"]))
        start = c.mark()
        c.send("hello\n")
        assert c.wait_for("hello", 5, start=start).index == start
        c.detach()
        assert not c.attached
        c.attach(sh("echo again"))
        hit = c.wait_for("again", 5)
        assert hit.index == 1 and [ln.text for ln in c.lines] == ["hello", "again"]


def test_closing_a_process_source_ends_its_whole_group() -> None:
    src = sh("sleep 60 & echo $!; wait")
    c = Console()
    c.attach(src)
    child = int(c.wait_for(r"^\d+$", 5).text)
    c.close()
    assert src.proc.poll() is not None
    assert not running(child)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whatever reaps orphans here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_tcp_serial_server(tmp_path: Path) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"U-Boot 2024.01\r\nHit any key\r\n")
            got.append(conn.recv(100))
            conn.sendall(b"=> ok\n")
            time.sleep(0.5)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    c = Console(tmp_path / "log")
    c.attach(open_source(f"tcp://127.0.0.1:{port}"))
    c.wait_for("Hit any key", 5)
    c.send(b" ")
    c.wait_for("=> ok", 5)
    assert got == [b" "]
    with pytest.raises(ConsoleClosed, match=r"tcp://127\.0\.0\.1:\d+ ended"):
        c.wait_for("never", 5)
    c.close()
    th.join(5)
    srv.close()
    with pytest.raises(HilError, match="cannot connect"):
        TcpSource("127.0.0.1", port, connect_timeout=2)


def test_serial_device_on_a_pseudo_terminal(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        src = open_source(f"{os.ttyname(slave)}@9600")
        assert isinstance(src, TtySource) and src.description.endswith("at 9600 baud")
        attrs = termios.tcgetattr(slave)
        assert attrs[4] == attrs[5] == termios.B9600
        assert attrs[2] & termios.CSIZE == termios.CS8 and not attrs[2] & termios.PARENB
        assert not attrs[3] & termios.ECHO  # raw
        c = Console(tmp_path / "log")
        c.attach(src)
        os.write(master, b"pitstop-grub: booting slot a\r\n")
        c.wait_for("booting slot a", 5)
        c.send("root\n")
        assert os.read(master, 100) == b"root\n"
        c.close()
    finally:
        os.close(master)
        os.close(slave)
    with pytest.raises(HilError, match="baud rate 12345"):
        TtySource(Path("/dev/null"), 12345)
    with pytest.raises(HilError, match="cannot open the serial console"):
        TtySource(tmp_path / "missing")


def test_console_specs() -> None:
    with pytest.raises(HilError, match="tcp://HOST:PORT"):
        open_source("tcp://nowhere")
    with pytest.raises(HilError, match=r"/dev/DEVICE\[@BAUD\]"):
        open_source("/dev/ttyUSB0@fast")
    with pytest.raises(HilError, match="not found"):
        open_source("no-such-console-tool -b 115200")
    src = open_source("echo 'a b'")
    assert isinstance(src, ProcessSource) and src.argv == ["echo", "a b"]
    src.close()


def test_console_markers_become_timeline_events(tmp_path: Path) -> None:
    clock = Clock()
    c = Console(tmp_path / "log", clock=clock)
    tl = Timeline("dut", clock)
    tl.watch(c)
    seen: list[Line] = []
    c.subscribe(seen.append)
    c.attach(
        sh(
            "echo 'pitstop-grub: booting slot b'; echo '[    1.0] Linux version 6.1.0-28-amd64 (debian)'; "
            "echo 'Kernel panic - not syncing: Attempted to kill init!'; echo 'PITSTOP-BOOT-FAILED slot=b'; "
            "echo 'pitstop-grub: booting slot a'; echo 'PITSTOP-READY slot=a'; echo 'reboot: Power down'"
        )
    )
    c.wait_for("Power down", 5)
    c.close()
    kinds = [(e.kind, e.text) for e in tl.events]
    assert kinds == [
        ("grub", "GRUB: booting slot b"),
        ("kernel", "kernel 6.1.0-28-amd64 starting"),
        ("panic", "kernel panic: Kernel panic - not syncing: Attempted to kill init!"),
        ("boot-failed", "PITSTOP-BOOT-FAILED slot=b"),
        ("grub", "GRUB: booting slot a"),
        ("ready", "PITSTOP-READY slot=a"),
        ("poweroff", "kernel: power down"),
    ]
    assert all(e.source == "console" for e in tl.events)
    assert [e.t for e in tl.events] == [ln.t for ln in seen]
    assert tl.first("grub") == tl.events[0] and tl.last("grub") == tl.events[4] and len(tl.of("grub")) == 2
    assert tl.of("grub", after=tl.events[4].t) == []


@pytest.fixture
def bash_console(tmp_path: Path) -> Console:
    """An interactive bash on a pseudo-terminal: the device's autologin shell as the serial console shows it."""
    c = Console(tmp_path / "serial.log")
    c.attach(ProcessSource(["bash", "--norc", "--noprofile", "-i"]))
    return c


def test_serial_shell_output_and_status(bash_console: Console) -> None:
    shell = SerialShell(bash_console, ready_timeout=20)
    assert shell.run("echo out; echo err >&2; exit 3", 10) == (3, "out\nerr\n")
    assert shell.run("printf 'no newline'", 10) == (0, "no newline\n")
    # Quotes, comments, several lines: the command reaches sh -c as written.
    assert shell.run('for i in 1 2; do echo "$i\'"; done # a comment\necho last', 10) == (0, "1'\n2'\nlast\n")
    # Kernel messages on the console are not the command's output (unless asked for).
    res = shell.run("echo '[   12.345678] e1000: enp0s2 NIC Link is Down'; echo mine", 10)
    assert res.output == "mine\n"
    res = shell.run("echo '[   12.345678] e1000: enp0s2 NIC Link is Down'", 10, kernel_lines=True)
    assert res.output == "[   12.345678] e1000: enp0s2 NIC Link is Down\n"
    # It cannot eat what is typed next.
    assert shell.run("cat", 10) == (0, "")
    bash_console.close()


def test_serial_shell_timeouts_and_new_boots(bash_console: Console) -> None:
    shell = SerialShell(bash_console, ready_timeout=20)
    assert shell.run("true", 10).rc == 0
    alive = len(bash_console.matching(r"^@@hil-alive-\d+@@"))
    assert alive == 1
    with pytest.raises(ShellTimeout, match=r"`sleep 1` did not finish within 0\.3 s"):
        shell.run("sleep 1", 0.3)
    assert shell.run("echo after", 10) == (0, "after\n")  # the shell is looked for again first
    assert len(bash_console.matching(r"^@@hil-alive-\d+@@")) > alive
    # A boot seen on the console means a new login shell: nothing is typed before agetty's autologin line, then
    # the shell is looked for again.
    alive = len(bash_console.matching(r"^@@hil-alive-\d+@@"))
    shell.run("echo 'pitstop-grub: booting slot b'", 10)
    impatient = SerialShell(bash_console, ready_timeout=0.3)
    impatient._ready_at = 0
    with pytest.raises(ShellError, match=r"no autologin on the serial console within 0\.3 s"):
        impatient.run("true", 10)
    assert len(bash_console.matching(r"^@@hil-alive-\d+@@")) == alive  # nothing typed meanwhile
    bash_console.send("echo 'ipc-dut login: root (automatic login)'\n")
    shell.run("true", 10)
    assert len(bash_console.matching(r"^@@hil-alive-\d+@@")) == alive + 1
    bash_console.close()
