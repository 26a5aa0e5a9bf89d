"""Test helpers: a development PKI, bundle building, and re-signing tampered manifests.

A bundle re-signed by a trusted key after its manifest was altered models a malicious or buggy
producer: the device must still refuse anything inconsistent.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pitstop.cli import main as cli_main
from pitstop.ota import bundle_format as fmt
from pitstop.ota import devkeys
from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.bundle_spec import BundleSpec, PayloadSpec
from pitstop.ota.bundle_writer import create_bundle
from pitstop.ota.signing import KeyFileSigner, sign_manifest


@dataclass(frozen=True)
class Keys:
    dir: Path
    pki: devkeys.DevPki

    @property
    def keyring(self) -> Path:
        return self.dir / "keyring.pem"

    @property
    def key(self) -> Path:
        return self.dir / "signing.key"

    @property
    def chain(self) -> Path:
        return self.dir / "chain.pem"

    def signer(self) -> KeyFileSigner:
        return KeyFileSigner.load(self.key, [self.chain])


def make_keys(path: Path, kind: str = "ecdsa-p256", **kw: Any) -> Keys:
    pki = devkeys.make_dev_pki(kind, **kw)
    devkeys.write_dev_pki(pki, path)
    return Keys(path, pki)


def mixed_data(size: int, seed: int = 0) -> bytes:
    """Partly compressible, partly random bytes (like a filesystem image)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.random()
        n = rng.randint(1, 64) * 1024
        if kind < 0.4:
            out += rng.randbytes(n)
        elif kind < 0.7:
            out += bytes(n)
        else:
            words = [b"pitstop", b"slot", b"rootfs", b"kernel", b"\n", b"update", b"grub"]
            out += b" ".join(rng.choice(words) for _ in range(n // 6))[:n]
    return bytes(out[:size])


def make_bundle(
    out: Path,
    payloads: Sequence[PayloadSpec],
    keys: Keys | None,
    *,
    version: str = "1.0.0",
    security_version: int = 1,
    compatible: str = "pitstop-test",
    chunking: tuple[int, int, int] = (fmt.CHUNK_MIN_DEFAULT, fmt.CHUNK_AVG_DEFAULT, fmt.CHUNK_MAX_DEFAULT),
) -> Path:
    spec = BundleSpec(version, security_version, compatible, tuple(payloads), chunking=chunking)
    create_bundle(spec, out, keys.signer() if keys else None)
    return out


def rootfs_payload(path: Path, data: bytes, name: str = "rootfs") -> PayloadSpec:
    path.write_bytes(data)
    return PayloadSpec(name, "rootfs", path, "rootfs")


def resign(
    bundle: Path,
    out: Path,
    keys: Keys,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    payload_area: bytes | None = None,
) -> Path:
    """Rewrite `bundle` with a manifest changed by `mutate` (and optionally another payload area),
    signed by `keys`; header sizes are recomputed so only the intended inconsistency remains."""
    with open(bundle, "rb") as f:
        pre = read_preamble(f)
        area = f.read() if payload_area is None else payload_area
    d = json.loads(pre.manifest_bytes)
    if mutate:
        mutate(d)
    mbytes = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    sig = sign_manifest(keys.signer(), mbytes).encode()
    area_size = d.get("payload_area_size", len(area))
    header = fmt.encode_header(fmt.Header(len(mbytes), len(sig), area_size if isinstance(area_size, int) else 0))
    out.write_bytes(header + mbytes + sig + area)
    return out


@dataclass(frozen=True)
class CliResult:
    rc: int
    out: str
    err: str


def assert_refused(r: CliResult, code: int | set[int]) -> None:
    """An expected failure as users see it: the exit code, one `pitstop: error:` line, no traceback."""
    codes = code if isinstance(code, set) else {code}
    assert r.rc in codes, (r.rc, r.err)
    assert "Traceback" not in r.err
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pitstop: error: "), r.err


def run_cli(capsys: Any, *args: str | os.PathLike[str]) -> CliResult:
    """Run `pitstop ARGS` in-process; a traceback escaping main() fails the test by itself."""
    try:
        rc = cli_main([os.fspath(a) for a in args])
    except SystemExit as e:
        rc = int(e.code or 0)
    cap = capsys.readouterr()
    return CliResult(rc, cap.out, cap.err)


def payload_area(bundle: Path) -> tuple[int, bytes]:
    data = bundle.read_bytes()
    pre = read_preamble(io.BytesIO(data))
    return pre.header.payload_offset, data[pre.header.payload_offset:]
