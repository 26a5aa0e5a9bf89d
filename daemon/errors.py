"""Typed errors of the daemon area, each with its own exit code (docs/cli.md lists them)."""

from __future__ import annotations

from pitstop.errors import PitstopError


class DaemonConfigError(PitstopError, ValueError):
    """The daemon's configuration (/etc/pitstop/pitstop.toml and its drop-ins) is invalid; the message names the
    file, the key and what is allowed."""

    exit_code = 50


class DaemonError(PitstopError):
    """The daemon cannot start or serve (bus name taken, a directory it needs unusable)."""

    exit_code = 51


class UpstreamError(PitstopError):
    """The upstream endpoint (OTLP receiver, update server) refused or failed a request."""

    exit_code = 52


class DdiError(UpstreamError):
    """The hawkBit DDI server answered something the client cannot use (bad status, malformed JSON, a
    deployment without a bundle artifact)."""

    exit_code = 53


class SpoolError(PitstopError):
    """The durable report spool on the data partition cannot be opened or written."""

    exit_code = 54


class LoopSupervisionError(PitstopError):
    """An inference loop cannot be started under supervision (unknown loop, bad limits, no such GPU)."""

    exit_code = 55


class UnknownLoopError(LoopSupervisionError, KeyError):
    """No loop of that name is configured."""


class DaemonUnavailableError(PitstopError):
    """A client command could not reach the daemon over D-Bus (not running, no permission)."""

    exit_code = 56


class NotAuthorizedError(PitstopError):
    """The caller may not call a privileged method (root and the daemon's control group may)."""

    exit_code = 56


class BusyError(PitstopError):
    """Another job (an install, a commit, an update on its way) is running."""

    exit_code = 57


class InstallFailedError(PitstopError):
    """An install handed to the daemon failed. The daemon reports only why (a one-line message), not the kind
    of failure, so this is one code for all of them; `pitstop install --local` gives the specific one."""

    exit_code = 58
