"""Cross-check bundle signatures and certificate chains with the real `openssl` CLI.

pitstop signs with the `cryptography` library and verifies with it too; these tests make sure an
independent implementation agrees: the signature over the manifest bytes verifies with OpenSSL, the
chain carried in the signature block verifies up to the keyring root, and both fail when they must.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload
from cryptography.hazmat.primitives.serialization import Encoding

from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.trust import ECDSA_P256_SHA256, ED25519


@dataclass(frozen=True)
class Extracted:
    algorithm: str
    manifest: Path
    signature: Path
    leaf: Path
    intermediate: Path
    root: Path
    pub: Path


def _openssl(openssl: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([openssl, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def _extract(bundle: Path, keys: Keys, out: Path, openssl: str) -> Extracted:
    """Write the signed manifest bytes, the raw signature and the certificate chain as separate files."""
    out.mkdir()
    with open(bundle, "rb") as f:
        pre = read_preamble(f)
    block = pre.signature_block()
    # The block carries the signing certificate, then the intermediate; the root is the keyring's.
    assert len(block.certificates) == 2
    paths = Extracted(block.algorithm, out / "manifest.json", out / "manifest.sig", out / "leaf.pem",
                      out / "intermediate.pem", out / "root.pem", out / "pub.pem")
    paths.manifest.write_bytes(pre.manifest_bytes)
    paths.signature.write_bytes(block.signature)
    paths.leaf.write_bytes(block.certificates[0].public_bytes(Encoding.PEM))
    paths.intermediate.write_bytes(block.certificates[1].public_bytes(Encoding.PEM))
    paths.root.write_bytes(keys.keyring.read_bytes())
    # The public key comes from the certificate via OpenSSL itself, not via our own code.
    r = _openssl(openssl, "x509", "-in", paths.leaf, "-pubkey", "-noout", "-out", paths.pub)
    assert r.returncode == 0, r.stderr
    return paths


def _verify_signature(openssl: str, x: Extracted, message: Path) -> subprocess.CompletedProcess[str]:
    if x.algorithm == ECDSA_P256_SHA256:
        return _openssl(openssl, "dgst", "-sha256", "-verify", x.pub, "-signature", x.signature, message)
    assert x.algorithm == ED25519
    return _openssl(openssl, "pkeyutl", "-verify", "-pubin", "-inkey", x.pub, "-rawin", "-in", message,
                    "-sigfile", x.signature)


@pytest.fixture(params=["ecdsa", "ed25519"])
def signed(request: pytest.FixtureRequest, tmp_path: Path, tool: Callable[[str], str]) -> tuple[str, Keys, Extracted]:
    openssl = tool("openssl")
    keys: Keys = request.getfixturevalue("keys" if request.param == "ecdsa" else "ed_keys")
    bundle = make_bundle(tmp_path / "b.pitb", [rootfs_payload(tmp_path / "r.img", mixed_data(200_000))], keys)
    return openssl, keys, _extract(bundle, keys, tmp_path / "x", openssl)


def test_signature_algorithm_matches_key_type(signed: tuple[str, Keys, Extracted],
                                              request: pytest.FixtureRequest) -> None:
    _, _, x = signed
    expected = ECDSA_P256_SHA256 if "ecdsa" in request.node.callspec.id else ED25519
    assert x.algorithm == expected


def test_openssl_verifies_manifest_signature(signed: tuple[str, Keys, Extracted]) -> None:
    openssl, _, x = signed
    r = _verify_signature(openssl, x, x.manifest)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Verified OK" in r.stdout or "Signature Verified Successfully" in r.stdout


def test_openssl_rejects_modified_manifest(signed: tuple[str, Keys, Extracted], tmp_path: Path) -> None:
    openssl, _, x = signed
    data = bytearray(x.manifest.read_bytes())
    # Change one byte inside the JSON (a digit of a hash is as good as any).
    pos = data.index(b'"sha256":"') + len(b'"sha256":"')
    data[pos] = ord("0") if data[pos] != ord("0") else ord("1")
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(bytes(data))
    r = _verify_signature(openssl, x, tampered)
    assert r.returncode != 0, r.stdout
    assert "Verified OK" not in r.stdout and "Verified Successfully" not in r.stdout


def test_openssl_rejects_signature_under_other_key(signed: tuple[str, Keys, Extracted], tmp_path: Path) -> None:
    """The real manifest and signature, but an unrelated public key of the same type: must not verify."""
    openssl, _, x = signed
    key, pub = tmp_path / "other.key", tmp_path / "other_pub.pem"
    if x.algorithm == ECDSA_P256_SHA256:
        gen = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    else:
        gen = ("-algorithm", "ED25519")
    r = _openssl(openssl, "genpkey", *gen, "-out", key)
    assert r.returncode == 0, r.stderr
    r = _openssl(openssl, "pkey", "-in", key, "-pubout", "-out", pub)
    assert r.returncode == 0, r.stderr
    r = _verify_signature(openssl, replace(x, pub=pub), x.manifest)
    assert r.returncode != 0, r.stdout


def test_openssl_verifies_chain_to_keyring_root(signed: tuple[str, Keys, Extracted]) -> None:
    openssl, _, x = signed
    r = _openssl(openssl, "verify", "-CAfile", x.root, "-untrusted", x.intermediate, x.leaf)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"{x.leaf}: OK"


def test_openssl_chain_needs_the_intermediate(signed: tuple[str, Keys, Extracted]) -> None:
    openssl, _, x = signed
    r = _openssl(openssl, "verify", "-CAfile", x.root, x.leaf)
    assert r.returncode != 0, r.stdout


def test_openssl_rejects_chain_to_other_root(signed: tuple[str, Keys, Extracted], other_keys: Keys) -> None:
    openssl, _, x = signed
    r = _openssl(openssl, "verify", "-CAfile", other_keys.keyring, "-untrusted", x.intermediate, x.leaf)
    assert r.returncode != 0, r.stdout
    assert "OK" not in r.stdout


def test_leaf_is_a_code_signing_end_entity(signed: tuple[str, Keys, Extracted]) -> None:
    """What OpenSSL sees in the signing certificate: not a CA, digitalSignature, codeSigning."""
    openssl, _, x = signed
    r = _openssl(openssl, "x509", "-in", x.leaf, "-noout", "-text")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "CA:FALSE" in text
    assert "Digital Signature" in text
    assert "Code Signing" in text
    r = _openssl(openssl, "x509", "-in", x.intermediate, "-noout", "-text")
    assert "CA:TRUE, pathlen:0" in r.stdout
