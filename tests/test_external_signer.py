"""External signers (`--sign-command`, as for an HSM or KMS) and `pitstop bundle sign`.

The external signer here is the real `openssl pkeyutl`, so this also checks that a signature made
by another implementation is accepted by pitstop's verifier.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from bundlekit import CliResult, Keys, assert_refused, mixed_data, payload_area, run_cli
from cryptography.hazmat.primitives.asymmetric import ed25519

from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.errors import SignatureError, SigningError, TrustError
from pitstop.ota.trust import ECDSA_P256_SHA256, ED25519

SIGNING = SigningError.exit_code
# A bundle small enough to sit in one read buffer, and one that is not: signing copies the payload
# area from past the reader's read-ahead.
SMALL, LARGE = 1_000, 300_000
SIZES = [SMALL, LARGE]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\nset -eu\n" + body)
    path.chmod(0o755)
    return path


def openssl_signer(tmp_path: Path, keys: Keys, openssl: str) -> Path:
    """A signing command around `openssl pkeyutl`; it records its stdin and PITSTOP_SIGN_ALGORITHM."""
    log = tmp_path / "signer-log"
    log.mkdir()
    rawin = "-rawin " if isinstance(keys.pki.signing_key, ed25519.Ed25519PrivateKey) else ""
    # OpenSSL 3.0 cannot read -rawin input from a pipe, so the input goes through a file.
    return _script(tmp_path / "sign.sh", f"""\
cat > {shlex.quote(str(log / "input.bin"))}
printf '%s' "${{PITSTOP_SIGN_ALGORITHM:-unset}}" > {shlex.quote(str(log / "algorithm"))}
exec {shlex.quote(openssl)} pkeyutl -sign {rawin}-inkey {shlex.quote(str(keys.key))} \\
    -in {shlex.quote(str(log / "input.bin"))}
""")


def _create(capsys: pytest.CaptureFixture[str], tmp_path: Path, out: Path, *signer_args: str | Path,
            size: int = LARGE) -> CliResult:
    src = tmp_path / "rootfs.img"
    if not src.exists():
        src.write_bytes(mixed_data(size, seed=5))
    return run_cli(capsys, "-q", "bundle", "create", "--version", "2.0.0", "--security-version", "3",
                   "--compatible", "pitstop-test", "--payload", f"rootfs:rootfs:{src}", "-o", out, *signer_args)


def _verify(capsys: pytest.CaptureFixture[str], bundle: Path, keys: Keys) -> CliResult:
    return run_cli(capsys, "-q", "bundle", "verify", bundle, "--keyring", keys.keyring)


@pytest.mark.parametrize("kind", ["ecdsa", "ed25519"])
def test_sign_command_with_openssl(tmp_path: Path, kind: str, request: pytest.FixtureRequest,
                                   tool: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    openssl = tool("openssl")
    keys: Keys = request.getfixturevalue("keys" if kind == "ecdsa" else "ed_keys")
    script = openssl_signer(tmp_path, keys, openssl)
    bundle = tmp_path / "b.pitb"
    r = _create(capsys, tmp_path, bundle, "--sign-command", str(script), "--cert", keys.chain)
    assert r.rc == 0, r.err
    assert "signed" in r.out and "unsigned" not in r.out

    with open(bundle, "rb") as f:
        pre = read_preamble(f)
    block = pre.signature_block()
    log = tmp_path / "signer-log"
    sent = (log / "input.bin").read_bytes()
    if kind == "ecdsa":
        assert block.algorithm == ECDSA_P256_SHA256
        assert sent == hashlib.sha256(pre.manifest_bytes).digest()  # the 32-byte digest
        assert block.signature[0] == 0x30  # DER SEQUENCE
    else:
        assert block.algorithm == ED25519
        assert sent == pre.manifest_bytes  # pure Ed25519 signs the message itself
        assert len(block.signature) == 64
    assert (log / "algorithm").read_text() == block.algorithm

    r = _verify(capsys, bundle, keys)
    assert r.rc == 0, r.err
    assert "OK" in r.out


@pytest.mark.parametrize("size", SIZES)
def test_sign_command_through_bundle_sign(tmp_path: Path, ed_keys: Keys, tool: Callable[[str], str],
                                          capsys: pytest.CaptureFixture[str], size: int) -> None:
    script = openssl_signer(tmp_path, ed_keys, tool("openssl"))
    bundle = tmp_path / "b.pitb"
    assert _create(capsys, tmp_path, bundle, size=size).rc == 0
    r = run_cli(capsys, "-q", "bundle", "sign", bundle, "--sign-command", str(script), "--cert", ed_keys.chain)
    assert r.rc == 0, r.err
    assert _verify(capsys, bundle, ed_keys).rc == 0


@pytest.mark.parametrize(("command", "message"), [
    ("sh -c 'echo \"HSM is offline\" >&2; exit 1'", "exit status 1: HSM is offline"),
    ("sh -c 'echo this-is-not-a-signature'", "does not verify"),
    ("sh -c 'head -c 64 /dev/urandom'", "does not verify"),
    ("true", "printed no signature"),
    ("/nonexistent/pitstop-signer --flag", "command not found"),
    ("sh -c 'exit 127'", "command not found"),
])
def test_failing_sign_command(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str],
                              command: str, message: str) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = _create(capsys, tmp_path, outdir / "b.pitb", "--sign-command", command, "--cert", keys.chain)
    assert_refused(r, SIGNING)
    assert message in r.err
    assert list(outdir.iterdir()) == []  # no bundle, no temporaries


def test_sign_command_with_wrong_key(tmp_path: Path, keys: Keys, other_keys: Keys, tool: Callable[[str], str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The command signs with a key that is not the certificate's: caught before anything is written."""
    openssl = tool("openssl")
    cmd = f"{shlex.quote(openssl)} pkeyutl -sign -inkey {shlex.quote(str(other_keys.key))}"
    r = _create(capsys, tmp_path, tmp_path / "b.pitb", "--sign-command", cmd, "--cert", keys.chain)
    assert_refused(r, SIGNING)
    assert "does not verify" in r.err
    assert not (tmp_path / "b.pitb").exists()


def test_sign_command_sees_clean_environment(tmp_path: Path, keys: Keys, tool: Callable[[str], str],
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    openssl = tool("openssl")
    monkeypatch.setenv("PITSTOP_TEST_SECRET", "leak")
    monkeypatch.setenv("PITSTOP_SIGN_PIN_FILE", "/run/hsm/pin")
    env_file = tmp_path / "env.txt"
    script = _script(tmp_path / "sign.sh", f"""\
env > {shlex.quote(str(env_file))}
exec {shlex.quote(openssl)} pkeyutl -sign -inkey {shlex.quote(str(keys.key))}
""")
    r = _create(capsys, tmp_path, tmp_path / "b.pitb", "--sign-command", str(script), "--cert", keys.chain)
    assert r.rc == 0, r.err
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert "PITSTOP_TEST_SECRET" not in env
    assert env["PITSTOP_SIGN_PIN_FILE"] == "/run/hsm/pin"  # PITSTOP_SIGN_* is passed through on purpose
    assert env["PITSTOP_SIGN_ALGORITHM"] == ECDSA_P256_SHA256
    assert env["LC_ALL"] == "C.UTF-8"


# --- bundle sign ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_sign_unsigned_bundle(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str], size: int) -> None:
    unsigned = tmp_path / "unsigned.pitb"
    r = _create(capsys, tmp_path, unsigned, size=size)
    assert r.rc == 0, r.err
    assert "unsigned" in r.out
    r = _verify(capsys, unsigned, keys)
    assert_refused(r, SignatureError.exit_code)
    assert "not signed" in r.err
    r = run_cli(capsys, "-q", "bundle", "info", unsigned)
    assert "none (unsigned)" in r.out

    before = unsigned.read_bytes()
    signed = tmp_path / "signed.pitb"
    r = run_cli(capsys, "-q", "bundle", "sign", unsigned, "-o", signed, "--key", keys.key, "--cert", keys.chain)
    assert r.rc == 0, r.err
    assert "pitstop dev signing" in r.out
    assert unsigned.read_bytes() == before  # -o leaves the input alone
    r = _verify(capsys, signed, keys)
    assert r.rc == 0, r.err
    # Only the signature block changed: the same manifest and payload bytes.
    with open(unsigned, "rb") as f:
        pre_u = read_preamble(f)
    with open(signed, "rb") as f:
        pre_s = read_preamble(f)
    assert pre_s.manifest_bytes == pre_u.manifest_bytes
    assert payload_area(signed)[1] == payload_area(unsigned)[1]

    r = run_cli(capsys, "-q", "bundle", "extract", signed, "rootfs", "-o", tmp_path / "x.img",
                "--keyring", keys.keyring)
    assert r.rc == 0, r.err
    assert (tmp_path / "x.img").read_bytes() == (tmp_path / "rootfs.img").read_bytes()


@pytest.mark.parametrize("size", SIZES)
def test_sign_in_place_and_resign(tmp_path: Path, keys: Keys, other_keys: Keys,
                                  capsys: pytest.CaptureFixture[str], size: int) -> None:
    bundle = tmp_path / "b.pitb"
    assert _create(capsys, tmp_path, bundle, size=size).rc == 0
    r = run_cli(capsys, "-q", "bundle", "sign", bundle, "--key", other_keys.key, "--cert", other_keys.chain)
    assert r.rc == 0, r.err
    assert _verify(capsys, bundle, other_keys).rc == 0
    assert_refused(_verify(capsys, bundle, keys), TrustError.exit_code)

    # Re-signing in place replaces the signer.
    r = run_cli(capsys, "-q", "bundle", "sign", bundle, "--key", keys.key, "--cert", keys.chain)
    assert r.rc == 0, r.err
    assert _verify(capsys, bundle, keys).rc == 0
    assert_refused(_verify(capsys, bundle, other_keys), TrustError.exit_code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pitb", "rootfs.img"]


def test_failed_in_place_sign_leaves_bundle_intact(tmp_path: Path, keys: Keys,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "b.pitb"
    assert _create(capsys, tmp_path, bundle, "--key", keys.key, "--cert", keys.chain).rc == 0
    before = bundle.read_bytes()
    r = run_cli(capsys, "-q", "bundle", "sign", bundle, "--sign-command", "sh -c 'exit 3'", "--cert", keys.chain)
    assert_refused(r, SIGNING)
    assert bundle.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pitb", "rootfs.img"]
    assert _verify(capsys, bundle, keys).rc == 0


def test_sign_key_must_match_certificate(tmp_path: Path, keys: Keys, other_keys: Keys,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "b.pitb"
    assert _create(capsys, tmp_path, bundle).rc == 0
    r = run_cli(capsys, "-q", "bundle", "sign", bundle, "--key", other_keys.key, "--cert", keys.chain)
    assert_refused(r, SIGNING)
    assert "does not belong" in r.err
    assert_refused(_verify(capsys, bundle, keys), SignatureError.exit_code)

