"""pitstop.runner (the one way external commands are run) and pitstop.atomic (crash-safe writes)."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from pitstop import runner
from pitstop.atomic import atomic_dir, atomic_file, atomic_write
from pitstop.errors import CommandError

PY = sys.executable


def _env_of_child(**kw: object) -> dict[str, str]:
    r = runner.run(["env", "-0"], **kw)  # type: ignore[arg-type]
    return dict(item.split("=", 1) for item in r.text.split("\0") if item)


def _gone(pid: int, within: float = 5.0) -> bool:
    """True once `pid` no longer exists (or is a zombie nobody will reap, which counts as alive)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True  # dead; its parent (not us) has yet to reap it
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# --- run ----------------------------------------------------------------------------------------------


def test_captures_stdout_and_stderr() -> None:
    r = runner.run(["sh", "-c", "printf 'out\\n'; printf 'err\\n' >&2"])
    assert r.returncode == 0
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert r.text == "out\n"


def test_passes_input_bytes_exactly() -> None:
    data = bytes(range(256)) * 1000 + b"\0tail"
    r = runner.run(["cat"], input=data)
    assert r.stdout == data


def test_stdin_is_devnull_without_input() -> None:
    # A command that reads stdin must see EOF at once, not hang on the test's terminal.
    r = runner.run(["cat"], timeout=10)
    assert r.stdout == b""


def test_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOO", "must-not-leak")
    monkeypatch.setenv("LANG", "de_DE.ISO-8859-1")
    monkeypatch.setenv("LC_ALL", "de_DE.ISO-8859-1")
    monkeypatch.setenv("HOME", "/home/tester")
    env = _env_of_child()
    assert "FOO" not in env
    assert "LANG" not in env
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["HOME"] == "/home/tester"
    assert "PATH" in env
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "SOURCE_DATE_EPOCH", "TERM", "LC_ALL", "PWD", "SHLVL", "_"}


def test_extra_env_is_added() -> None:
    env = _env_of_child(env={"PITSTOP_X": "1", "LC_ALL": "C"})
    assert env["PITSTOP_X"] == "1"
    assert env["LC_ALL"] == "C"  # an explicit value wins over the default


def test_default_path_when_caller_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH")
    r = runner.run(["/usr/bin/env"])
    env = dict(line.split("=", 1) for line in r.text.splitlines() if "=" in line)
    assert "/usr/bin" in env["PATH"].split(":")


def test_cwd(tmp_path: Path) -> None:
    r = runner.run(["pwd"], cwd=tmp_path)
    assert Path(r.text.strip()).resolve() == tmp_path.resolve()


def test_missing_command() -> None:
    with pytest.raises(CommandError) as ei:
        runner.run(["pitstop-no-such-command-xyz", "--help"])
    assert "command not found" in ei.value.message
    assert "pitstop-no-such-command-xyz" in ei.value.message
    assert ei.value.returncode == 127


def test_not_executable(tmp_path: Path) -> None:
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    f.chmod(0o644)  # no x bit at all: not even root may execute it
    with pytest.raises(CommandError) as ei:
        runner.run([f])
    assert ei.value.returncode == 126
    assert "permission denied" in ei.value.message


def test_failing_command_names_status_and_last_stderr_line() -> None:
    script = "echo 'first problem' >&2; echo 'the real reason' >&2; exit 3"
    with pytest.raises(CommandError) as ei:
        runner.run(["sh", "-c", script])
    e = ei.value
    assert e.returncode == 3
    assert "exit status 3" in e.message
    assert e.message.endswith("the real reason")
    assert "first problem" not in e.message
    assert "first problem" in e.stderr and "the real reason" in e.stderr
    assert "\n" not in e.message


def test_failing_command_without_stderr() -> None:
    with pytest.raises(CommandError) as ei:
        runner.run(["false"])
    assert ei.value.message == "false failed: exit status 1"
    assert ei.value.returncode == 1


def test_exit_127_from_child_reads_as_not_found() -> None:
    with pytest.raises(CommandError) as ei:
        runner.run(["sh", "-c", "exit 127"])
    assert "command not found (exit 127)" in ei.value.message
    assert ei.value.returncode == 127


def test_killed_by_signal() -> None:
    with pytest.raises(CommandError) as ei:
        runner.run(["sh", "-c", "kill -TERM $$"])
    assert "killed by SIGTERM" in ei.value.message
    assert ei.value.returncode == -15


def test_check_false_returns_failure() -> None:
    r = runner.run(["sh", "-c", "echo partial; exit 4"], check=False)
    assert r.returncode == 4
    assert r.stdout == b"partial\n"


def test_timeout_kills_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(CommandError) as ei:
        runner.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], timeout=0.5)
    assert time.monotonic() - start < 10
    assert "timed out after 0.5 s" in ei.value.message
    pid = int(pidfile.read_text())
    assert _gone(pid), f"child {pid} is still running"
    # Reaped, not a zombie of ours.
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_timeout_kills_grandchildren(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandError):
        runner.run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.5)
    pid = int(pidfile.read_text())
    try:
        assert _gone(pid, within=1.0), f"grandchild {pid} survived the timeout"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)  # only the sleep this test started


# --- atomic -------------------------------------------------------------------------------------------


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_atomic_write_creates_with_mode(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    atomic_write(p, b"hello", 0o600)
    assert p.read_bytes() == b"hello"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    atomic_write(p, b"again")
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert _temps(tmp_path) == []


def test_atomic_write_replaces_by_rename(tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    p.write_bytes(b"old content")
    old_inode = p.stat().st_ino
    with open(p, "rb") as reader:
        atomic_write(p, b"new")
        # A reader of the old file still sees the complete old content: it was never truncated in place.
        assert reader.read() == b"old content"
    assert p.read_bytes() == b"new"
    assert p.stat().st_ino != old_inode
    assert _temps(tmp_path) == []


def test_atomic_file_error_leaves_old_content_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    p.write_bytes(b"old")
    seen_tmp: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), atomic_file(p) as f:
        f.write(b"partial new content")
        seen_tmp.extend(_temps(tmp_path))
        raise RuntimeError("boom")
    assert len(seen_tmp) == 1 and seen_tmp[0].startswith(".f.txt.")  # the temporary did exist...
    assert p.read_bytes() == b"old"
    assert _temps(tmp_path) == []  # ...and is gone


def test_atomic_file_error_on_new_path_creates_nothing(tmp_path: Path) -> None:
    p = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt), atomic_file(p) as f:
        f.write(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir(tmp_path: Path) -> None:
    d = tmp_path / "out"
    with atomic_dir(d) as tmp:
        assert not d.exists()
        (tmp / "a").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("b")
        os.symlink("a", tmp / "link")
    assert (d / "sub" / "b").read_text() == "b"
    assert os.readlink(d / "link") == "a"
    assert _temps(tmp_path) == []

    d2 = tmp_path / "out2"
    with pytest.raises(ValueError, match="nope"), atomic_dir(d2) as tmp:
        (tmp / "a").write_text("a")
        raise ValueError("nope")
    assert not d2.exists()
    assert _temps(tmp_path) == []
