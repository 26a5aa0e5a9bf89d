"""The root of pitstop's typed errors; each area subclasses it with its own exit code."""

from __future__ import annotations


class PitstopError(Exception):
    """An expected failure: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(PitstopError, ValueError):
    """The caller asked for something that cannot be done as asked (bad flag combination, missing file)."""

    exit_code = 2


class CommandError(PitstopError):
    """An external command could not be run or failed."""

    exit_code = 3

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class InputError(PitstopError):
    """A file or directory named by the caller cannot be read or written."""

    exit_code = 4
