"""`files` payloads: faithful round trips, and refusal of anything that could escape the destination.

Creation must refuse trees that cannot be represented safely; extraction must refuse crafted archives
(a malicious or buggy producer holding a trusted key) without writing anything outside the
destination, without leaving the destination or temporaries behind, and with a one-line error.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from bundlekit import CliResult, Keys, assert_refused, make_bundle, resign, run_cli

import pitstop.ota.bundle_writer as bundle_writer
from pitstop.ota import bundle_format as fmt
from pitstop.ota.bundle_spec import PayloadSpec, check_payload
from pitstop.ota.errors import BundleError, BundleLimitError, SpecError, UnsafePathError
from pitstop.ota.files_archive import extract_tree

UNSAFE = UnsafePathError.exit_code
BAD = BundleError.exit_code
SPEC = SpecError.exit_code
LONG_NAME = "L" * 120 + ".txt"  # > 100 (ustar's limit), <= 128 (our per-component cap)


# --- helpers -------------------------------------------------------------------------------------------


@pytest.fixture
def ro_cleanup() -> Iterator[list[Path]]:
    """Directories made read-only by a test are made writable again so the tmp dir can be removed."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        for dirpath, _, _ in os.walk(p):
            if not os.path.islink(dirpath):
                os.chmod(dirpath, 0o755)


def make_tree(root: Path, ro: list[Path]) -> Path:
    root.mkdir()
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.bin").write_bytes(bytes(range(256)) * 300)
    (root / "a" / "top.txt").write_text("top\n")
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    run = root / "bin" / "run.sh"
    run.parent.mkdir()
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (root / "private.key").write_text("secret")
    (root / "private.key").chmod(0o600)
    ro_dir = root / "ro"
    ro_dir.mkdir()
    (ro_dir / "one").write_text("1")
    (ro_dir / "sub").mkdir()
    (ro_dir / "sub" / "two").write_text("2")
    ro_dir.chmod(0o555)
    ro.append(root)
    os.symlink("../a/top.txt", root / "bin" / "top-link")
    os.symlink("b/c", root / "a" / "c-link")
    os.symlink("a", root / "a-link")
    (root / "Grüße-ñ-日本語.txt").write_text("unicode ✓\n", encoding="utf-8")
    (root / "a" / "b" / LONG_NAME).write_text("long")
    nested = root / ("n" * 60) / ("m" * 60)
    nested.mkdir(parents=True)
    (nested / ("f" * 60)).write_text("long path")  # a path of ~180 characters
    return root


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    content: bytes | str | None


def snapshot(root: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Entry("symlink", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = Entry("dir", stat.S_IMODE(st.st_mode), None)
            else:
                assert stat.S_ISREG(st.st_mode), rel
                out[rel] = Entry("file", stat.S_IMODE(st.st_mode), full.read_bytes())
    return out


def extract(capsys: pytest.CaptureFixture[str], bundle: Path, keys: Keys, out: Path,
            payload: str = "files") -> CliResult:
    return run_cli(capsys, "-q", "bundle", "extract", bundle, payload, "-o", out, "--keyring", keys.keyring)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


# --- round trip ------------------------------------------------------------------------------------------


def test_round_trip_preserves_tree(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str],
                                   ro_cleanup: list[Path]) -> None:
    src = make_tree(tmp_path / "src", ro_cleanup)
    bundle = make_bundle(tmp_path / "b.pitb", [PayloadSpec("files", "files", src, "opt/app")], keys)
    out = tmp_path / "x" / "out"
    out.parent.mkdir()
    r = extract(capsys, bundle, keys, out)
    ro_cleanup.append(out)
    assert r.rc == 0, r.err

    expected, got = snapshot(src), snapshot(out)
    assert set(got) == set(expected)
    for rel, e in expected.items():
        assert got[rel] == e, rel
    # Spot checks, so that a bug in snapshot() cannot make the comparison vacuous.
    assert got["empty-dir"].kind == "dir"
    assert got["empty-file"] == Entry("file", 0o644, b"")
    assert got["bin/run.sh"].mode == 0o755
    assert got["private.key"].mode == 0o600
    assert got["ro"] == Entry("dir", 0o555, None)
    assert got["ro/sub/two"].content == b"2"
    assert got["bin/top-link"] == Entry("symlink", 0, "../a/top.txt")
    assert (out / "bin" / "top-link").read_text() == "top\n"
    assert (out / "a-link" / "c-link" / "deep.bin").read_bytes() == bytes(range(256)) * 300
    assert got[f"a/b/{LONG_NAME}"].content == b"long"
    assert got["Grüße-ñ-日本語.txt"].content == "unicode ✓\n".encode()
    assert any(len(rel) > 150 for rel in got)
    # Regular files keep their (whole-second) modification time.
    for rel, e in expected.items():
        if e.kind == "file":
            assert int(os.lstat(out / rel).st_mtime) == int(os.lstat(src / rel).st_mtime), rel
    assert leftovers(out.parent) == []


def test_setuid_bits_are_not_extracted(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tar = crafted([reg("suid", mode=0o4755), reg("sgid", mode=0o2750), dir_("sticky", mode=0o1777)])
    bundle = crafted_bundle(tmp_path, keys, tar, monkeypatch)
    out = tmp_path / "out"
    r = extract(capsys, bundle, keys, out)
    assert r.rc == 0, r.err
    assert stat.S_IMODE(os.lstat(out / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out / "sgid").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(out / "sticky").st_mode) == 0o777


# --- creation refuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "target"), [
    ("up", "../../etc/passwd"),
    ("abs", "/etc"),
    ("sub/up", "../.."),
    ("dot-up", "./../x"),
])
def test_create_refuses_escaping_symlink(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str],
                                         name: str, target: str) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "ok.txt").write_text("ok")
    os.symlink(target, src / name)
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    with pytest.raises(SpecError, match="outside the tree"):
        make_bundle(outdir / "b.pitb", [PayloadSpec("files", "files", src, "etc/app")], keys)
    assert list(outdir.iterdir()) == []

    r = run_cli(capsys, "-q", "bundle", "create", "--version", "1.0.0", "--security-version", "1",
                "--compatible", "pitstop-test", "--payload", f"files:cfg:{src}:etc/app", "-o", outdir / "c.pitb",
                "--key", keys.key, "--cert", keys.chain)
    assert_refused(r, SPEC)
    assert target in r.err
    assert list(outdir.iterdir()) == []


def test_create_refuses_fifo(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    os.mkfifo(src / "pipe")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    r = run_cli(capsys, "-q", "bundle", "create", "--version", "1.0.0", "--security-version", "1",
                "--compatible", "pitstop-test", "--payload", f"files:cfg:{src}", "-o", outdir / "c.pitb",
                "--key", keys.key, "--cert", keys.chain)
    assert_refused(r, SPEC)
    assert "pipe" in r.err
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("name", ["x" * 200, "back\\slash"])
def test_create_refuses_names_extraction_would_refuse(tmp_path: Path, keys: Keys, name: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_text("x")
    try:
        bundle = make_bundle(tmp_path / "b.pitb", [PayloadSpec("files", "files", src, "etc/app")], keys)
    except SpecError:
        return  # refused up front: fine
    r = extract(capsys, bundle, keys, tmp_path / "out")
    assert r.rc == 0, f"bundle was created but cannot be extracted: {r.err.strip()}"


# --- extraction refuses crafted archives -----------------------------------------------------------------


def reg(name: str, data: bytes = b"data", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.mtime = tarfile.REGTYPE, len(data), mode, 1_700_000_000
    return ti, data


def dir_(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, 1_700_000_000
    return ti, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = kind, target, 0o777, 1_700_000_000
    return ti, None


def special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.devmajor, ti.devminor = kind, 0o666, 1, 3
    return ti, None


def crafted(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    # The archive really holds what the test means (tarfile did not sanitize anything on the way).
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        assert [(m.name, m.type, m.linkname) for m in tar] == [(t.name, t.type, t.linkname) for t, _ in members]
    return raw


def crafted_bundle(tmp_path: Path, keys: Keys, tar_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A correctly signed bundle whose files payload is exactly `tar_bytes`.

    Only the producer is replaced (write_tree); chunking, hashing, signing and everything the
    extractor checks are the real code."""
    def fake_write_tree(src: Path, out: BinaryIO, mtime_clamp: Any) -> int:
        out.write(tar_bytes)
        return 0

    empty = tmp_path / "empty-src"
    empty.mkdir(exist_ok=True)
    with monkeypatch.context() as m:
        m.setattr(bundle_writer, "write_tree", fake_write_tree)
        return make_bundle(tmp_path / "crafted.pitb", [PayloadSpec("files", "files", empty, "etc/app")], keys)


@dataclass(frozen=True)
class Case:
    members: Callable[[Path], list[tuple[tarfile.TarInfo, bytes | None]]]
    code: int
    message: str
    outside: Callable[[Path], Path] | None = None  # a path that must not exist afterwards


CASES: dict[str, Case] = {
    "dotdot": Case(lambda o: [reg("ok"), reg("../evil")], UNSAFE, "'..'", lambda o: o / "evil"),
    "dotdot-nested": Case(lambda o: [dir_("a"), reg("a/../../evil2")], UNSAFE, "'..'", lambda o: o / "evil2"),
    "absolute": Case(lambda o: [reg(str(o / "abs-evil"))], UNSAFE, "absolute", lambda o: o / "abs-evil"),
    "symlink-up": Case(lambda o: [link("link", "../..")], UNSAFE, "outside the tree"),
    "symlink-abs-then-file": Case(lambda o: [link("d", str(o / "victim")), reg("d/x")], UNSAFE,
                                  "outside the tree", lambda o: o / "victim" / "x"),
    "symlink-inside-then-file": Case(lambda o: [dir_("real"), link("d", "real"), reg("d/x")], UNSAFE,
                                     "symlink or file"),
    "hardlink": Case(lambda o: [reg("a"), link("b", "a", tarfile.LNKTYPE)], UNSAFE,
                     "not a file, directory or symlink"),
    "hardlink-outside": Case(lambda o: [link("pw", "/etc/passwd", tarfile.LNKTYPE)], UNSAFE,
                             "not a file, directory or symlink"),
    "fifo": Case(lambda o: [special("fifo", tarfile.FIFOTYPE)], UNSAFE, "not a file, directory or symlink"),
    "chardev": Case(lambda o: [special("null", tarfile.CHRTYPE)], UNSAFE, "not a file, directory or symlink"),
    "blockdev": Case(lambda o: [special("sda", tarfile.BLKTYPE)], UNSAFE, "not a file, directory or symlink"),
    "duplicate-file": Case(lambda o: [reg("a", b"first"), reg("a", b"second")], BAD, "appears twice"),
    "duplicate-dir": Case(lambda o: [dir_("d"), dir_("d")], BAD, "appears twice"),
    "file-then-symlink": Case(lambda o: [reg("a"), link("a", "b")], BAD, "appears twice"),
    "file-then-dir": Case(lambda o: [reg("a"), dir_("a")], BAD, "appears twice"),
    "parent-is-file": Case(lambda o: [reg("f"), reg("f/x")], UNSAFE, "symlink or file"),
    "parent-missing": Case(lambda o: [reg("nodir/x")], UNSAFE, "before its directory"),
    "empty-component": Case(lambda o: [dir_("a"), reg("a//x")], UNSAFE, "empty"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_extract_refuses_crafted_archive(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    c = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    bundle = crafted_bundle(tmp_path, keys, crafted(c.members(work)), monkeypatch)
    # The bundle itself is well-formed and correctly signed: only the archive's content is hostile.
    r = run_cli(capsys, "-q", "bundle", "verify", bundle, "--keyring", keys.keyring)
    assert r.rc == 0, r.err

    out = work / "out"
    r = extract(capsys, bundle, keys, out)
    assert_refused(r, c.code)
    assert c.message in r.err
    assert not out.exists() and not out.is_symlink()
    assert sorted(p.name for p in work.iterdir()) == [], "temporaries or escaped files left next to the output"
    if c.outside is not None:
        assert not c.outside(work).exists()
    assert not (tmp_path / "evil").exists()


def test_extract_refuses_garbage_archive(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = crafted_bundle(tmp_path, keys, b"this is not a tar archive" * 100, monkeypatch)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    r = extract(capsys, bundle, keys, out)
    assert_refused(r, BAD)
    assert not out.exists()
    assert leftovers(out.parent) == []


def test_extract_refuses_symlink_escaping_through_another_symlink(
        tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    tar = crafted([dir_("sub"), link("sub/l", ".."), link("esc", "sub/l/..")])
    bundle = crafted_bundle(tmp_path, keys, tar, monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    r = extract(capsys, bundle, keys, out)
    if r.rc == 0:
        # Whatever was extracted, no symlink in it may lead outside.
        for dirpath, dirnames, filenames in os.walk(out):
            for name in dirnames + filenames:
                resolved = Path(os.path.realpath(Path(dirpath) / name))
                assert resolved == out.resolve() or out.resolve() in resolved.parents, (name, resolved)
    else:
        assert_refused(r, UNSAFE)
        assert not out.exists()


def test_extract_tree_entry_cap(tmp_path: Path) -> None:
    tar = crafted([reg(f"f{i}") for i in range(5)])
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(BundleLimitError):
        extract_tree(io.BytesIO(tar), dest, fmt.Limits(max_files_entries=4))
    dest2 = tmp_path / "d2"
    dest2.mkdir()
    assert extract_tree(io.BytesIO(tar), dest2, fmt.Limits(max_files_entries=5)) == 5


def test_extract_tree_entry_size_cap(tmp_path: Path) -> None:
    tar = crafted([reg("big", b"x" * 1000)])
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(BundleLimitError):
        extract_tree(io.BytesIO(tar), dest, fmt.Limits(max_files_entry_size=999))


# --- targets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype", ["model", "files"])
@pytest.mark.parametrize("target", ["../x", "/abs", "a/../../b", "a//b", "./a"])
def test_create_refuses_unsafe_target(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str],
                                      ptype: str, target: str) -> None:
    src = tmp_path / "src"
    if ptype == "files":
        src.mkdir()
    else:
        src.write_bytes(b"onnx")
    with pytest.raises(SpecError):
        check_payload("test", "p", ptype, src, target)
    r = run_cli(capsys, "-q", "bundle", "create", "--version", "1.0.0", "--security-version", "1",
                "--compatible", "pitstop-test", "--payload", f"{ptype}:p:{src}:{target}", "-o", tmp_path / "b.pitb",
                "--key", keys.key, "--cert", keys.chain)
    assert_refused(r, SPEC)
    assert not (tmp_path / "b.pitb").exists()


@pytest.mark.parametrize("target", ["../x", "/abs", "models/../../x"])
def test_verify_refuses_unsafe_target_in_signed_manifest(tmp_path: Path, keys: Keys,
                                                         capsys: pytest.CaptureFixture[str], target: str) -> None:
    model = tmp_path / "net.onnx"
    model.write_bytes(os.urandom(50_000))
    good = make_bundle(tmp_path / "good.pitb", [PayloadSpec("net", "model", model, "models/net")], keys)
    r = run_cli(capsys, "-q", "bundle", "verify", good, "--keyring", keys.keyring)
    assert r.rc == 0, r.err

    def mutate(d: dict[str, Any]) -> None:
        d["payloads"][0]["target"] = target

    bad = resign(good, tmp_path / "bad.pitb", keys, mutate)
    r = run_cli(capsys, "-q", "bundle", "verify", bad, "--keyring", keys.keyring)
    assert_refused(r, UNSAFE)
    assert "target" in r.err
    out = tmp_path / "out"
    r = extract(capsys, bad, keys, out, "net")
    assert_refused(r, UNSAFE)
    assert not out.exists()
