"""Chain building, certificate rules and the clock policy, on real certificates. No I/O."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from pitstop.ota import devkeys
from pitstop.ota.clock import Clock, ClockPolicy
from pitstop.ota.errors import BundleLimitError, CertificateTimeError, SignatureError, TrustError
from pitstop.ota.signing import sign_manifest
from pitstop.ota.trust import SignatureBlock, decode_signature_block, verify_raw_signature, verify_signer

NOW = datetime.now(UTC).replace(microsecond=0)
YEAR = timedelta(days=365)
SYSTEM = Clock(ClockPolicy.SYSTEM, NOW)
FLOOR = Clock(ClockPolicy.FLOOR, NOW)
NONE = Clock(ClockPolicy.NONE, NOW)


@pytest.fixture(scope="module")
def pki() -> devkeys.DevPki:
    return devkeys.make_dev_pki()


def leaf(pki: devkeys.DevPki, **kw) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:  # type: ignore[no-untyped-def]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = devkeys.issue(key, "leaf", issuer_key=pki.intermediate_key, issuer=pki.intermediate, ca=False, **kw)
    return cert, key


def block(*certs: x509.Certificate) -> SignatureBlock:
    return SignatureBlock("ecdsa-p256-sha256", b"", certs)


def test_good_chain(pki: devkeys.DevPki) -> None:
    info = verify_signer(block(pki.signing, pki.intermediate), [pki.root], signed_at=NOW, clock=SYSTEM)
    assert info.subject.endswith("CN=pitstop dev signing") or "pitstop dev signing" in info.subject
    assert len(info.chain) == 2


def test_root_in_chain_is_fine_but_must_be_in_keyring(pki: devkeys.DevPki) -> None:
    verify_signer(block(pki.signing, pki.intermediate, pki.root), [pki.root], signed_at=NOW, clock=SYSTEM)
    other = devkeys.make_dev_pki(name="other")
    with pytest.raises(TrustError, match="does not chain"):
        verify_signer(block(pki.signing, pki.intermediate, pki.root), [other.root], signed_at=NOW, clock=SYSTEM)


def test_missing_intermediate(pki: devkeys.DevPki) -> None:
    with pytest.raises(TrustError, match="does not chain"):
        verify_signer(block(pki.signing), [pki.root], signed_at=NOW, clock=SYSTEM)


def test_forged_issuer_name(pki: devkeys.DevPki) -> None:
    # Same subject name as the real intermediate, different key: the signature check must catch it.
    fake_key = ec.generate_private_key(ec.SECP256R1())
    fake = x509.CertificateBuilder().subject_name(pki.intermediate.subject).issuer_name(pki.root.subject) \
        .public_key(fake_key.public_key()).serial_number(1).not_valid_before(NOW - YEAR) \
        .not_valid_after(NOW + YEAR).add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True) \
        .sign(fake_key, hashes.SHA256())
    cert, _ = leaf(devkeys.DevPki(pki.root, pki.root_key, fake, fake_key, pki.signing, pki.signing_key))
    with pytest.raises(TrustError):
        verify_signer(block(cert, fake), [pki.root], signed_at=NOW, clock=SYSTEM)


def test_intermediate_must_be_ca(pki: devkeys.DevPki) -> None:
    k = ec.generate_private_key(ec.SECP256R1())
    not_ca = devkeys.issue(k, "not a ca", issuer_key=pki.root_key, issuer=pki.root, ca=False)
    lk = ec.generate_private_key(ec.SECP256R1())
    cert = devkeys.issue(lk, "leaf", issuer_key=k, issuer=not_ca, ca=False)
    with pytest.raises(TrustError, match="not a CA"):
        verify_signer(block(cert, not_ca), [pki.root], signed_at=NOW, clock=SYSTEM)


def test_leaf_must_not_be_ca(pki: devkeys.DevPki) -> None:
    with pytest.raises(TrustError, match="CA certificate"):
        verify_signer(block(pki.intermediate), [pki.root], signed_at=NOW, clock=SYSTEM)


def test_path_length(pki: devkeys.DevPki) -> None:
    # The intermediate has path length 0: a CA below it may not issue the signer.
    k2 = ec.generate_private_key(ec.SECP256R1())
    sub = devkeys.issue(k2, "sub ca", issuer_key=pki.intermediate_key, issuer=pki.intermediate, ca=True)
    lk = ec.generate_private_key(ec.SECP256R1())
    cert = devkeys.issue(lk, "leaf", issuer_key=k2, issuer=sub, ca=False)
    with pytest.raises(TrustError, match="path length"):
        verify_signer(block(cert, sub, pki.intermediate), [pki.root], signed_at=NOW, clock=SYSTEM)


def _custom_leaf(pki: devkeys.DevPki, extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    k = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custom")])) \
        .issuer_name(pki.intermediate.subject).public_key(k.public_key()).serial_number(7) \
        .not_valid_before(NOW - YEAR).not_valid_after(NOW + YEAR)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    ik = pki.intermediate_key
    assert isinstance(ik, ec.EllipticCurvePrivateKey)
    return b.sign(ik, hashes.SHA256())


def test_leaf_key_usage(pki: devkeys.DevPki) -> None:
    ku = x509.KeyUsage(False, False, True, False, False, False, False, False, False)
    with pytest.raises(TrustError, match="digitalSignature"):
        verify_signer(block(_custom_leaf(pki, [(ku, True)]), pki.intermediate), [pki.root], signed_at=NOW,
                      clock=SYSTEM)


def test_leaf_extended_key_usage(pki: devkeys.DevPki) -> None:
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(TrustError, match="codeSigning"):
        verify_signer(block(_custom_leaf(pki, [(eku, False)]), pki.intermediate), [pki.root], signed_at=NOW,
                      clock=SYSTEM)
    # No key usage extensions at all: allowed (RFC 5280: unrestricted).
    verify_signer(block(_custom_leaf(pki, []), pki.intermediate), [pki.root], signed_at=NOW, clock=SYSTEM)


def test_unknown_critical_extension(pki: devkeys.DevPki) -> None:
    ext = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    with pytest.raises(TrustError, match="unknown critical extension"):
        verify_signer(block(_custom_leaf(pki, [(ext, True)]), pki.intermediate), [pki.root], signed_at=NOW,
                      clock=SYSTEM)
    verify_signer(block(_custom_leaf(pki, [(ext, False)]), pki.intermediate), [pki.root], signed_at=NOW,
                  clock=SYSTEM)


# --- the clock policy -------------------------------------------------------------------------------


def test_expired(pki: devkeys.DevPki) -> None:
    cert, _ = leaf(pki, not_before=NOW - 3 * YEAR, not_after=NOW - YEAR)
    b = block(cert, pki.intermediate)
    with pytest.raises(CertificateTimeError, match="expired"):
        verify_signer(b, [pki.root], signed_at=NOW, clock=SYSTEM)
    with pytest.raises(CertificateTimeError):
        verify_signer(b, [pki.root], signed_at=NOW, clock=FLOOR)
    # Signed while valid, but the device knows the present is past expiry.
    with pytest.raises(CertificateTimeError, match="expired"):
        verify_signer(b, [pki.root], signed_at=NOW - 2 * YEAR, clock=FLOOR)
    verify_signer(b, [pki.root], signed_at=NOW, clock=NONE)


def test_not_yet_valid(pki: devkeys.DevPki) -> None:
    cert, _ = leaf(pki, not_before=NOW + YEAR, not_after=NOW + 3 * YEAR)
    b = block(cert, pki.intermediate)
    with pytest.raises(CertificateTimeError, match="not yet valid"):
        verify_signer(b, [pki.root], signed_at=NOW, clock=SYSTEM)
    with pytest.raises(CertificateTimeError, match="not valid when the bundle was signed"):
        verify_signer(b, [pki.root], signed_at=NOW, clock=FLOOR)


def test_device_without_rtc() -> None:
    """A device that boots at the epoch: 'system' refuses everything, 'floor' works as intended."""
    pki = devkeys.make_dev_pki()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    b = block(pki.signing, pki.intermediate)
    rtcless = Clock(ClockPolicy.FLOOR, epoch, floor=datetime(2026, 1, 1, tzinfo=UTC))
    verify_signer(b, [pki.root], signed_at=NOW, clock=rtcless)
    with pytest.raises(CertificateTimeError):
        verify_signer(b, [pki.root], signed_at=NOW, clock=Clock(ClockPolicy.SYSTEM, epoch))
    # The floor alone can tell an expired certificate even with the clock at the epoch.
    old, _ = leaf(pki, not_before=NOW - 3 * YEAR, not_after=NOW - YEAR)
    late_floor = Clock(ClockPolicy.FLOOR, epoch, floor=NOW)
    with pytest.raises(CertificateTimeError, match="expired"):
        verify_signer(block(old, pki.intermediate), [pki.root], signed_at=NOW - 2 * YEAR, clock=late_floor)
    assert late_floor.effective_now == NOW


# --- raw signatures and the signature block ---------------------------------------------------------


class _Signer:
    def __init__(self, pki: devkeys.DevPki) -> None:
        self.pki = pki

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return (self.pki.signing, self.pki.intermediate)

    @property
    def algorithm(self) -> str:
        return "ecdsa-p256-sha256"

    def sign(self, message: bytes) -> bytes:
        k = self.pki.signing_key
        assert isinstance(k, ec.EllipticCurvePrivateKey)
        return k.sign(message, ec.ECDSA(hashes.SHA256()))


def test_signature_roundtrip_and_tamper(pki: devkeys.DevPki) -> None:
    blk = sign_manifest(_Signer(pki), b'{"a":1}')
    dec = decode_signature_block(blk.encode())
    verify_raw_signature(dec.algorithm, dec.certificates[0], dec.signature, b'{"a":1}')
    with pytest.raises(SignatureError, match="does not match"):
        verify_raw_signature(dec.algorithm, dec.certificates[0], dec.signature, b'{"a":2}')
    with pytest.raises(SignatureError, match="Ed25519"):
        verify_raw_signature("ed25519", dec.certificates[0], dec.signature, b'{"a":1}')


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", SignatureError, "not signed"),
        (b"{", SignatureError, "not valid JSON"),
        (b"[]", SignatureError, "unexpected fields"),
        (json.dumps({"algorithm": "rsa", "signature": "", "certificates": []}).encode(), SignatureError,
         "unsupported"),
        (json.dumps({"algorithm": "ed25519", "signature": "!!", "certificates": ["AA=="]}).encode(),
         SignatureError, "corrupt"),
        (json.dumps({"algorithm": "ed25519", "signature": "", "certificates": []}).encode(), SignatureError,
         "missing"),
        (json.dumps({"algorithm": "ed25519", "signature": "", "certificates": ["AA=="] * 9}).encode(),
         BundleLimitError, "certificates"),
        (b" " * (64 * 1024 + 1), BundleLimitError, "cap"),
    ],
)
def test_signature_block_refusals(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_signature_block(data)


def test_signature_block_bad_certificate() -> None:
    data = json.dumps({"algorithm": "ed25519", "signature": "",
                       "certificates": [base64.b64encode(b"not a certificate").decode()]}).encode()
    with pytest.raises(SignatureError, match="corrupt"):
        decode_signature_block(data)
