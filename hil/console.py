"""A device's serial console: a byte stream cut into timestamped lines, regex waits, typing, a log on disk.

The stream comes from a `ByteSource`:

- `PipeSource`: a process the caller owns (QEMU's `-serial mon:stdio`);
- `ProcessSource`: a command that bridges a serial port to its stdio (`picocom -q -b 115200 /dev/ttyUSB0`,
  `socat - /dev/ttyUSB0,b115200,raw`), run on a pseudo-terminal so that tools which insist on one work;
- `TtySource`: a serial device opened directly (`/dev/ttyUSB0@115200`): raw, 8N1, no flow control;
- `TcpSource`: a TCP serial server (ser2net in raw mode, a console server).

`open_source(spec)` makes one from a string (`tcp://host:port`, `/dev/...[@baud]`, else a command line).

A `Console` outlives its sources: a QEMU power cut ends the stream, the next power-on attaches a new one, and
lines, marks and the log carry on. While nothing is attached, waits fail at once (`ConsoleClosed`) rather than
wait for a device that is off.

Long-running stream processes are the documented exception to `pitstop.runner.run` (as QEMU in tests/vm): they
get the same treatment (own process group, clean environment, killed and reaped when the console lets go).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import termios
import threading
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, TextIO

from pitstop.hil.errors import ConsoleClosed, ConsoleTimeout, HilError
from pitstop.hil.timeline import Clock
from pitstop.runner import clean_env

log = logging.getLogger("pitstop.hil.console")

# CSI sequences (firmware and GRUB position the cursor and set colours, OVMF uses private modes like ESC[=3h),
# charset selection, keypad modes.
_ANSI = re.compile(rb"\x1b(\[[0-9;?=]*[ -/]*[@-~]|[()][A-Z0-9]|[=>])")
_POLL = 0.2  # how often a reader looks up from its stream to see whether it was told to stop
_MAX_PARTIAL = 64 << 10  # a stream that never sends a newline still becomes lines


def clean(raw: bytes) -> str:
    """A console line as text: escape sequences, carriage returns and NULs dropped, bad UTF-8 replaced."""
    return _ANSI.sub(b"", raw).replace(b"\r", b"").replace(b"\x00", b"").decode("utf-8", "replace")


@dataclass(frozen=True)
class Line:
    t: float  # seconds on the console's clock (the run's, for the rig)
    text: str


@dataclass(frozen=True)
class Hit:
    """What `wait_for` found: the line, its index (`start=` for the next wait: `hit.index + 1`), the match."""

    index: int
    line: Line
    match: re.Match[str]

    @property
    def t(self) -> float:
        return self.line.t

    @property
    def text(self) -> str:
        return self.line.text

    def __getitem__(self, group: int | str) -> str | None:
        return self.match[group]


class ByteSource(Protocol):
    """A console's byte stream. `read` blocks at most `timeout` s: None when nothing came, b"" at the end of the
    stream. The console calls `close` only after its reader has stopped reading."""

    description: str

    def read(self, timeout: float) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def _read_fd(fd: int, timeout: float) -> bytes | None:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: a pseudo-terminal whose other side is gone
        return b""


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except OSError as e:
            raise ConsoleClosed(f"cannot write to the console: {e}") from None
        view = view[n:]


class PipeSource:
    """The pipes of a process someone else owns (QEMU's stdio): closing closes the pipes, not the process."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes] | None, description: str) -> None:
        self._reader = reader
        self._writer = writer
        self.description = description

    def read(self, timeout: float) -> bytes | None:
        return _read_fd(self._reader.fileno(), timeout)

    def write(self, data: bytes) -> None:
        if self._writer is None:
            raise ConsoleClosed(f"{self.description}: this console takes no input")
        try:
            self._writer.write(data)
            self._writer.flush()
        except (BrokenPipeError, ValueError) as e:  # ValueError: written after the pipe was closed
            raise ConsoleClosed(f"{self.description}: {e}") from None

    def close(self) -> None:
        for f in (self._writer, self._reader):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


class ProcessSource:
    """A command whose stdio is the serial line (picocom, socat, a vendor's console tool), on a raw
    pseudo-terminal: picocom refuses to run without one, and raw mode passes every byte as it is."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        if not argv:
            raise HilError("an empty console command")
        self.argv = list(argv)
        self.description = shlex.join(self.argv)
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self.proc = subprocess.Popen(
                self.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=clean_env(env),
                start_new_session=True,
            )
        except FileNotFoundError:
            os.close(master)
            raise HilError(f"console command not found: {self.argv[0]}") from None
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._fd = master

    def read(self, timeout: float) -> bytes | None:
        return _read_fd(self._fd, timeout)

    def write(self, data: bytes) -> None:
        _write_fd(self._fd, data)

    def kill(self) -> None:
        """SIGKILL to the command's process group at once (the console still has to be detached)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        stop_process_group(self.proc)
        with contextlib.suppress(OSError):
            os.close(self._fd)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 3.0) -> int:
    """SIGHUP and SIGTERM to the process group (the line hung up: what ends a terminal program, an interactive
    shell included, which ignores SIGTERM), SIGKILL after `grace` s; reaped either way. Returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGHUP)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


BAUD_RATES = {int(name[1:]): getattr(termios, name) for name in dir(termios) if re.fullmatch(r"B\d+", name)}


class TtySource:
    """A serial device opened here: raw, 8N1, no flow control, at `baud`."""

    def __init__(self, path: Path, baud: int = 115200) -> None:
        if baud not in BAUD_RATES:
            raise HilError(
                f"{path}: baud rate {baud} is not one termios knows ({', '.join(map(str, sorted(BAUD_RATES)))})"
            )
        self.description = f"{path} at {baud} baud"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise HilError(f"cannot open the serial console {path}: {e.strerror}") from None
        try:
            tty.setraw(fd)
            attrs = termios.tcgetattr(fd)
            speed = BAUD_RATES[baud]
            attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS)) | (
                termios.CS8 | termios.CLOCAL | termios.CREAD
            )
            attrs[0] &= ~(termios.IXON | termios.IXOFF | termios.IXANY)
            attrs[4] = attrs[5] = speed
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except (OSError, termios.error) as e:
            os.close(fd)
            raise HilError(f"{path} is not a usable serial device: {e}") from None
        self._fd = fd

    def read(self, timeout: float) -> bytes | None:
        return _read_fd(self._fd, timeout)

    def write(self, data: bytes) -> None:
        _write_fd(self._fd, data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class TcpSource:
    """A TCP serial server in raw mode (ser2net `accepter: tcp,PORT` without telnet, a console server's raw
    port): the bytes of the serial line, both ways."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 10.0) -> None:
        self.description = f"tcp://{host}:{port}"
        try:
            self._sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise HilError(f"cannot connect to the console server {self.description}: {e}") from None
        self._sock.settimeout(None)

    def read(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return None
        try:
            return self._sock.recv(65536)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise ConsoleClosed(f"{self.description}: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def open_source(spec: str) -> ByteSource:
    """`tcp://HOST:PORT`, a serial device `/dev/...` with an optional `@BAUD` (default 115200), else a command
    line run on a pseudo-terminal (`picocom -q -b 115200 /dev/ttyUSB0`)."""
    spec = spec.strip()
    if spec.startswith("tcp://"):
        hostport = spec.removeprefix("tcp://").rstrip("/")
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise HilError(f"console {spec!r}: tcp://HOST:PORT")
        return TcpSource(host.strip("[]"), int(port))
    if spec.startswith("/dev/"):
        path, _, baud = spec.partition("@")
        if baud and not baud.isdigit():
            raise HilError(f"console {spec!r}: /dev/DEVICE[@BAUD]")
        return TtySource(Path(path), int(baud) if baud else 115200)
    argv = shlex.split(spec)
    if not argv:
        raise HilError("an empty console specification")
    return ProcessSource(argv)


class Console:
    """Lines from the attached source, each stamped with the clock's time when its newline arrived.

    `wait_for(regex, timeout, start=)` returns the first matching line at index >= start; `mark()` is the index
    the next line will get, so `wait_for(..., start=console.mark())` sees only what comes after. No wait runs past
    `deadline` (a `time.monotonic()` value: the device's hard time limit).
    """

    def __init__(
        self,
        log_path: Path | None = None,
        *,
        name: str = "console",
        clock: Clock | None = None,
        deadline: float | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.clock = clock or Clock()
        self.deadline = deadline
        self._lines: list[Line] = []
        self._partial = b""
        self._cond = threading.Condition()
        self._source: ByteSource | None = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._attach_lock = threading.RLock()
        self._ended = True
        self._end_reason = "no console is attached"
        self._subscribers: list[Callable[[Line], None]] = []
        self._log: TextIO | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_path.open("a", encoding="utf-8")

    # --- the stream --------------------------------------------------------------------------------------------

    def attach(self, source: ByteSource) -> None:
        """Read from `source` from now on (the previous one, if any, is let go first)."""
        with self._attach_lock:
            self.detach()
            stop = threading.Event()
            with self._cond:
                self._source = source
                self._stop = stop
                self._ended = False
            self.note(f"attached: {source.description}")
            self._reader = threading.Thread(
                target=self._read, args=(source, stop), name=f"console-{self.name}", daemon=True
            )
            self._reader.start()

    def detach(self) -> None:
        """Stop reading and close the source. Lines read so far stay."""
        # A target's time limit may detach from its timer thread while the scenario attaches a new source.
        with self._attach_lock:
            source, reader = self._source, self._reader
            if source is None:
                return
            self._stop.set()
            if reader is not None:
                reader.join(10)
            source.close()
            with self._cond:
                self._source = None
                self._reader = None
                if not self._ended:
                    self._ended = True
                    self._end_reason = "the console was detached"
                self._cond.notify_all()

    @property
    def attached(self) -> bool:
        with self._cond:
            return self._source is not None and not self._ended

    def close(self) -> None:
        self.detach()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, source: ByteSource, stop: threading.Event) -> None:
        ended = False
        while not stop.is_set():
            try:
                chunk = source.read(_POLL)
            except Exception as e:  # a reader thread must never die silently
                log.warning("%s: reading %s failed: %s", self.name, source.description, e)
                chunk = b""
            if chunk is None:
                continue
            if not chunk:
                ended = True
                break
            self._feed(chunk)
        new: list[Line] = []
        with self._cond:
            if self._partial:
                new.append(self._add(self._partial))
                self._partial = b""
            if self._source is source:
                self._ended = True
                self._end_reason = f"{source.description} ended" if ended else "the console was detached"
            self._cond.notify_all()
        self._publish(new)
        if ended:
            self.note(f"ended: {source.description}")

    def _feed(self, chunk: bytes) -> None:
        with self._cond:
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            if len(self._partial) > _MAX_PARTIAL:
                complete.append(self._partial)
                self._partial = b""
            new = [self._add(raw) for raw in complete]
            self._cond.notify_all()
        self._publish(new)

    def _add(self, raw: bytes) -> Line:
        line = Line(round(self.clock.now(), 3), clean(raw))
        self._lines.append(line)
        if self._log is not None:
            self._log.write(f"[{line.t:8.2f}] {line.text}\n")
            self._log.flush()
        return line

    def _publish(self, lines: list[Line]) -> None:
        for line in lines:
            for fn in list(self._subscribers):
                try:
                    fn(line)
                except Exception:
                    log.exception("%s: a console subscriber failed on %r", self.name, line.text)

    def subscribe(self, fn: Callable[[Line], None]) -> None:
        """Call `fn(line)` for every line from now on (on the reader thread: keep it short)."""
        self._subscribers.append(fn)

    # --- reading -----------------------------------------------------------------------------------------------

    @property
    def lines(self) -> list[Line]:
        """Every line so far (the live list: read it, never change it)."""
        return self._lines

    def mark(self) -> int:
        with self._cond:
            return len(self._lines)

    def text(self, start: int = 0, end: int | None = None) -> str:
        with self._cond:
            return "".join(ln.text + "\n" for ln in self._lines[start:end])

    def matching(self, pattern: str | re.Pattern[str], *, start: int = 0) -> list[Line]:
        rx = re.compile(pattern)
        with self._cond:
            return [ln for ln in self._lines[start:] if rx.search(ln.text)]

    def tail(self, n: int = 40) -> str:
        with self._cond:
            text = [f"[{ln.t:8.2f}] {ln.text}" for ln in self._lines[-n:]]
            if self._partial:
                text.append(f"[ partial] {clean(self._partial)}")
        return "\n".join(text)

    def describe(self, what: str) -> str:
        where = f"; log {self.log_path}" if self.log_path else ""
        return f"{self.name}: {what} (t={self.clock.now():.1f} s{where}); console tail:\n{self.tail()}"

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, *, start: int = 0) -> Hit:
        """The first line at index >= `start` in which `pattern` is found. ConsoleTimeout after `timeout` s (or
        at the deadline), ConsoleClosed when the stream ends first (or nothing is attached)."""
        rx = re.compile(pattern)
        now = time.monotonic()
        deadline = now + timeout
        capped = self.deadline is not None and self.deadline < deadline
        if capped:
            assert self.deadline is not None
            deadline = self.deadline
        i = start
        with self._cond:
            while True:
                while i < len(self._lines):
                    m = rx.search(self._lines[i].text)
                    if m is not None:
                        return Hit(i, self._lines[i], m)
                    i += 1
                if self._ended:
                    reason = self._end_reason
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = ""
                    break
                self._cond.wait(left)
        if reason:
            raise ConsoleClosed(self.describe(f"{reason} before /{rx.pattern}/ came"))
        limit = " (the device's time limit)" if capped else ""
        raise ConsoleTimeout(self.describe(f"no /{rx.pattern}/ within {timeout:g} s{limit}"))

    # --- writing -----------------------------------------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Type on the console."""
        with self._cond:
            source = self._source if not self._ended else None
            reason = self._end_reason
        if source is None:
            raise ConsoleClosed(f"{self.name}: cannot type: {reason}")
        source.write(data.encode() if isinstance(data, str) else data)

    def note(self, text: str) -> None:
        """A remark of the rig's in the log (not a line of the device's): `[  t] ### text`."""
        if self._log is not None:
            with self._cond:
                self._log.write(f"[{self.clock.now():8.2f}] ### {text}\n")
                self._log.flush()
