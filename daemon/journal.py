"""Logging to the systemd journal in its native protocol, with structured fields.

One datagram per entry to /run/systemd/journal/socket: `KEY=value` lines, or `KEY\\n<le64 length><bytes>\\n` for
a value holding a newline (binary-safe). An entry too large for a datagram goes as a sealed memfd passed with
SCM_RIGHTS, as sd_journal_sendv() does. Why not systemd-python: a C extension, needing a compiler and
libsystemd-dev in the image, for a documented protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL).

Fields of every entry: MESSAGE (with the traceback, as `journalctl` shows it), PRIORITY, SYSLOG_IDENTIFIER,
CODE_FILE, CODE_LINE, CODE_FUNC, LOGGER, EXCEPTION_TEXT when there is one, and the caller's own:

    log.info("slot b installed", extra=journal.fields(PITSTOP_SLOT="b", PITSTOP_VERSION="1.2.0"))

`journalctl PITSTOP_SLOT=b` then finds it. Field names follow journald's rules (`FIELD_NAME_RE`).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

DEFAULT_SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "pitstop"
# journald's journal_field_valid(): upper-case letters, digits and '_', not starting with a digit, at most 64;
# a leading '_' marks trusted fields only journald itself may set.
FIELD_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Set by the handler; a caller's field of the same name would make a second value, not replace it.
RESERVED = frozenset(
    {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "LOGGER", "EXCEPTION_TEXT"}
)
_SNDBUF = 8 << 20  # as sd_journal_send: large entries go in one datagram where the kernel allows
_SEND_TIMEOUT_S = 1.0  # a stalled journald must not stall the daemon's event loop for long
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_FORMATTER = logging.Formatter()


def priority(levelno: int) -> int:
    """The syslog priority (0 emerg … 7 debug) of a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def check_field_name(name: str) -> str:
    """`name` if journald accepts it as a caller's field and the handler does not set it itself; else ValueError."""
    if not FIELD_NAME_RE.fullmatch(name):
        raise ValueError(
            f"journal field name {name!r}: 1-64 upper-case letters, digits and '_', starting with a letter"
        )
    if name in RESERVED:
        raise ValueError(f"journal field name {name!r} is set by the handler itself")
    return name


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`extra=` for a logging call carrying structured journal fields; the names are checked here, at the call
    site, so that a bad one fails in tests instead of being dropped in production."""
    for name in values:
        check_field_name(name)
    return {"fields": dict(values)}


def _encode_field(name: str, value: object) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def encode(entry: Mapping[str, object]) -> bytes:
    """One journal entry in the native protocol."""
    return b"".join(_encode_field(k, v) for k, v in entry.items())


class JournalHandler(logging.Handler):
    """A logging handler writing native journal entries to `socket_path`.

    Failures never lose a message: if journald cannot be reached the entry goes to stderr (which, under systemd,
    is usually a journal stream too).
    """

    def __init__(
        self, level: int = logging.NOTSET, *, socket_path: Path = DEFAULT_SOCKET, identifier: str = IDENTIFIER
    ) -> None:
        super().__init__(level)
        self.socket_path = Path(socket_path)
        self.identifier = identifier
        self._sock: socket.socket | None = None

    def entry(self, record: logging.LogRecord) -> dict[str, object]:
        """The fields of the journal entry for `record`."""
        out: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
            "LOGGER": record.name,
        }
        if record.exc_info and record.exc_info[0] is not None:
            out["EXCEPTION_TEXT"] = record.exc_text or _FORMATTER.formatException(record.exc_info)
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            bad = []
            for name, value in extra.items():
                try:
                    out[check_field_name(str(name))] = value
                except ValueError:
                    bad.append(str(name))
            if bad:
                # Keep the message; say once on stderr what was dropped (journal.fields() catches this earlier).
                sys.stderr.write(f"pitstop: journal: dropped invalid field name(s) {', '.join(map(repr, bad))}\n")
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = self.entry(record)
            data = encode(entry)
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(data)
        except OSError:
            self._fallback(entry)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            sock.settimeout(_SEND_TIMEOUT_S)
            self._sock = sock
        return self._sock

    def _send(self, data: bytes) -> None:
        sock = self._socket()
        address = str(self.socket_path)
        try:
            sock.sendto(data, address)
            return
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        # Too large for a datagram: hand journald a sealed memfd holding the entry (it maps it, no copy).
        fd = os.memfd_create("journal-data", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, address)
        finally:
            os.close(fd)

    def _fallback(self, entry: Mapping[str, object]) -> None:
        lines = str(entry["MESSAGE"]).splitlines() or [""]
        if stderr_is_journal():  # journald reads a `<N>` prefix on each line as its priority
            lines = [f"<{entry['PRIORITY']}>{line}" for line in lines]
        try:
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # nowhere left to write to

    def close(self) -> None:
        self.acquire()
        try:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        finally:
            self.release()
        super().close()


# --- choosing the handler -----------------------------------------------------------------------------------


def stderr_is_journal(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when stderr is the journal stream systemd connected (JOURNAL_STREAM names its device and inode)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """Started by systemd as a service: INVOCATION_ID is set, or stderr is a journal stream."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID")) or stderr_is_journal(env)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


class _StreamFormatter(logging.Formatter):
    """Plain lines for a terminal; `<N>` syslog priority prefixes where stderr is a journal stream (journald
    reads them: SyslogLevelPrefix=yes is the default), so levels survive even without the native socket."""

    def __init__(self, prefix_priority: bool) -> None:
        fmt = "%(message)s" if prefix_priority else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.prefix_priority = prefix_priority

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.prefix_priority:
            pri = priority(record.levelno)
            return "\n".join(f"<{pri}>{line}" for line in text.splitlines())
        return text


LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def setup_logging(
    level: int | str = logging.INFO,
    *,
    socket_path: Path = DEFAULT_SOCKET,
    environ: Mapping[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> logging.Handler:
    """Send `logger`'s records (the root logger by default) to the journal when running under systemd and its
    socket exists, else to stderr. Calling it again (SIGHUP: a new log level) replaces the handler it installed
    before, and the CLI's stderr handler. Returns the handler."""
    target = logger or logging.getLogger()
    lvl = LEVELS[level.lower()] if isinstance(level, str) else level
    handler: logging.Handler
    if under_systemd(environ) and _is_socket(socket_path):
        handler = JournalHandler(socket_path=socket_path)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StreamFormatter(prefix_priority=stderr_is_journal(environ)))
    handler.set_name("pitstop")  # how the next call finds it
    for old in list(target.handlers):
        # Ours from an earlier call, and the CLI's plain stderr handler (logging.basicConfig): with it every record
        # would be written twice, under systemd once to the journal and once more through stderr.
        plain_stderr = type(old) is logging.StreamHandler and old.stream in (sys.stderr, sys.__stderr__)
        if old.get_name() == "pitstop" or plain_stderr:
            target.removeHandler(old)
            if old.get_name() == "pitstop":
                old.close()
    target.addHandler(handler)
    target.setLevel(lvl)
    return handler
