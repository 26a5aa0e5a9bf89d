"""The one wrapper through which pitstop runs every external command.

Commands run with a minimal, predictable environment and stdin from /dev/null unless input is given;
each is logged as `+ cmd` at debug level; a child is killed and reaped if the caller is interrupted;
failures become `CommandError` with a readable message instead of a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pitstop.errors import CommandError

log = logging.getLogger("pitstop.run")

# Variables passed through from the caller's environment; everything else is dropped so that
# locale, proxies or a user's configuration cannot change what a tool prints or does.
_PASSTHROUGH = ("PATH", "HOME", "TMPDIR", "SOURCE_DATE_EPOCH", "TERM")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env["LC_ALL"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def _describe(returncode: int) -> str:
    if returncode == 127:
        return "command not found (exit 127)"
    if returncode == 126:
        return "command not executable (exit 126)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # not a group leader (interactive) or already gone
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
    interactive: bool = False,
) -> Result:
    """Run `cmd` and return its result; raise `CommandError` if it cannot start, times out or fails.
    `interactive`: the command gets the caller's terminal (stdin, stdout, stderr) and its signals, as a
    console does (`pitstop image boot`)."""
    argv = [os.fspath(a) for a in cmd]
    log.debug("+ %s", shlex.join(argv))
    pipe = subprocess.PIPE if capture and not interactive else None
    stdin = None if interactive else subprocess.PIPE if input is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=pipe,
            stderr=pipe,
            env=clean_env(env),
            cwd=cwd,
            # Its own process group, so a timeout or interrupt ends the whole tree it started; an interactive
            # command stays in the terminal's.
            start_new_session=not interactive,
        )
    except FileNotFoundError as e:
        raise CommandError(f"{argv[0]}: command not found", returncode=127) from e
    except PermissionError as e:
        raise CommandError(f"{argv[0]}: permission denied", returncode=126) from e
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _kill_group(proc)
        raise CommandError(f"{shlex.join(argv)}: timed out after {timeout} s") from e
    except BaseException:
        # Never leave an orphan behind when the caller is interrupted.
        _kill_group(proc)
        raise
    out = out or b""
    err = err or b""
    if check and proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        msg = f"{argv[0]} failed: {_describe(proc.returncode)}"
        if tail:
            msg += f": {tail.splitlines()[-1] if tail else ''}"
        log.debug("stderr of %s:\n%s", argv[0], tail)
        raise CommandError(msg, returncode=proc.returncode, stderr=tail)
    return Result(proc.returncode, out, err)
