"""Loading certificates: the device keyring (trust anchors) and a signer's chain, from PEM files."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from pitstop.ota.errors import KeyringError
from pitstop.ota.trust import check_parseable

_PEM_SUFFIXES = (".pem", ".crt")
_MAX_FILE = 1 << 20


def load_certificates(path: Path, what: str = "certificate file") -> list[x509.Certificate]:
    """All certificates in a PEM file, in file order."""
    try:
        data = Path(path).read_bytes()[: _MAX_FILE + 1]
    except OSError as e:
        raise KeyringError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > _MAX_FILE:
        raise KeyringError(f"{what} {path} is larger than 1 MiB")
    try:
        certs = x509.load_pem_x509_certificates(data)
        for cert in certs:
            check_parseable(cert)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyringError(f"{what} {path} holds no valid PEM certificate") from None
    return certs


def load_keyring(path: Path) -> list[x509.Certificate]:
    """A PEM file with one or more root certificates, or a directory of *.pem / *.crt files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _PEM_SUFFIXES)
        certs = [c for f in files for c in load_certificates(f, "keyring file")]
        if not certs:
            raise KeyringError(f"keyring directory {path} holds no *.pem or *.crt certificate")
        return certs
    return load_certificates(path, "keyring")
