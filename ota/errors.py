"""Typed errors of the update area, each with its own exit code (docs/cli.md lists them)."""

from __future__ import annotations

from pitstop.errors import PitstopError


class BundleError(PitstopError, ValueError):
    """The bundle is malformed, truncated or corrupt."""

    exit_code = 10


class BundleLimitError(BundleError):
    """A length or count read from the bundle exceeds a hard cap."""

    exit_code = 11


class SignatureError(BundleError):
    """The bundle is unsigned, or its signature does not match its manifest."""

    exit_code = 12


class TrustError(BundleError):
    """The signer's certificate does not chain to a root in the keyring, or may not sign bundles."""

    exit_code = 13


class CertificateTimeError(TrustError):
    """A certificate in the chain is expired or not yet valid under the clock policy."""

    exit_code = 14


class CompatibilityError(BundleError):
    """The bundle's `compatible` string does not match this device."""

    exit_code = 15


class DowngradeError(BundleError):
    """The bundle's `security_version` is below the minimum this device accepts."""

    exit_code = 16


class PayloadError(BundleError):
    """A chunk, a payload or its index does not match the hashes the manifest signs."""

    exit_code = 17


class UnsafePathError(BundleError):
    """A target or an archive member would escape its destination (absolute, `..`, symlink)."""

    exit_code = 18


class SpecError(PitstopError, ValueError):
    """A bundle specification (TOML or flags) is invalid; raised before anything is written."""

    exit_code = 19


class SigningError(PitstopError):
    """The signing key, certificate or external signing command cannot produce a valid signature."""

    exit_code = 20


class KeyringError(PitstopError, ValueError):
    """The keyring file cannot be read or holds no certificate."""

    exit_code = 21


class BootEnvError(PitstopError, ValueError):
    """The bootloader environment is unreadable, torn, or cannot hold the requested state."""

    exit_code = 22
