"""`bundle create` from a TOML spec or flags: a good spec builds; every bad one fails before writing,
naming the file and the key."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from bundlekit import Keys, mixed_data, run_cli

from pitstop.progress import Progress

SPEC_OK = """
version = "2.1.0"
security_version = 7
compatible = "acme-ipc-x86_64"
description = "field release"

[chunking]
min = 8192
avg = 32768
max = 131072

[compression]
level = 5

[[payload]]
name = "rootfs"
type = "rootfs"
source = "rootfs.img"

[[payload]]
name = "detector"
type = "model"
source = "det.onnx"
target = "models/detector"
[payload.description]
input = "x"
shape = [1, 3, 320, 320]

[[payload]]
name = "config"
type = "files"
source = "overlay"
target = "etc/pitstop"
"""


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "rootfs.img").write_bytes(mixed_data(400_000, seed=11))
    (tmp_path / "det.onnx").write_bytes(b"onnx" * 1000)
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "system.toml").write_text("compatible = 'x'\n")
    (tmp_path / "spec.toml").write_text(SPEC_OK)
    return tmp_path


def test_spec_builds_and_info_shows_it(spec_dir: Path, keys: Keys, capsys: Any) -> None:
    out = spec_dir / "b.pitb"
    r = run_cli(capsys, "-q", "bundle", "create", spec_dir / "spec.toml", "-o", out, "--key", keys.key,
                "--cert", keys.chain)
    assert r.rc == 0, r.err
    info = json.loads(run_cli(capsys, "bundle", "info", "--json", out).out)
    m = info["manifest"]
    assert (m["version"], m["security_version"], m["compatible"]) == ("2.1.0", 7, "acme-ipc-x86_64")
    assert [p["name"] for p in m["payloads"]] == ["rootfs", "detector", "config"]
    assert m["payloads"][0]["chunking"] == {"min": 8192, "avg": 32768, "max": 131072}
    assert m["payloads"][1]["model"] == {"file": "det.onnx", "description": {"input": "x",
                                                                             "shape": [1, 3, 320, 320]}}
    assert info["signer"]["subject"].endswith("CN=pitstop dev signing") or "signing" in info["signer"]["subject"]
    text = run_cli(capsys, "bundle", "info", out).out
    assert "acme-ipc-x86_64" in text and "detector" in text and "models/detector" in text
    r = run_cli(capsys, "-q", "bundle", "extract", "--keyring", keys.keyring, out, "detector", "-o",
                spec_dir / "det")
    assert r.rc == 0, r.err
    assert (spec_dir / "det" / "det.onnx").read_bytes() == b"onnx" * 1000
    assert json.loads((spec_dir / "det" / "model.json").read_text())["description"]["input"] == "x"


def test_reproducible_with_source_date_epoch(spec_dir: Path, keys: Keys, capsys: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1790000000")
    outs = []
    for name in ("a.pitb", "b.pitb"):
        r = run_cli(capsys, "-q", "bundle", "create", spec_dir / "spec.toml", "-o", spec_dir / name)
        assert r.rc == 0, r.err
        outs.append((spec_dir / name).read_bytes())
    assert outs[0] == outs[1], "unsigned bundles of the same inputs must be byte-identical"


BAD = [
    ('version = "2.1.0"', 'version = "1"', "version"),
    ("security_version = 7", "security_version = -1", "security_version"),
    ("security_version = 7", 'security_version = "7"', "must be a whole number"),
    ('description = "field release"', 'description = "x"\ncolour = "red"', "unknown key(s) colour"),
    ("min = 8192", "min = 10", "chunk sizes"),
    ("min = 8192", "min = 8192\nwindow = 10", "window"),
    ("level = 5", "level = 99", "level"),
]


@pytest.mark.parametrize("old, new, message", BAD, ids=[b[2] for b in BAD])
def test_bad_top_level(spec_dir: Path, capsys: Any, old: str, new: str, message: str) -> None:
    (spec_dir / "bad.toml").write_text(SPEC_OK.replace(old, new, 1))
    r = run_cli(capsys, "bundle", "create", spec_dir / "bad.toml", "-o", spec_dir / "o.pitb")
    assert r.rc == 19, r.err
    assert "bad.toml" in r.err and message in r.err, r.err
    assert not (spec_dir / "o.pitb").exists()
    assert not [p for p in spec_dir.iterdir() if p.name.startswith(".")]


PAYLOAD_BAD = [
    ('source = "rootfs.img"', 'source = "missing.img"', "missing.img"),
    ('type = "rootfs"', 'type = "firmware"', "firmware"),
    ('target = "models/detector"', 'target = "../detector"', "target"),
    ('target = "etc/pitstop"', 'target = "/etc/pitstop"', "absolute"),
    ('name = "config"', 'name = "rootfs"', "duplicate"),
    ('name = "config"', 'name = "bad name"', "invalid payload name"),
    ('source = "overlay"', 'source = "rootfs.img"', "not a directory"),
    ('name = "rootfs"', 'name = "rootfs"\ncolour = 1', "colour"),
]


@pytest.mark.parametrize("old, new, message", PAYLOAD_BAD, ids=[b[2] for b in PAYLOAD_BAD])
def test_bad_payloads(spec_dir: Path, capsys: Any, old: str, new: str, message: str) -> None:
    (spec_dir / "bad.toml").write_text(SPEC_OK.replace(old, new, 1))
    r = run_cli(capsys, "bundle", "create", spec_dir / "bad.toml", "-o", spec_dir / "o.pitb")
    assert r.rc == 19, r.err
    assert "bad.toml" in r.err and message in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


def test_not_toml(spec_dir: Path, capsys: Any) -> None:
    (spec_dir / "bad.toml").write_text("version = ")
    r = run_cli(capsys, "bundle", "create", spec_dir / "bad.toml", "-o", spec_dir / "o.pitb")
    assert r.rc == 19 and "not valid TOML" in r.err


def test_flags(spec_dir: Path, keys: Keys, capsys: Any) -> None:
    out = spec_dir / "f.pitb"
    r = run_cli(capsys, "-q", "bundle", "create", "--version", "1.0.0", "--security-version", "1", "--compatible",
                "x", "--payload", f"rootfs:rootfs:{spec_dir / 'rootfs.img'}", "--payload",
                f"files:cfg:{spec_dir / 'overlay'}:etc/cfg", "--chunk-size", "4096:16384:65536", "-o", out,
                "--key", keys.key, "--cert", keys.chain)
    assert r.rc == 0, r.err
    assert run_cli(capsys, "-q", "bundle", "verify", "--keyring", keys.keyring, out).rc == 0
    common = ["--version", "1.0.0", "--security-version", "1", "--compatible", "x"]
    for args, msg in (
        ([*common, "--payload", "rootfs:rootfs"], "TYPE:NAME:SOURCE"),
        ([*common, "--payload", f"rootfs:r:{spec_dir / 'rootfs.img'}", "--chunk-size", "1:2"], "MIN:AVG:MAX"),
        (["--version", "1.0.0"], "required"),
    ):
        r = run_cli(capsys, "bundle", "create", *args, "-o", spec_dir / "x.pitb")
        assert r.rc in (2, 19) and msg in r.err, (args, r.err)


def test_usage_errors_are_one_line(capsys: Any, spec_dir: Path, keys: Keys) -> None:
    for args in (["bundle"], ["bundle", "frobnicate"], ["bundle", "verify"], ["bundle", "sign", "x.pitb"]):
        r = run_cli(capsys, *args)
        assert r.rc == 2, (args, r.err)
        assert "Traceback" not in r.err
    r = run_cli(capsys, "bundle", "create", spec_dir / "spec.toml", "-o", spec_dir / "o.pitb", "--key", keys.key)
    assert r.rc == 2 and "--cert" in r.err


def test_signing_key_must_match_certificate(spec_dir: Path, keys: Keys, other_keys: Keys, capsys: Any) -> None:
    r = run_cli(capsys, "bundle", "create", spec_dir / "spec.toml", "-o", spec_dir / "o.pitb", "--key",
                other_keys.key, "--cert", keys.chain)
    assert r.rc == 20 and "does not belong" in r.err
    assert not (spec_dir / "o.pitb").exists()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal() -> None:
    s = _Tty()
    p = Progress("verify", 1000, stream=s)
    p.update(500)
    p.update(500)
    p.finish()
    out = s.getvalue()
    assert out.startswith("\rverify [") and "100.0%" in out and out.endswith("\n")


def test_progress_logs_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pitstop.progress")
    s = io.StringIO()
    p = Progress("create", 1000, stream=s)
    for _ in range(10):
        p.update(100)
    p.finish()
    assert s.getvalue() == ""
    msgs = [r.getMessage() for r in caplog.records]
    assert any("50%" in m for m in msgs) and "done" in msgs[-1]
    assert len(msgs) <= 11


def test_flag_ranges_and_mixing(spec_dir: Path, capsys: Any) -> None:
    common = ["--version", "1.0.0", "--security-version", "1", "--compatible", "x", "--payload",
              f"rootfs:r:{spec_dir / 'rootfs.img'}", "-o", spec_dir / "x.pitb"]
    for level in ("100", "0", "-3"):
        r = run_cli(capsys, "bundle", "create", *common, "--zstd-level", level)
        assert r.rc == 19 and "--zstd-level" in r.err, r.err
    for extra in (["--zstd-level", "5"], ["--chunk-size", "1:2:3"], ["--description", "x"]):
        r = run_cli(capsys, "bundle", "create", spec_dir / "spec.toml", *extra, "-o", spec_dir / "x.pitb")
        assert r.rc == 2 and "not both" in r.err, r.err
    assert not (spec_dir / "x.pitb").exists()


def test_model_file_may_not_be_named_like_its_description(spec_dir: Path, capsys: Any) -> None:
    (spec_dir / "model.json").write_bytes(b"{}")
    r = run_cli(capsys, "bundle", "create", "--version", "1.0.0", "--security-version", "1", "--compatible", "x",
                "--payload", f"model:m:{spec_dir / 'model.json'}", "-o", spec_dir / "x.pitb")
    assert r.rc == 19 and "model.json" in r.err, r.err


def test_default_chunking_follows_the_payloads(spec_dir: Path) -> None:
    """A bundle with a rootfs image gets the chunking tuned for file system images (docs/delta.md); one without
    gets casync's; a [chunking] table that names some keys takes the others from that default."""
    from pitstop.ota import bundle_format as fmt
    from pitstop.ota.bundle_spec import load_spec, parse_payload_flag, spec_from_flags

    rootfs = parse_payload_flag(f"rootfs:rootfs:{spec_dir / 'rootfs.img'}")
    files = parse_payload_flag(f"files:cfg:{spec_dir / 'overlay'}:etc/cfg")
    assert spec_from_flags("1.0.0", 1, "x", [rootfs, files]).chunking == fmt.FS_IMAGE_CHUNKING
    casync = (fmt.CHUNK_MIN_DEFAULT, fmt.CHUNK_AVG_DEFAULT, fmt.CHUNK_MAX_DEFAULT)
    assert spec_from_flags("1.0.0", 1, "x", [files]).chunking == casync
    text = SPEC_OK.replace("min = 8192\navg = 32768\nmax = 131072\n", "max = 131072\n")
    (spec_dir / "partial.toml").write_text(text)
    assert load_spec(spec_dir / "partial.toml").chunking == (*fmt.FS_IMAGE_CHUNKING[:2], 131072)
