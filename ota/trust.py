"""Signature block, certificate chain and clock policy checks. Pure code: bytes and times in, verdicts out.

The manifest's exact bytes are signed with ECDSA P-256/SHA-256 (DER signature) or Ed25519 (pure).
The signer's certificate, then any intermediates, travel in the signature block; the path must end
at a certificate in the device's keyring.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from pitstop.ota.bundle_format import DEFAULT_LIMITS, Limits
from pitstop.ota.clock import Clock, ClockPolicy
from pitstop.ota.errors import BundleLimitError, CertificateTimeError, SignatureError, TrustError

ECDSA_P256_SHA256 = "ecdsa-p256-sha256"
ED25519 = "ed25519"
ALGORITHMS = (ECDSA_P256_SHA256, ED25519)
MAX_CHAIN_DEPTH = 8

@dataclass(frozen=True)
class SignatureBlock:
    algorithm: str
    signature: bytes
    certificates: tuple[x509.Certificate, ...]

    def encode(self) -> bytes:
        d = {
            "algorithm": self.algorithm,
            "signature": base64.b64encode(self.signature).decode(),
            "certificates": [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in self.certificates],
        }
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignerInfo:
    algorithm: str
    subject: str
    issuer: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    chain: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm, "subject": self.subject, "issuer": self.issuer,
            "fingerprint_sha256": self.fingerprint_sha256,
            "not_before": self.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "not_after": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), "chain": list(self.chain),
        }


def signer_info(block: SignatureBlock) -> SignerInfo:
    leaf = block.certificates[0]
    return SignerInfo(
        block.algorithm, leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string(),
        leaf.fingerprint(hashes.SHA256()).hex(), leaf.not_valid_before_utc, leaf.not_valid_after_utc,
        tuple(c.subject.rfc4514_string() for c in block.certificates),
    )


def decode_signature_block(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SignatureBlock:
    if not data:
        raise SignatureError("bundle is not signed")
    if len(data) > limits.max_signature_block:
        raise BundleLimitError("signature block exceeds its cap")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SignatureError("signature block is corrupt (not valid JSON)") from None
    if not isinstance(d, dict) or set(d) != {"algorithm", "signature", "certificates"}:
        raise SignatureError("signature block is corrupt (unexpected fields)")
    alg, sig, certs = d["algorithm"], d["signature"], d["certificates"]
    if alg not in ALGORITHMS:
        raise SignatureError(f"unsupported signature algorithm {alg!r} (supported: {', '.join(ALGORITHMS)})")
    if not isinstance(sig, str) or not isinstance(certs, list) or not certs:
        raise SignatureError("signature block is corrupt (signature or certificates missing)")
    if len(certs) > limits.max_certificates:
        raise BundleLimitError(f"signature block carries {len(certs)} certificates, cap is {limits.max_certificates}")
    try:
        raw_sig = base64.b64decode(sig, validate=True)
        parsed = tuple(x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in certs)
        for cert in parsed:
            check_parseable(cert)
    except (binascii.Error, ValueError, TypeError, UnsupportedAlgorithm):
        raise SignatureError("signature block is corrupt (bad base64 or certificate)") from None
    return SignatureBlock(alg, raw_sig, parsed)


def check_parseable(cert: x509.Certificate) -> None:
    """Touch every field the checks use: the library parses lazily and raises ValueError late."""
    cert.public_key()
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    list(cert.extensions)
    _ = cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm


def check_key_algorithm(algorithm: str, cert: x509.Certificate) -> None:
    key = cert.public_key()
    if algorithm == ECDSA_P256_SHA256:
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SignatureError("signature algorithm is ECDSA P-256 but the signing certificate's key is not")
    elif algorithm == ED25519:
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SignatureError("signature algorithm is Ed25519 but the signing certificate's key is not")
    else:
        raise SignatureError(f"unsupported signature algorithm {algorithm!r}")


def verify_raw_signature(algorithm: str, cert: x509.Certificate, signature: bytes, message: bytes) -> None:
    """Raise SignatureError unless `signature` is `cert`'s signature over `message`."""
    check_key_algorithm(algorithm, cert)
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
    except InvalidSignature:
        raise SignatureError("signature does not match the manifest (bundle modified or wrong key)") from None


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _check_extensions(cert: x509.Certificate, *, as_ca: bool, ca_below: int) -> None:
    subject = cert.subject.rfc4514_string()
    for ext in cert.extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise TrustError(f"certificate {subject!r} has an unknown critical extension {ext.oid.dotted_string}")
    bc = _ext(cert, x509.BasicConstraints)
    ku = _ext(cert, x509.KeyUsage)
    if as_ca:
        if bc is None or not bc.ca:
            raise TrustError(f"certificate {subject!r} issues another certificate but is not a CA")
        if bc.path_length is not None and ca_below > bc.path_length:
            raise TrustError(f"certificate {subject!r}: path length constraint exceeded")
        if ku is not None and not ku.key_cert_sign:
            raise TrustError(f"certificate {subject!r} may not sign certificates (key usage)")
    else:
        if bc is not None and bc.ca:
            raise TrustError(f"signing certificate {subject!r} is a CA certificate; sign with a leaf")
        if ku is not None and not ku.digital_signature:
            raise TrustError(f"signing certificate {subject!r} lacks the digitalSignature key usage")
        eku = _ext(cert, x509.ExtendedKeyUsage)
        if eku is not None and not (
            ExtendedKeyUsageOID.CODE_SIGNING in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
        ):
            raise TrustError(f"signing certificate {subject!r} lacks the codeSigning extended key usage")


def valid_at(cert: x509.Certificate, t: datetime) -> bool:
    """Whether `t` lies in the certificate's validity window: the rule the floor policy applies to
    the signing time, and so the one a producer must meet for its bundles to be accepted."""
    return cert.not_valid_before_utc <= t <= cert.not_valid_after_utc


def _check_time(cert: x509.Certificate, signed_at: datetime, clock: Clock) -> None:
    if clock.policy is ClockPolicy.NONE:
        return
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    subject = cert.subject.rfc4514_string()
    if clock.policy is ClockPolicy.SYSTEM:
        now = clock.now
        if now < nb:
            raise CertificateTimeError(f"certificate {subject!r} is not yet valid (valid from {nb:%Y-%m-%d %H:%M} UTC)")
        if now > na:
            raise CertificateTimeError(f"certificate {subject!r} expired on {na:%Y-%m-%d %H:%M} UTC")
        return
    # FLOOR: the signature must have been made inside the validity window, and the device's best
    # knowledge of the present (its clock, but never earlier than the floor) must not be past expiry.
    if not valid_at(cert, signed_at):
        raise CertificateTimeError(
            f"certificate {subject!r} was not valid when the bundle was signed ({signed_at:%Y-%m-%d %H:%M} UTC; "
            f"valid {nb:%Y-%m-%d} to {na:%Y-%m-%d})"
        )
    if clock.effective_now > na:
        raise CertificateTimeError(f"certificate {subject!r} expired on {na:%Y-%m-%d %H:%M} UTC")


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.fingerprint(hashes.SHA256()) == b.fingerprint(hashes.SHA256())


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def build_path(chain: Sequence[x509.Certificate], keyring: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Return leaf → … → anchor, the anchor being a keyring certificate. Raise TrustError if none exists."""
    if not keyring:
        raise TrustError("the keyring is empty")
    path = [chain[0]]
    pool = list(chain[1:])
    while len(path) <= MAX_CHAIN_DEPTH:
        cur = path[-1]
        for anchor in keyring:
            if _same(cur, anchor):
                return path
        for anchor in keyring:
            if _issued_by(cur, anchor):
                return [*path, anchor]
        nxt = next((c for c in pool if _issued_by(cur, c) and not any(_same(c, p) for p in path)), None)
        if nxt is None:
            break
        path.append(nxt)
    raise TrustError(
        f"signer {chain[0].subject.rfc4514_string()!r} does not chain to a certificate in the keyring"
    )


def verify_chain(block: SignatureBlock, keyring: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Build the path to the keyring and check every certificate's role (CA, key usages).

    Needs nothing from the manifest, so it runs before the manifest is parsed.
    """
    path = build_path(block.certificates, keyring)
    for i, cert in enumerate(path):
        _check_extensions(cert, as_ca=i > 0, ca_below=max(i - 1, 0))
    return path


def check_times(path: Sequence[x509.Certificate], *, signed_at: datetime, clock: Clock) -> None:
    """Validity times of every certificate in the path under the clock policy."""
    for cert in path:
        _check_time(cert, signed_at, clock)


def verify_signer(
    block: SignatureBlock,
    keyring: Sequence[x509.Certificate],
    *,
    signed_at: datetime,
    clock: Clock,
) -> SignerInfo:
    """Chain, roles and times in one call, for callers that already trust `signed_at`."""
    check_times(verify_chain(block, keyring), signed_at=signed_at, clock=clock)
    return signer_info(block)
