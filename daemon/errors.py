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


class DaemonUnavailableError(PitstopError):
    """A client command could not reach the daemon over D-Bus (not running, no permission)."""

    exit_code = 56
