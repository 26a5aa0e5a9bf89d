"""Hostile and broken bundles through the CLI: each refused with one line and a distinct exit code,
nothing written, never a traceback."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from bundlekit import Keys, assert_refused, make_bundle, make_keys, mixed_data, resign, rootfs_payload, run_cli

from pitstop.ota import bundle_format as fmt
from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.bundle_spec import PayloadSpec

# Exit codes (docs/cli.md)
BUNDLE, LIMIT, SIGNATURE, TRUST, TIME, COMPAT, DOWNGRADE, PAYLOAD, UNSAFE = 10, 11, 12, 13, 14, 15, 16, 17, 18
REFUSALS = {BUNDLE, LIMIT, SIGNATURE, TRUST, TIME, COMPAT, DOWNGRADE, PAYLOAD, UNSAFE}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("good")
    data = mixed_data(600_000, seed=7)
    files = d / "tree"
    (files / "sub").mkdir(parents=True)
    (files / "sub" / "a.txt").write_text("hello")
    model = d / "det.onnx"
    model.write_bytes(mixed_data(50_000, seed=8))
    payloads = [
        rootfs_payload(d / "rootfs.img", data),
        PayloadSpec("config", "files", files, "etc/app"),
        PayloadSpec("det", "model", model, "models/det", {"input": "x"}),
    ]
    return make_bundle(d / "good.pitb", payloads, keys, chunking=(16384, 32768, 65536)), data


def verify(capsys: Any, keys: Keys, bundle: Path, *extra: str) -> Any:
    return run_cli(capsys, "-q", "bundle", "verify", "--keyring", keys.keyring, *extra, bundle)


def extract_leaves_nothing(capsys: Any, keys: Keys, bundle: Path, tmp: Path, code: int | set[int]) -> None:
    out = tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    before = sorted(out.iterdir())
    for name, dest in (("rootfs", out / "rootfs.img"), ("config", out / "config"), ("det", out / "det")):
        r = run_cli(capsys, "-q", "bundle", "extract", "--keyring", keys.keyring, bundle, name, "-o", dest)
        if r.rc == 0:
            before = sorted(out.iterdir())  # the damage may sit in another payload
            continue
        assert_refused(r, code)
        assert sorted(out.iterdir()) == before, f"extract of {name} left files behind"


def test_good_bundle_verifies(capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    assert verify(capsys, keys, good[0]).rc == 0


def _regions(bundle: Path) -> dict[str, tuple[int, int]]:
    with open(bundle, "rb") as f:
        pre = read_preamble(f)
    h = pre.header
    regions = {
        "header": (0, fmt.HEADER_SIZE),
        "manifest": (h.manifest_offset, h.manifest_size),
        "signature": (h.signature_offset, h.signature_size),
    }
    for p in pre.manifest.payloads:
        for part in ("index", "table", "data"):
            r = getattr(p, part)
            regions[f"{p.name}.{part}"] = (h.payload_offset + r.offset, r.size)
    return regions


def test_bit_flips_everywhere(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    """Flip one bit at positions drawn from every region of the file: always refused."""
    bundle, _ = good
    raw = bundle.read_bytes()
    rng = random.Random(1)
    positions = list(range(fmt.HEADER_SIZE))  # every header byte
    for start, size in _regions(bundle).values():
        positions += [start, start + size - 1] + [start + rng.randrange(size) for _ in range(12)]
    bad = tmp_path / "bad.pitb"
    for pos in sorted(set(positions)):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(flipped)
        r = verify(capsys, keys, bad)
        assert r.rc != 0, f"bit flip at offset {pos} was accepted"
        assert_refused(r, REFUSALS)


def test_bit_flips_never_leave_output(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    bundle, _ = good
    raw = bundle.read_bytes()
    bad = tmp_path / "bad.pitb"
    for name, (start, size) in _regions(bundle).items():
        flipped = bytearray(raw)
        flipped[start + size // 2] ^= 0x10
        bad.write_bytes(flipped)
        extract_leaves_nothing(capsys, keys, bad, tmp_path / name, REFUSALS)


def test_truncation_anywhere(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    bundle, _ = good
    raw = bundle.read_bytes()
    cuts = {0, 1, 7, 8, 63, 64, len(raw) - 1}
    for start, size in _regions(bundle).values():
        cuts |= {start, start + 1, start + size - 1, start + size // 2}
    bad = tmp_path / "cut.pitb"
    for cut in sorted(c for c in cuts if c < len(raw)):
        bad.write_bytes(raw[:cut])
        r = verify(capsys, keys, bad)
        assert_refused(r, {BUNDLE, SIGNATURE})
    bad.write_bytes(raw[: len(raw) // 2])
    extract_leaves_nothing(capsys, keys, bad, tmp_path, {BUNDLE, SIGNATURE})


def test_trailing_bytes(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    bad = tmp_path / "long.pitb"
    bad.write_bytes(good[0].read_bytes() + b"\0")
    assert_refused(verify(capsys, keys, bad), BUNDLE)


def test_unsigned(tmp_path: Path, capsys: Any, keys: Keys) -> None:
    b = make_bundle(tmp_path / "u.pitb", [rootfs_payload(tmp_path / "r", b"x" * 1000)], None)
    r = verify(capsys, keys, b)
    assert_refused(r, SIGNATURE)
    assert "not signed" in r.err
    extract_leaves_nothing(capsys, keys, b, tmp_path, SIGNATURE)
    # info still shows an unsigned bundle
    assert run_cli(capsys, "bundle", "info", b).rc == 0


def test_signed_outside_keyring(tmp_path: Path, capsys: Any, keys: Keys, other_keys: Keys) -> None:
    b = make_bundle(tmp_path / "o.pitb", [rootfs_payload(tmp_path / "r", b"x" * 1000)], other_keys)
    assert verify(capsys, other_keys, b).rc == 0
    r = verify(capsys, keys, b)
    assert_refused(r, TRUST)
    assert "keyring" in r.err
    extract_leaves_nothing(capsys, keys, b, tmp_path, TRUST)


def test_signature_from_another_key_with_our_chain(tmp_path: Path, capsys: Any, keys: Keys,
                                                     other_keys: Keys) -> None:
    """Our certificates in the block, a stranger's signature: the signature check catches it."""
    b = make_bundle(tmp_path / "o.pitb", [rootfs_payload(tmp_path / "r", b"x" * 1000)], other_keys)
    forged = resign(b, tmp_path / "f.pitb", other_keys)
    raw = forged.read_bytes()
    with open(forged, "rb") as f:
        pre = read_preamble(f)
    block = pre.signature_block()
    from pitstop.ota.trust import SignatureBlock

    fake = SignatureBlock(block.algorithm, block.signature, (keys.pki.signing, keys.pki.intermediate)).encode()
    h = pre.header
    header = fmt.encode_header(fmt.Header(h.manifest_size, len(fake), h.payload_area_size))
    (tmp_path / "x.pitb").write_bytes(header + pre.manifest_bytes + fake + raw[h.payload_offset:])
    assert_refused(verify(capsys, keys, tmp_path / "x.pitb"), SIGNATURE)


@pytest.mark.parametrize("which", ["expired", "not-yet-valid"])
def test_certificate_times(tmp_path: Path, capsys: Any, which: str) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    if which == "expired":
        kw = {"signing_not_before": now - timedelta(days=800), "signing_not_after": now - timedelta(days=400)}
    else:
        kw = {"signing_not_before": now + timedelta(days=400), "signing_not_after": now + timedelta(days=800)}
    k = make_keys(tmp_path / "k", **kw)
    # pitstop's own create refuses to sign outside the certificate's validity ...
    r = run_cli(capsys, "bundle", "create", "--version", "1.0.0", "--security-version", "1", "--compatible", "x",
                "--payload", f"rootfs:rootfs:{rootfs_payload(tmp_path / 'r', b'x' * 1000).source}", "-o",
                tmp_path / "t.pitb", "--key", k.key, "--cert", k.chain)
    assert_refused(r, 20)
    assert not (tmp_path / "t.pitb").exists()
    # ... so a producer that does not check makes the bundle here.
    unsigned = make_bundle(tmp_path / "u.pitb", [rootfs_payload(tmp_path / "r", b"x" * 1000)], None)
    b = resign(unsigned, tmp_path / "t.pitb", k)
    for clock in ("floor", "system"):
        assert_refused(verify(capsys, k, b, "--clock", clock), TIME)
    extract_leaves_nothing(capsys, k, b, tmp_path, TIME)
    assert verify(capsys, k, b, "--clock", "none").rc == 0


def test_wrong_compatible(capsys: Any, keys: Keys, good: tuple[Path, bytes], tmp_path: Path) -> None:
    r = verify(capsys, keys, good[0], "--compatible", "other-device")
    assert_refused(r, COMPAT)
    assert "other-device" in r.err and "pitstop-test" in r.err
    assert verify(capsys, keys, good[0], "--compatible", "pitstop-test").rc == 0


def test_security_version(capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    r = verify(capsys, keys, good[0], "--min-security-version", "2")
    assert_refused(r, DOWNGRADE)
    assert "downgrade" in r.err
    assert verify(capsys, keys, good[0], "--min-security-version", "1").rc == 0


# --- validly signed but inconsistent: a buggy or malicious producer -----------------------------------


def _p0(d: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = d["payloads"][0]
    return p


CASES: list[tuple[str, Any, int]] = [
    ("index past the file", lambda d: _p0(d)["index"].update(offset=10**9), BUNDLE),
    ("data longer than the area", lambda d: _p0(d)["data"].update(size=_p0(d)["data"]["size"] + 1), BUNDLE),
    ("absurd payload size", lambda d: _p0(d).update(size=2**62), LIMIT),
    ("absurd chunk count", lambda d: _p0(d).update(chunks=2**40), LIMIT),
    ("absurd area size", lambda d: d.update(payload_area_size=2**62), LIMIT),
    ("negative size", lambda d: _p0(d).update(size=-1), BUNDLE),
    ("size is a string", lambda d: _p0(d).update(size="12"), BUNDLE),
    ("size is a bool", lambda d: d.update(security_version=True), BUNDLE),
    ("duplicate payload names", lambda d: d["payloads"][1].update(name=_p0(d)["name"]), BUNDLE),
    ("payload hash wrong", lambda d: _p0(d).update(sha256="0" * 64), PAYLOAD),
    ("data hash wrong", lambda d: _p0(d)["data"].update(sha256="0" * 64), PAYLOAD),
    ("index hash wrong", lambda d: _p0(d)["index"].update(sha256="0" * 64), PAYLOAD),
    ("table hash wrong", lambda d: _p0(d)["table"].update(sha256="0" * 64), PAYLOAD),
    ("chunk count lies", lambda d: _p0(d).update(chunks=_p0(d)["chunks"] - 1), BUNDLE),
    ("files target traversal", lambda d: d["payloads"][1].update(target="../../etc"), UNSAFE),
    ("files target absolute", lambda d: d["payloads"][1].update(target="/etc"), UNSAFE),
    ("model target traversal", lambda d: d["payloads"][2].update(target="models/../../x"), UNSAFE),
    ("model file with a path", lambda d: d["payloads"][2]["model"].update(file="../det.onnx"), UNSAFE),
    ("unknown payload type", lambda d: _p0(d).update(type="firmware"), BUNDLE),
    ("bad version", lambda d: d.update(version="1.0"), BUNDLE),
    ("manifest not an object", lambda d: d.clear(), BUNDLE),
]


@pytest.mark.parametrize("name, mutate, code", CASES, ids=[c[0] for c in CASES])
def test_signed_but_inconsistent(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes], name: str,
                                 mutate: Any, code: int) -> None:
    bad = resign(good[0], tmp_path / "bad.pitb", keys, mutate)
    assert_refused(verify(capsys, keys, bad), code)
    extract_leaves_nothing(capsys, keys, bad, tmp_path, code)


def test_unknown_fields_are_kept(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    def add(d: dict[str, Any]) -> None:
        d["future_top"] = {"x": 1}
        _p0(d)["future_payload"] = [1, 2]

    b = resign(good[0], tmp_path / "future.pitb", keys, add)
    assert verify(capsys, keys, b).rc == 0
    import json

    r = run_cli(capsys, "bundle", "info", "--json", b)
    info = json.loads(r.out)
    assert info["manifest"]["future_top"] == {"x": 1}
    assert info["manifest"]["payloads"][0]["future_payload"] == [1, 2]


def test_chunk_table_pointing_outside(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    """A table whose sizes sum past the data region, re-hashed and re-signed: still refused."""
    import hashlib
    import struct

    bundle = good[0]
    with open(bundle, "rb") as f:
        pre = read_preamble(f)
        area = bytearray(f.read())
    p = pre.manifest.payloads[0]
    sizes = list(struct.unpack(f"<{p.chunks}I", area[p.table.offset:p.table.end]))
    sizes[-1] += 1000
    table = struct.pack(f"<{p.chunks}I", *sizes)
    area[p.table.offset:p.table.end] = table

    def fix(d: dict[str, Any]) -> None:
        _p0(d)["table"]["sha256"] = hashlib.sha256(table).hexdigest()

    bad = resign(bundle, tmp_path / "t.pitb", keys, fix, payload_area=bytes(area))
    r = verify(capsys, keys, bad)
    assert_refused(r, PAYLOAD)
    assert "outside" in r.err


def test_huge_header_lengths(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    raw = good[0].read_bytes()
    with open(good[0], "rb") as f:
        h = read_preamble(f).header
    for hdr, code in (
        (fmt.Header(2**40, h.signature_size, h.payload_area_size), LIMIT),
        (fmt.Header(h.manifest_size, 2**40, h.payload_area_size), LIMIT),
        (fmt.Header(0, h.signature_size, h.payload_area_size), BUNDLE),
    ):
        (tmp_path / "h.pitb").write_bytes(fmt.encode_header(hdr) + raw[64:])
        assert_refused(verify(capsys, keys, tmp_path / "h.pitb"), code)


def test_not_a_bundle_and_missing_file(tmp_path: Path, capsys: Any, keys: Keys) -> None:
    (tmp_path / "x").write_bytes(b"hello world" * 100)
    assert_refused(verify(capsys, keys, tmp_path / "x"), BUNDLE)
    assert_refused(verify(capsys, keys, tmp_path / "missing"), 4)
    assert_refused(run_cli(capsys, "bundle", "verify", "--keyring", tmp_path / "x", tmp_path / "x"), 21)


def test_corrupt_certificates_inside_a_wellformed_block(tmp_path: Path, capsys: Any, keys: Keys,
                                                        good: tuple[Path, bytes]) -> None:
    """Valid JSON and base64, damaged DER: the certificate parser's late errors become one line."""
    import base64
    import json

    raw = good[0].read_bytes()
    with open(good[0], "rb") as f:
        pre = read_preamble(f)
    h = pre.header
    block = json.loads(pre.signature_bytes)
    der = base64.b64decode(block["certificates"][0])
    rng = random.Random(5)
    for pos in sorted({rng.randrange(len(der)) for _ in range(60)} | set(range(0, len(der), 17))):
        bad = bytearray(der)
        bad[pos] ^= 0xFF
        block["certificates"][0] = base64.b64encode(bytes(bad)).decode()
        sig = json.dumps(block, sort_keys=True, separators=(",", ":")).encode()
        header = fmt.encode_header(fmt.Header(h.manifest_size, len(sig), h.payload_area_size))
        (tmp_path / "c.pitb").write_bytes(header + pre.manifest_bytes + sig + raw[h.payload_offset:])
        assert_refused(verify(capsys, keys, tmp_path / "c.pitb"), {SIGNATURE, TRUST, TIME})


def test_untrusted_signer_gets_nothing_parsed(tmp_path: Path, capsys: Any, keys: Keys, other_keys: Keys,
                                              good: tuple[Path, bytes]) -> None:
    """A stranger's correctly signed garbage manifest is refused for trust, before any parsing."""
    from pitstop.ota.signing import sign_manifest

    garbage = b'{"format": 1, "payloads": [[[[' + b"x" * 100
    sig = sign_manifest(other_keys.signer(), garbage).encode()
    (tmp_path / "g.pitb").write_bytes(fmt.encode_header(fmt.Header(len(garbage), len(sig), 0)) + garbage + sig)
    assert_refused(verify(capsys, keys, tmp_path / "g.pitb"), TRUST)
    # The same bytes from a trusted signer reach the parser, which refuses them as malformed.
    sig = sign_manifest(keys.signer(), garbage).encode()
    (tmp_path / "g.pitb").write_bytes(fmt.encode_header(fmt.Header(len(garbage), len(sig), 0)) + garbage + sig)
    assert_refused(verify(capsys, keys, tmp_path / "g.pitb"), BUNDLE)


def test_repeated_manifest_keys(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    from pitstop.ota.signing import sign_manifest

    raw = good[0].read_bytes()
    with open(good[0], "rb") as f:
        pre = read_preamble(f)
    h = pre.header
    mbytes = pre.manifest_bytes.replace(b'{"compatible":', b'{"compatible":"evil","compatible":', 1)
    sig = sign_manifest(keys.signer(), mbytes).encode()
    (tmp_path / "d.pitb").write_bytes(fmt.encode_header(fmt.Header(len(mbytes), len(sig), h.payload_area_size))
                                      + mbytes + sig + raw[h.payload_offset:])
    r = verify(capsys, keys, tmp_path / "d.pitb")
    assert_refused(r, BUNDLE)
    assert "repeats the key" in r.err


def test_info_reports_truncated_and_trailing(tmp_path: Path, capsys: Any, good: tuple[Path, bytes]) -> None:
    import json

    raw = good[0].read_bytes()
    for name, data, label in (("t", raw[:-100], "TRUNCATED"), ("l", raw + b"xx", "TRAILING BYTES")):
        (tmp_path / name).write_bytes(data)
        assert label in run_cli(capsys, "bundle", "info", tmp_path / name).out
        info = json.loads(run_cli(capsys, "bundle", "info", "--json", tmp_path / name).out)
        assert info["complete"] is False and info["size"] == len(data)
    info = json.loads(run_cli(capsys, "bundle", "info", "--json", good[0]).out)
    assert info["complete"] is True and info["verified"] is False


def test_unwritable_output_is_one_line(tmp_path: Path, capsys: Any, keys: Keys, good: tuple[Path, bytes]) -> None:
    r = run_cli(capsys, "-q", "bundle", "extract", "--keyring", keys.keyring, good[0], "rootfs", "-o",
                "/proc/pitstop-test.img")
    assert_refused(r, 4)
