"""daemon/journal.py against a real datagram socket standing in for journald: what arrives is parsed as journald
parses the native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL), including entries passed as a sealed memfd."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitstop.daemon import journal


def parse_entry(data: bytes) -> dict[str, list[bytes]]:
    """journald's parser: `KEY=value\\n`, or `KEY\\n` + le64 length + value + `\\n`; a field may repeat."""
    out: dict[str, list[bytes]] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (n,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + n]
            assert data[nl + 9 + n : nl + 10 + n] == b"\n", "binary field not terminated by a newline"
            i = nl + 10 + n
        assert journal.FIELD_NAME_RE.fullmatch(key.decode()), key
        out.setdefault(key.decode(), []).append(value)
    return out


class FakeJournald:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)
        self.via_memfd = False

    def receive(self) -> dict[str, list[bytes]]:
        data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(struct.calcsize("i")))
        self.via_memfd = bool(ancdata)
        if ancdata:
            assert data == b""
            level, kind, fd_bytes = ancdata[0]
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            (fd,) = struct.unpack("i", fd_bytes[: struct.calcsize("i")])
            try:
                # journald maps only a sealed memfd (nobody can change it under it).
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
                assert seals & want == want
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return parse_entry(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journald() -> Iterator[FakeJournald]:
    with tempfile.TemporaryDirectory(prefix="jrn-", dir="/tmp") as d:
        j = FakeJournald(Path(d) / "socket")
        try:
            yield j
        finally:
            j.close()


@pytest.fixture
def logger(journald: FakeJournald) -> Iterator[logging.Logger]:
    log = logging.getLogger("pitstop.test.journal")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    handler = journal.JournalHandler(socket_path=journald.path)
    log.addHandler(handler)
    try:
        yield log
    finally:
        log.removeHandler(handler)
        handler.close()


def one(entry: dict[str, list[bytes]], key: str) -> str:
    assert len(entry[key]) == 1, entry[key]
    return entry[key][0].decode()


def test_fields_of_an_entry(journald: FakeJournald, logger: logging.Logger) -> None:
    logger.warning("slot %s failed its health gate", "b", extra=journal.fields(PITSTOP_SLOT="b", PITSTOP_TRIES=3))
    line = test_fields_of_an_entry.__code__.co_firstlineno + 1
    e = journald.receive()
    assert not journald.via_memfd
    assert one(e, "MESSAGE") == "slot b failed its health gate"
    assert one(e, "PRIORITY") == "4"
    assert one(e, "SYSLOG_IDENTIFIER") == "pitstop"
    assert one(e, "CODE_FILE") == __file__
    assert one(e, "CODE_LINE") == str(line)
    assert one(e, "CODE_FUNC") == "test_fields_of_an_entry"
    assert one(e, "LOGGER") == "pitstop.test.journal"
    assert one(e, "PITSTOP_SLOT") == "b"
    assert one(e, "PITSTOP_TRIES") == "3"
    assert "EXCEPTION_TEXT" not in e


@pytest.mark.parametrize(
    ("level", "pri"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2), (25, 6)],
)
def test_priorities(journald: FakeJournald, logger: logging.Logger, level: int, pri: int) -> None:
    logger.log(level, "x")
    assert one(journald.receive(), "PRIORITY") == str(pri)


def test_multi_line_message_is_binary_safe(journald: FakeJournald, logger: logging.Logger) -> None:
    text = "first line\nsecond = line\n\nfourth, after an empty one"
    logger.info(text)
    data, _ = journald.sock.recvfrom(1 << 16)
    assert b"MESSAGE\n" + struct.pack("<Q", len(text.encode())) + text.encode() + b"\n" in data
    assert one(parse_entry(data), "MESSAGE") == text


def test_exception_text(journald: FakeJournald, logger: logging.Logger) -> None:
    try:
        raise RuntimeError("engine build failed")
    except RuntimeError:
        logger.exception("loop text-det crashed")
    e = journald.receive()
    assert one(e, "PRIORITY") == "3"
    exc = one(e, "EXCEPTION_TEXT")
    assert exc.startswith("Traceback (most recent call last):") and exc.endswith("RuntimeError: engine build failed")
    # journalctl shows MESSAGE: the traceback is in it too.
    assert one(e, "MESSAGE") == "loop text-det crashed\n" + exc


def test_large_entry_goes_through_a_sealed_memfd(journald: FakeJournald, logger: logging.Logger) -> None:
    # Larger than any datagram the kernel takes: the handler asks for an 8 MiB send buffer, capped at wmem_max.
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    size = 2 * min(8 << 20, wmem_max) + (64 << 10)
    text = ("0123456789abcdef" * (size // 16 + 1))[:size]
    logger.info(text, extra=journal.fields(PITSTOP_BIG="yes"))
    e = journald.receive()
    assert journald.via_memfd
    assert one(e, "MESSAGE") == text
    assert one(e, "PITSTOP_BIG") == "yes"
    # The handler keeps working with ordinary entries afterwards.
    logger.info("small again")
    assert one(journald.receive(), "MESSAGE") == "small again"
    assert not journald.via_memfd


def test_field_names_checked_at_the_call_site() -> None:
    assert journal.fields(PITSTOP_SLOT="a", X1="b") == {"fields": {"PITSTOP_SLOT": "a", "X1": "b"}}
    for bad in ["pitstop_slot", "_PID", "1ST", "", "A-B", "A" * 65, "MESSAGE", "PRIORITY"]:
        with pytest.raises(ValueError, match="journal field name"):
            journal.fields(**{bad: "x"})


def test_invalid_field_names_are_dropped_not_the_message(
    journald: FakeJournald, logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    logger.info("kept", extra={"fields": {"lower": "x", "_TRUSTED": "y", "MESSAGE": "z", "GOOD": "g"}})
    e = journald.receive()
    assert one(e, "MESSAGE") == "kept" and one(e, "GOOD") == "g"
    assert not {"lower", "_TRUSTED"} & e.keys()
    assert "dropped invalid field name(s) 'lower', '_TRUSTED', 'MESSAGE'" in capsys.readouterr().err


def test_unreachable_journal_falls_back_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("pitstop.test.journal.fallback")
    log.propagate = False
    handler = journal.JournalHandler(socket_path=tmp_path / "no-journald")
    log.addHandler(handler)
    try:
        log.error("still seen")
    finally:
        log.removeHandler(handler)
        handler.close()
    assert "still seen" in capsys.readouterr().err


def test_encode_is_the_native_protocol() -> None:
    assert journal.encode({"A": "1", "B": b"x\ny"}) == b"A=1\nB\n" + struct.pack("<Q", 3) + b"x\ny\n"


# --- setup_logging -------------------------------------------------------------------------------------------


def test_setup_logging_uses_the_journal_under_systemd(journald: FakeJournald) -> None:
    log = logging.getLogger("pitstop.test.setup")
    log.propagate = False
    try:
        h = journal.setup_logging("debug", socket_path=journald.path, environ={"INVOCATION_ID": "abc"}, logger=log)
        assert isinstance(h, journal.JournalHandler) and log.level == logging.DEBUG
        log.debug("via the journal")
        assert one(journald.receive(), "MESSAGE") == "via the journal"
        # Again (a reload with a new level): the handler is replaced, not added.
        h2 = journal.setup_logging("warning", socket_path=journald.path, environ={"INVOCATION_ID": "a"}, logger=log)
        assert log.handlers == [h2] and log.level == logging.WARNING
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()


def test_setup_logging_outside_systemd_or_without_socket_uses_stderr(journald: FakeJournald, tmp_path: Path) -> None:
    log = logging.getLogger("pitstop.test.setup2")
    log.propagate = False
    try:
        h = journal.setup_logging("info", socket_path=journald.path, environ={}, logger=log)
        assert type(h) is logging.StreamHandler
        h = journal.setup_logging("info", socket_path=tmp_path / "none", environ={"INVOCATION_ID": "a"}, logger=log)
        assert type(h) is logging.StreamHandler
        assert len(log.handlers) == 1
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()


def test_setup_logging_replaces_the_cli_stderr_handler(journald: FakeJournald) -> None:
    """`pitstop` sets up plain stderr logging (basicConfig) before `pitstop daemon` sets up its own: each record
    must be written once, not once per handler."""
    log = logging.getLogger("pitstop.test.setup3")
    log.propagate = False
    cli = logging.StreamHandler(sys.stderr)
    kept = logging.StreamHandler(io.StringIO())  # someone else's handler stays
    log.addHandler(cli)
    log.addHandler(kept)
    try:
        h = journal.setup_logging("info", socket_path=journald.path, environ={"INVOCATION_ID": "abc"}, logger=log)
        assert log.handlers == [kept, h]
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()


def test_stderr_journal_stream_gets_priority_prefixes(tmp_path: Path) -> None:
    # JOURNAL_STREAM names the device and inode of the stream systemd connected; here a file stands in for it.
    with (tmp_path / "stream").open("w+") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal.stderr_is_journal(env, f)
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": "1:2"}, f)
        assert not journal.stderr_is_journal({}, f)
    fmt = journal._StreamFormatter(prefix_priority=True)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "two\nlines", None, None)
    assert fmt.format(record) == "<3>two\n<3>lines"
    plain = journal._StreamFormatter(prefix_priority=False).format(record)
    assert plain.endswith("ERROR x: two\nlines")
