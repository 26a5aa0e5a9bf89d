"""Producing signatures: from a PEM private key, or from an external command (HSM, PKCS#11, KMS).

An external command receives, on stdin, the SHA-256 digest of the manifest (32 bytes) for ECDSA,
or the manifest itself for Ed25519 (which hashes internally), and writes the raw signature to stdout
(DER for ECDSA, 64 bytes for Ed25519). PITSTOP_SIGN_ALGORITHM names the algorithm it must use.
The command runs in a clean environment; variables named PITSTOP_SIGN_* (a PIN file, a token
label) are passed through to it.
Every signature is checked against the certificate before it goes into a bundle.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from pitstop import runner
from pitstop.errors import CommandError, UsageError
from pitstop.ota.errors import KeyringError, SignatureError, SigningError
from pitstop.ota.keyring import load_certificates
from pitstop.ota.trust import ECDSA_P256_SHA256, ED25519, SignatureBlock, valid_at, verify_raw_signature


class Signer(Protocol):
    @property
    def certificates(self) -> tuple[x509.Certificate, ...]: ...

    @property
    def algorithm(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def algorithm_for(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ECDSA_P256_SHA256
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ED25519
    raise SigningError("the signing certificate's key is neither ECDSA P-256 nor Ed25519")


def _load_chain(paths: Sequence[Path]) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(c for p in paths for c in load_certificates(p, "signing certificate"))
    except KeyringError as e:
        raise SigningError(e.message) from None
    if not certs:
        raise SigningError("no signing certificate given")
    return certs


@dataclass(frozen=True)
class KeyFileSigner:
    """Signs with a PEM private key; the passphrase, if any, comes from PITSTOP_KEY_PASSPHRASE."""

    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    certificates: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, key_path: Path, cert_paths: Sequence[Path]) -> KeyFileSigner:
        certs = _load_chain(cert_paths)
        passphrase = os.environ.get("PITSTOP_KEY_PASSPHRASE")
        try:
            key = serialization.load_pem_private_key(
                Path(key_path).read_bytes(), password=passphrase.encode() if passphrase else None
            )
        except OSError as e:
            raise SigningError(f"cannot read signing key {key_path}: {e.strerror}") from None
        except (ValueError, TypeError) as e:
            raise SigningError(f"cannot load signing key {key_path}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise SigningError("the signing key is neither ECDSA P-256 nor Ed25519")
        pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        cert_pub = (
            certs[0]
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        if pub != cert_pub:
            raise SigningError("the signing key does not belong to the first certificate given")
        return cls(key, certs)

    @property
    def algorithm(self) -> str:
        return algorithm_for(self.certificates[0])

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        return self.key.sign(message)


@dataclass(frozen=True)
class CommandSigner:
    """Delegates the private-key operation to an external command."""

    command: tuple[str, ...]
    certificates: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, command: Sequence[str], cert_paths: Sequence[Path]) -> CommandSigner:
        if not command:
            raise SigningError("empty signing command")
        return cls(tuple(command), _load_chain(cert_paths))

    @property
    def algorithm(self) -> str:
        return algorithm_for(self.certificates[0])

    def sign(self, message: bytes) -> bytes:
        alg = self.algorithm
        data = hashlib.sha256(message).digest() if alg == ECDSA_P256_SHA256 else message
        try:
            env = {k: v for k, v in os.environ.items() if k.startswith("PITSTOP_SIGN_")}
            env["PITSTOP_SIGN_ALGORITHM"] = alg
            result = runner.run(self.command, input=data, env=env, timeout=120)
        except CommandError as e:
            raise SigningError(f"signing command failed: {e.message}") from None
        if not result.stdout:
            raise SigningError("signing command printed no signature")
        return result.stdout


def sign_manifest(signer: Signer, manifest_bytes: bytes, signed_at: datetime | None = None) -> SignatureBlock:
    """Sign and self-check: a bundle never carries a signature its own certificate does not verify.

    With `signed_at` (the manifest's `created`), refuse certificates not valid at that time: devices
    under the default clock policy would refuse the bundle (an old SOURCE_DATE_EPOCH, say).
    """
    certs = signer.certificates
    if signed_at is not None:
        for cert in certs:
            if not valid_at(cert, signed_at):
                nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
                raise SigningError(
                    f"certificate {cert.subject.rfc4514_string()!r} is valid {nb:%Y-%m-%d %H:%M} to "
                    f"{na:%Y-%m-%d %H:%M} UTC, not at the bundle's creation time {signed_at:%Y-%m-%d %H:%M} UTC "
                    "(check SOURCE_DATE_EPOCH); devices would refuse it"
                )
    signature = signer.sign(manifest_bytes)
    try:
        verify_raw_signature(signer.algorithm, certs[0], signature, manifest_bytes)
    except SignatureError:
        raise SigningError("the signature produced does not verify against the signing certificate") from None
    return SignatureBlock(signer.algorithm, signature, certs)


def signer_from_options(key: Path | None, sign_command: str | None, certs: Sequence[Path]) -> Signer | None:
    """The signer a command line asks for (`--key` or `--sign-command`, with `--cert`s), or None for none."""
    if key and sign_command:
        raise UsageError("give --key or --sign-command, not both")
    if not (key or sign_command):
        if certs:
            raise UsageError("--cert needs --key or --sign-command")
        return None
    if not certs:
        raise UsageError("signing needs --cert (the signing certificate, then intermediates)")
    if key:
        return KeyFileSigner.load(key, certs)
    assert sign_command is not None
    return CommandSigner.load(shlex.split(sign_command), certs)
