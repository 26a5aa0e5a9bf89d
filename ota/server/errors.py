"""Typed errors of `pitstop server`, each with its own exit code (docs/cli.md lists them)."""

from __future__ import annotations

from pitstop.errors import PitstopError


class ServerConfigError(PitstopError, ValueError):
    """A setting of the server is invalid: listen address, TLS files, tenant, poll interval, data directory."""

    exit_code = 60


class ServerError(PitstopError):
    """The server cannot start or serve (the address is taken, the certificate does not load)."""

    exit_code = 61


class StoreError(PitstopError):
    """The server's database cannot be opened, read or written (corrupt, from a newer pitstop, locked too long,
    the disk full)."""

    exit_code = 62


class UploadError(PitstopError, ValueError):
    """An upload is refused: not a pitstop bundle, truncated or corrupt, unsigned or not signed by a key the
    keyring vouches for. Nothing is stored."""

    exit_code = 63


class DeployError(PitstopError, ValueError):
    """A deployment cannot be made as asked: no target device, a wave plan or threshold out of range, a device
    made for another `compatible`."""

    exit_code = 64


class NotFoundError(PitstopError, LookupError):
    """No device, bundle, rollout or action with that name or id."""

    exit_code = 65


class UnknownDeviceError(NotFoundError):
    """No device with that id is registered."""


class ConflictError(PitstopError):
    """The request conflicts with what is stored: a device that already exists, a finished rollout or action to
    cancel, a rollout to resume that is not stopped."""

    exit_code = 66
