"""Bundle round trips at the size extremes: empty, tiny, exactly one maximal chunk, just over it, and
(marked slow) a payload over 1 GiB that is never held in memory; plus an empty `files` tree and a
`model` payload extracted to a directory.

Every round trip is create → `pitstop bundle verify` → `pitstop bundle extract`, through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from bundlekit import Keys, make_bundle, run_cli

from pitstop.ota import bundle_format as fmt
from pitstop.ota.bundle_spec import PayloadSpec

DEFAULT_CHUNKING = (fmt.CHUNK_MIN_DEFAULT, fmt.CHUNK_AVG_DEFAULT, fmt.CHUNK_MAX_DEFAULT)
# The largest chunking a bundle may use: max chunk = the reader's hard cap.
LIMIT_MAX = fmt.DEFAULT_LIMITS.max_chunk_size
LIMIT_CHUNKING = (LIMIT_MAX // 4, LIMIT_MAX // 2, LIMIT_MAX)


def one_chunk_data(cmin: int, size: int, seed: int) -> bytes:
    """`size` bytes that FastCDC keeps in one chunk as long as size <= max: random bytes only in the
    first `cmin` bytes (where no cut point is ever tested), then zeros (no cut point found there either:
    the gear hash over a run of zeros is constant and does not match the mask)."""
    rng = random.Random(seed)
    head = min(size, cmin - 128)
    return rng.randbytes(head) + bytes(size - head)


def info(capsys: Any, bundle: Path) -> dict[str, Any]:
    r = run_cli(capsys, "bundle", "info", "--json", bundle)
    assert r.rc == 0, r.err
    return json.loads(r.out)


def verify_ok(capsys: Any, keys: Keys, bundle: Path) -> None:
    r = run_cli(capsys, "-q", "bundle", "verify", "--keyring", keys.keyring, bundle)
    assert r.rc == 0, r.err
    assert ": OK" in r.out


def extract_ok(capsys: Any, keys: Keys, bundle: Path, name: str, out: Path) -> None:
    r = run_cli(capsys, "-q", "bundle", "extract", "--keyring", keys.keyring, bundle, name, "-o", out)
    assert r.rc == 0, r.err
    assert f"extracted payload {name!r}" in r.out


# --- edge sizes (fast) -----------------------------------------------------------------------------------

EDGE_CASES = [
    # id, data factory, chunking, expected chunk count
    ("empty", lambda: b"", DEFAULT_CHUNKING, 0),
    ("one-byte", lambda: b"\x5a", DEFAULT_CHUNKING, 1),
    ("one-max-chunk",
     lambda: one_chunk_data(DEFAULT_CHUNKING[0], DEFAULT_CHUNKING[2], 1), DEFAULT_CHUNKING, 1),
    ("just-over-one-chunk",
     lambda: one_chunk_data(DEFAULT_CHUNKING[0], DEFAULT_CHUNKING[2], 2) + b"\x01", DEFAULT_CHUNKING, 2),
    ("over-one-chunk-by-1k",
     lambda: one_chunk_data(DEFAULT_CHUNKING[0], DEFAULT_CHUNKING[2], 3) + random.Random(3).randbytes(1000),
     DEFAULT_CHUNKING, 2),
    ("one-chunk-at-format-cap",
     lambda: one_chunk_data(LIMIT_CHUNKING[0], LIMIT_MAX, 4), LIMIT_CHUNKING, 1),
    ("just-over-chunk-at-format-cap",
     lambda: one_chunk_data(LIMIT_CHUNKING[0], LIMIT_MAX, 5) + b"\xff" * 7, LIMIT_CHUNKING, 2),
]


@pytest.mark.parametrize(("factory", "chunking", "chunks"), [c[1:] for c in EDGE_CASES],
                         ids=[c[0] for c in EDGE_CASES])
def test_rootfs_edge_sizes(tmp_path: Path, keys: Keys, capsys: Any, factory: Any,
                           chunking: tuple[int, int, int], chunks: int) -> None:
    data: bytes = factory()
    src = tmp_path / "rootfs.img"
    src.write_bytes(data)
    bundle = make_bundle(tmp_path / "b.pitb", [PayloadSpec("rootfs", "rootfs", src, "rootfs")], keys,
                         chunking=chunking)

    (p,) = info(capsys, bundle)["manifest"]["payloads"]
    assert p["size"] == len(data)
    assert p["sha256"] == hashlib.sha256(data).hexdigest()
    assert p["chunks"] == chunks, "the data did not chunk as this test intends"

    verify_ok(capsys, keys, bundle)
    out = tmp_path / "out.img"
    extract_ok(capsys, keys, bundle, "rootfs", out)
    assert out.read_bytes() == data


def test_empty_files_directory(tmp_path: Path, keys: Keys, capsys: Any) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    bundle = make_bundle(tmp_path / "b.pitb", [PayloadSpec("cfg", "files", src, "etc/cfg")], keys)
    verify_ok(capsys, keys, bundle)
    out = tmp_path / "out"
    extract_ok(capsys, keys, bundle, "cfg", out)
    assert out.is_dir()
    assert list(out.iterdir()) == []
    # Nothing but the result is left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pitb", "out", "tree"]


def test_model_payload_to_directory(tmp_path: Path, keys: Keys, capsys: Any) -> None:
    model = random.Random(7).randbytes(200_000) + bytes(150_000)
    src = tmp_path / "det.onnx"
    src.write_bytes(model)
    desc = {"inputs": [{"name": "images", "shape": [1, 3, 640, 640], "dtype": "float32"}],
            "outputs": [{"name": "boxes"}], "runtime": "tensorrt"}
    bundle = make_bundle(tmp_path / "b.pitb", [PayloadSpec("det", "model", src, "models/det", desc)], keys)

    (p,) = info(capsys, bundle)["manifest"]["payloads"]
    assert p["type"] == "model"
    assert p["target"] == "models/det"
    assert p["model"] == {"file": "det.onnx", "description": desc}

    verify_ok(capsys, keys, bundle)
    out = tmp_path / "det"
    extract_ok(capsys, keys, bundle, "det", out)
    assert sorted(p.name for p in out.iterdir()) == ["det.onnx", "model.json"]
    assert (out / "det.onnx").read_bytes() == model
    meta = json.loads((out / "model.json").read_text())
    assert meta == {"name": "det", "file": "det.onnx", "sha256": hashlib.sha256(model).hexdigest(),
                    "description": desc}


# --- over 1 GiB (slow) -----------------------------------------------------------------------------------

LARGE_SIZE = (1 << 30) + 12_345  # over 1 GiB and not a multiple of anything the chunker likes
_BLOCK = 1 << 20


def write_large_payload(path: Path, size: int, seed: int) -> str:
    """Write `size` bytes of filesystem-like data in 1 MiB pieces; return its SHA-256.

    Per block: random bytes (~35%), zeros with a 64-byte random island (~35%, sparse-ish but no two
    alike), or a text-like pattern at a random phase (~30%), so chunks differ and zstd has work to do."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    text = b" ".join(rng.choice([b"usr", b"lib", b"libc.so.6", b"pitstop", b"\n", b"ELF", b"rootfs"])
                     for _ in range(40_000))
    written = 0
    with open(path, "wb") as f:
        while written < size:
            n = min(_BLOCK, size - written)
            kind = rng.random()
            if kind < 0.35:
                block = rng.randbytes(n)
            elif kind < 0.70:
                # zeros with a small random island, so no two "empty" regions are identical
                island = rng.randbytes(64)
                at = rng.randrange(0, max(1, n - 64))
                block = (bytes(at) + island + bytes(n))[:n]
            else:
                start = rng.randrange(0, len(text) // 2)
                block = (text[start:] * (n // (len(text) - start) + 2))[:n]
            f.write(block)
            h.update(block)
            written += n
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(_BLOCK * 8):
            h.update(buf)
    return h.hexdigest()


@pytest.mark.slow
def test_large_rootfs_roundtrip(tmp_path: Path, keys: Keys, capsys: Any) -> None:
    src = tmp_path / "rootfs.img"
    t0 = time.monotonic()
    digest = write_large_payload(src, LARGE_SIZE, seed=1234)
    assert src.stat().st_size == LARGE_SIZE
    t1 = time.monotonic()

    bundle = tmp_path / "b.pitb"
    r = run_cli(capsys, "-q", "bundle", "create", "-o", bundle, "--version", "2.0.0", "--security-version", "3",
                "--compatible", "pitstop-test", "--payload", f"rootfs:rootfs:{src}",
                "--key", keys.key, "--cert", keys.chain)
    assert r.rc == 0, r.err
    t2 = time.monotonic()

    (p,) = info(capsys, bundle)["manifest"]["payloads"]
    assert p["size"] == LARGE_SIZE
    assert p["sha256"] == digest
    assert p["chunks"] > LARGE_SIZE // fmt.CHUNK_MAX_DEFAULT
    assert p["data"]["size"] < LARGE_SIZE  # the zero and text blocks compress

    verify_ok(capsys, keys, bundle)
    t3 = time.monotonic()
    out = tmp_path / "out.img"
    extract_ok(capsys, keys, bundle, "rootfs", out)
    t4 = time.monotonic()

    assert out.stat().st_size == LARGE_SIZE
    assert sha256_file(out) == digest
    with capsys.disabled():
        print(f"\n{LARGE_SIZE} bytes: generate {t1 - t0:.1f}s, create {t2 - t1:.1f}s, verify {t3 - t2:.1f}s, "
              f"extract {t4 - t3:.1f}s; bundle {bundle.stat().st_size} bytes, {p['chunks']} chunks")
