"""A development PKI: root CA → intermediate CA → signing certificate, for tests, demos and first steps.

Production keeps the root offline and the signing key in an HSM (see docs/keys.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pitstop.atomic import atomic_write
from pitstop.errors import UsageError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
KEY_TYPES = ("ecdsa-p256", "ed25519")


def new_key(kind: str) -> PrivateKey:
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise UsageError(f"unknown key type {kind!r} (use {', '.join(KEY_TYPES)})")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pitstop development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    subject_key: PrivateKey,
    cn: str,
    *,
    issuer_key: PrivateKey | None = None,
    issuer: x509.Certificate | None = None,
    ca: bool,
    path_length: int | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    code_signing: bool = True,
) -> x509.Certificate:
    """Issue a certificate; self-signed when no issuer is given."""
    now = datetime.now(UTC)
    nb = not_before or now - timedelta(days=1)
    na = not_after or now + timedelta(days=3650)
    signing_key = issuer_key or subject_key
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject if issuer else _name(cn))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                            critical=True)
        if code_signing:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    algorithm = None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(signing_key, algorithm)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class DevPki:
    root: x509.Certificate
    root_key: PrivateKey
    intermediate: x509.Certificate
    intermediate_key: PrivateKey
    signing: x509.Certificate
    signing_key: PrivateKey


def make_dev_pki(kind: str = "ecdsa-p256", name: str = "pitstop dev", *, signing_not_before: datetime | None = None,
                 signing_not_after: datetime | None = None, not_before: datetime | None = None) -> DevPki:
    """`not_before`: of all three certificates (default: a day ago); `signing_not_*` override the signing one's."""
    root_key, int_key, sig_key = new_key(kind), new_key(kind), new_key(kind)
    root = issue(root_key, f"{name} root CA", ca=True, path_length=1, not_before=not_before)
    inter = issue(int_key, f"{name} intermediate CA", issuer_key=root_key, issuer=root, ca=True, path_length=0,
                  not_before=not_before)
    signing = issue(sig_key, f"{name} signing", issuer_key=int_key, issuer=inter, ca=False,
                    not_before=signing_not_before or not_before, not_after=signing_not_after)
    return DevPki(root, root_key, inter, int_key, signing, sig_key)


def write_dev_pki(pki: DevPki, out: Path) -> dict[str, Path]:
    """Write the PKI as PEM files; private keys are mode 0600."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "root.pem": (cert_pem(pki.root), 0o644),
        "root.key": (key_pem(pki.root_key), 0o600),
        "intermediate.pem": (cert_pem(pki.intermediate), 0o644),
        "intermediate.key": (key_pem(pki.intermediate_key), 0o600),
        "signing.pem": (cert_pem(pki.signing), 0o644),
        "signing.key": (key_pem(pki.signing_key), 0o600),
        "chain.pem": (cert_pem(pki.signing, pki.intermediate), 0o644),
        "keyring.pem": (cert_pem(pki.root), 0o644),
    }
    paths = {}
    for fname, (data, mode) in files.items():
        atomic_write(out / fname, data, mode)
        paths[fname] = out / fname
    return paths
