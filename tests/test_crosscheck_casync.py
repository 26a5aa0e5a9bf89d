"""Cross-check the casync-compatible index and chunk store with Debian's real `casync`.

Forward: `pitstop bundle export-casync` writes an index and store that `casync extract` turns back
into the payload, byte for byte (and casync checks every chunk id while doing so).
Reverse: an index made by `casync make` parses with pitstop's decoder, with the layout casync used.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload, run_cli

from pitstop.ota import caibx
from pitstop.ota.bundle_reader import Policy, open_verified
from pitstop.ota.casync_export import chunk_path, export_casync
from pitstop.ota.clock import Clock, ClockPolicy
from pitstop.ota.keyring import load_keyring

PAYLOAD_SIZE = 6 * 1024 * 1024
CASYNC_CHUNKING = (16384, 65536, 262144)
# casync sets these on every index it makes; they describe how a directory *archive* was made
# (CA_FORMAT_EXCLUDE_NODUMP, CA_FORMAT_EXCLUDE_FILE) and mean nothing for a blob index.
CA_FORMAT_EXCLUDE_NODUMP = 0x8000000000000000
CA_FORMAT_EXCLUDE_FILE = 0x1000000000000000


def _casync(casync: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([casync, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def payload() -> bytes:
    return mixed_data(PAYLOAD_SIZE, seed=7)


@pytest.fixture
def bundle(tmp_path: Path, keys: Keys, payload: bytes) -> Path:
    return make_bundle(tmp_path / "b.pitb", [rootfs_payload(tmp_path / "rootfs.img", payload)], keys)


def _export(capsys: pytest.CaptureFixture[str], bundle: Path, keys: Keys, index: Path, store: Path) -> str:
    r = run_cli(capsys, "-q", "bundle", "export-casync", bundle, "rootfs", "--index", index, "--store", store,
                "--keyring", keys.keyring)
    assert r.rc == 0, r.err
    return r.out


def test_casync_extracts_exported_payload(tmp_path: Path, keys: Keys, bundle: Path, payload: bytes,
                                          tool: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    casync = tool("casync")
    index, store = tmp_path / "x.caibx", tmp_path / "store"
    out = _export(capsys, bundle, keys, index, store)
    chunk_files = sorted(store.rglob("*.cacnk"))
    assert len(chunk_files) > 20  # a multi-MiB payload really is many chunks
    assert f"({len(chunk_files)} new)" in out

    r = _casync(casync, "extract", "--seed-output=no", f"--store={store}", index, tmp_path / "out.img")
    assert r.returncode == 0, r.stderr
    extracted = (tmp_path / "out.img").read_bytes()
    assert len(extracted) == len(payload)
    assert extracted == payload


def test_casync_checks_our_chunk_ids(tmp_path: Path, keys: Keys, bundle: Path,
                                     tool: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    """casync must reject a store chunk whose content does not match its id: so the round trip above
    shows that casync reads our ids as SHA-256 of the uncompressed chunk (feature flags 0)."""
    casync = tool("casync")
    index, store = tmp_path / "x.caibx", tmp_path / "store"
    _export(capsys, bundle, keys, index, store)
    victim = sorted(store.rglob("*.cacnk"))[3]
    raw = bytearray(zstandard.ZstdDecompressor().decompress(victim.read_bytes(), max_output_size=1 << 22))
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(zstandard.ZstdCompressor().compress(bytes(raw)))
    r = _casync(casync, "extract", "--seed-output=no", f"--store={store}", index, tmp_path / "out.img")
    assert r.returncode != 0
    assert not (tmp_path / "out.img").exists()


def test_store_layout_and_index_match_bundle(tmp_path: Path, keys: Keys, bundle: Path, payload: bytes,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    index, store = tmp_path / "x.caibx", tmp_path / "store"
    _export(capsys, bundle, keys, index, store)
    idx = caibx.decode(index.read_bytes(), max_chunks=1 << 20, max_chunk_size=1 << 22)
    assert idx.feature_flags == 0
    assert idx.size == len(payload)
    assert {p.relative_to(store) for p in store.rglob("*.cacnk")} == {
        chunk_path(store, cid).relative_to(store) for cid in idx.ids
    }
    dctx = zstandard.ZstdDecompressor()
    for i, cid in enumerate(idx.ids):
        start, length = idx.chunk_span(i)
        data = dctx.decompress(chunk_path(store, cid).read_bytes(), max_output_size=1 << 22)
        assert data == payload[start:start + length]
        assert hashlib.sha256(data).digest() == cid


def test_second_export_writes_no_new_chunks(tmp_path: Path, keys: Keys, bundle: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    first = _export(capsys, bundle, keys, tmp_path / "a.caibx", store)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*.cacnk")}
    second = _export(capsys, bundle, keys, tmp_path / "b.caibx", store)
    assert "(0 new)" in second, second
    assert "(0 new)" not in first
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.cacnk")} == before
    assert (tmp_path / "a.caibx").read_bytes() == (tmp_path / "b.caibx").read_bytes()

    # The library call says the same through its return value.
    clock = Clock(ClockPolicy.FLOOR, datetime.now(UTC))
    with open(bundle, "rb") as f:
        vp = open_verified(f, Policy(load_keyring(keys.keyring), clock))
        assert export_casync(f, vp.manifest, "rootfs", tmp_path / "c.caibx", store) == 0
    # And into an empty store, every chunk is new.
    with open(bundle, "rb") as f:
        vp = open_verified(f, Policy(load_keyring(keys.keyring), clock))
        written = export_casync(f, vp.manifest, "rootfs", tmp_path / "d.caibx", tmp_path / "fresh")
    assert written == vp.manifest.payload("rootfs").chunks == len(before)


def _casync_make(casync: str, tmp_path: Path, payload: bytes, digest: str) -> tuple[Path, Path, Path]:
    blob = tmp_path / "payload.img"
    blob.write_bytes(payload)
    index, store = tmp_path / f"{digest}.caibx", tmp_path / f"S-{digest}"
    r = _casync(casync, "make", f"--digest={digest}", "--chunk-size={}:{}:{}".format(*CASYNC_CHUNKING),
                f"--store={store}", index, blob)
    assert r.returncode == 0, r.stderr
    return blob, index, store


def _without_archive_flags(data: bytes) -> bytes:
    flags = struct.unpack_from("<Q", data, 16)[0]
    return data[:16] + struct.pack("<Q", flags & ~(CA_FORMAT_EXCLUDE_NODUMP | CA_FORMAT_EXCLUDE_FILE)) + data[24:]


@pytest.mark.parametrize("digest", ["sha256", "sha512-256"])
def test_decoder_reads_casync_index_layout(tmp_path: Path, payload: bytes, digest: str,
                                           tool: Callable[[str], str]) -> None:
    """casync's own index, layout-wise: header, chunk sizes, end offsets, ids, tail.

    The archive-only feature bits casync always sets are cleared first (the next test reads the untouched index);
    everything else is casync's bytes as written."""
    casync = tool("casync")
    _, index, store = _casync_make(casync, tmp_path, payload, digest)
    raw = index.read_bytes()
    raw_flags = struct.unpack_from("<Q", raw, 16)[0]
    idx = caibx.decode(_without_archive_flags(raw), max_chunks=1 << 20, max_chunk_size=1 << 22)

    assert bool(raw_flags & caibx.CA_FORMAT_SHA512_256) == (digest == "sha512-256")
    assert idx.feature_flags == (caibx.CA_FORMAT_SHA512_256 if digest == "sha512-256" else 0)
    assert (idx.chunk_min, idx.chunk_avg, idx.chunk_max) == CASYNC_CHUNKING
    assert len(idx) > 20
    assert all(a < b for a, b in zip((0, *idx.ends), idx.ends, strict=False))
    assert idx.size == idx.ends[-1] == len(payload)
    assert len(raw) == caibx.encoded_size(len(idx))
    # Our encoder writes exactly casync's bytes back (with the same flags).
    assert caibx.encode(idx) == _without_archive_flags(raw)

    # The ids are what casync stored, and hash the corresponding slice of the payload.
    dctx = zstandard.ZstdDecompressor()
    for i, cid in enumerate(idx.ids):
        start, length = idx.chunk_span(i)
        data = dctx.decompress(chunk_path(store, cid).read_bytes(), max_output_size=1 << 22)
        assert data == payload[start:start + length]
        h = hashlib.new("sha512_256", data) if digest == "sha512-256" else hashlib.sha256(data)
        assert h.digest() == cid


def test_decoder_accepts_unmodified_casync_index(tmp_path: Path, payload: bytes, tool: Callable[[str], str]) -> None:
    casync = tool("casync")
    _, index, _ = _casync_make(casync, tmp_path, payload[: 1 << 20], "sha256")
    idx = caibx.decode(index.read_bytes(), max_chunks=1 << 20, max_chunk_size=1 << 22)
    assert idx.size == 1 << 20
