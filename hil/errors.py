"""Typed errors of the HIL rig. The rig has no CLI of its own (pytest is its front end); the exit code is only
there to stay in pitstop's numbering (docs/hil.md)."""

from __future__ import annotations

from pitstop.errors import PitstopError


class HilError(PitstopError):
    """The rig cannot do what a scenario asked: a target not flashed, a hook not configured, a device gone."""

    exit_code = 70


class ConsoleTimeout(HilError, TimeoutError):
    """Nothing on the serial console matched within the time given (or the device's hard time limit). The message
    carries the console's tail and its log file."""


class ConsoleClosed(HilError):
    """The console's byte stream ended (QEMU exited, the serial command died) before what was waited for came."""


class ShellError(HilError):
    """A command could not be run on the device: SSH could not connect, the serial shell did not answer."""


class ShellTimeout(ShellError, TimeoutError):
    """A command on the device did not finish within its timeout."""


class PowerError(HilError):
    """A power-control hook failed: its command exited non-zero, the PDU answered an error, the relay could not
    be written."""


class QmpError(HilError):
    """QEMU's monitor (QMP) refused a command or could not be reached. `error_class` is QMP's class
    (`DeviceNotFound`, `GenericError`, ...) when QEMU answered with an error."""

    def __init__(self, message: str, *, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class
