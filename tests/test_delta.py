"""Delta installs over HTTP (docs/delta.md): the chunks the booted slot holds are copied from it, the rest
downloaded in few Range requests; the slot written is byte-identical to a full install's."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from bundlekit import Keys, assert_refused, make_bundle, mixed_data, rootfs_payload, run_cli
from devicekit import TestDevice, make_device
from httpkit import Faults, FileServer

from pitstop.ota import bundle_diff, caibx, delta_plan, seed
from pitstop.ota.bundle_reader import read_layout, read_preamble
from pitstop.ota.bundle_spec import PayloadSpec
from pitstop.ota.device import Device
from pitstop.ota.http_source import HttpOptions
from pitstop.ota.installer import Installer

SLOT = 8 << 20
SIZE = 6 << 20
FAST = HttpOptions(backoff=0.01, backoff_max=0.05)


# --- the plan (pure) --------------------------------------------------------------------------------------


def _index(lengths: list[int], ids: list[bytes]) -> caibx.ChunkIndex:
    ends, pos = [], 0
    for n in lengths:
        pos += n
        ends.append(pos)
    return caibx.ChunkIndex(16, 64, 256, tuple(ends), tuple(ids), 0)


def test_plan_runs_and_gaps() -> None:
    ids = [bytes([i]) * 32 for i in range(8)]
    idx = _index([100] * 8, ids)
    sizes = [10, 20, 30, 40, 50, 60, 70, 80]
    seed_map = {ids[1]: 1000, ids[2]: 2000, ids[5]: 5000, ids[7]: 7000}
    # Wide gap: the runs 0, 3-4 and 6 are three requests.
    plan = delta_plan.make_plan(idx, sizes, 500, seed_map, max_gap=1)
    assert [(f.start, f.end, f.first, f.last) for f in plan.fetches] == [
        (500, 510, 0, 1),
        (560, 650, 3, 5),
        (710, 780, 6, 7),
    ]
    assert plan.seed == (None, 1000, 2000, None, None, 5000, None, 7000)
    assert (plan.seeded_chunks, plan.seeded_bytes, plan.download_bytes) == (4, 400, 170)
    # A gap under max_gap is bridged (chunks 1 and 2, 50 bytes, then come with the download); 60 bytes is not.
    plan = delta_plan.make_plan(idx, sizes, 500, seed_map, max_gap=55)
    assert [(f.start, f.end, f.first, f.last) for f in plan.fetches] == [(500, 650, 0, 5), (710, 780, 6, 7)]
    assert plan.seed == (None, None, None, None, None, 5000, None, 7000)
    assert plan.downloaded_chunks + plan.seeded_chunks == plan.chunks


def test_plan_everything_or_nothing_seeded() -> None:
    ids = [bytes([i]) * 32 for i in range(4)]
    idx = _index([100] * 4, ids)
    assert delta_plan.make_plan(idx, [5] * 4, 0, {i: 0 for i in ids}).fetches == ()
    assert [(f.start, f.end) for f in delta_plan.make_plan(idx, [5] * 4, 0, {}).fetches] == [(0, 20)]
    # A chunk that repeats in the seed is taken from its first place.
    assert delta_plan.seed_offsets(_index([100, 100, 100], [ids[0], ids[1], ids[0]])) == {ids[0]: 0, ids[1]: 100}


# --- installs over HTTP ------------------------------------------------------------------------------------


def _edit(data: bytes, seed_: int, edits: int = 6, size: int = 20_000) -> bytes:
    """Some regions rewritten, as an upgrade does to a file system image."""
    rng = random.Random(seed_)
    out = bytearray(data)
    for _ in range(edits):
        at = rng.randrange(0, len(out) - size)
        out[at : at + size] = rng.randbytes(size)
    return bytes(out)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> tuple[bytes, bytes, Path, Path]:
    d = tmp_path_factory.mktemp("delta")
    v1 = mixed_data(SIZE, 3)
    v2 = _edit(v1, 4)
    b1 = make_bundle(d / "v1.pitb", [rootfs_payload(d / "v1.img", v1)], keys, version="1.0.0")
    b2 = make_bundle(d / "v2.pitb", [rootfs_payload(d / "v2.img", v2)], keys, version="2.0.0")
    return v1, v2, b1, b2


def _slot_holds(dev: TestDevice, slot: str, data: bytes) -> None:
    got = dev.slot(slot).read_bytes()
    assert hashlib.sha256(got[: len(data)]).digest() == hashlib.sha256(data).digest()


def test_delta_from_an_unrecorded_slot(tmp_path: Path, keys: Keys, versions: tuple[bytes, bytes, Path, Path]) -> None:
    """Slot a was flashed (no chunk index recorded): it is chunked, and only what changed is downloaded."""
    v1, v2, _, b2 = versions
    full = make_device(tmp_path / "full", keys, slot_size=SLOT, slot_a=v1)
    Installer(full.config(), delta=False).install(str(b2))
    dev = make_device(tmp_path / "delta", keys, slot_size=SLOT, slot_a=v1)
    with FileServer() as srv:
        res = Installer(dev.config(), http=FAST).install(srv.add("v2.pitb", b2))
        served, requests = srv.stats.body_bytes, srv.stats.requests
    assert dev.slot("b").read_bytes() == full.slot("b").read_bytes()
    _slot_holds(dev, "b", v2)
    assert dev.env()["ORDER"] == "b a"
    size = b2.stat().st_size
    print(
        f"\ndelta: {served} of {size} bundle bytes served ({served / size:.1%}) in {requests} requests; "
        f"{res.bytes_seeded} bytes from slot a"
    )
    assert res.bytes_seeded > SIZE * 0.8
    assert served < size * 0.2
    assert requests <= 3 + 2 * 6  # preamble (2), index and table, one or two per edited region


def test_delta_from_the_recorded_index_with_a_damaged_seed(
    tmp_path: Path, keys: Keys, versions: tuple[bytes, bytes, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """v1 installed over HTTP into b and booted; v2 then goes into a using b's recorded index. Bytes of b that
    changed since (a damaged sector) fail their chunk's check and those chunks are downloaded instead."""
    _, v2, b1, b2 = versions
    dev = make_device(tmp_path / "dev", keys, slot_size=SLOT)
    with FileServer() as srv:
        u1, u2 = srv.add("v1.pitb", b1), srv.add("v2.pitb", b2)
        Installer(dev.config(), http=FAST).install(u1)
        assert dev.reboot() == "b"
        Device(dev.config()).mark_good()
        with open(dev.slot("b"), "r+b") as f:
            for k in range(1, 10):
                f.seek(k * SIZE // 10)
                f.write(b"\xff" * 100)
        srv.reset_stats(Faults())
        with caplog.at_level(logging.INFO, logger="pitstop.ota"):
            res = Installer(dev.config(), http=FAST).install(u2)
        served = srv.stats.body_bytes
    _slot_holds(dev, "a", v2)
    assert "recorded index" in caplog.text
    assert "did not match their record and were downloaded" in caplog.text
    assert res.bytes_seeded > SIZE * 0.6
    assert served < b2.stat().st_size * 0.3


def test_delta_resumes_after_drops(tmp_path: Path, keys: Keys, versions: tuple[bytes, bytes, Path, Path]) -> None:
    v1, v2, _, b2 = versions
    with b2.open("rb") as f:
        pre = read_preamble(f)
        p = pre.manifest.payloads[0]
        f.seek(pre.header.payload_offset + p.region_start)
        layout = read_layout(f, p)
    dev = make_device(tmp_path / "dev", keys, slot_size=SLOT, slot_a=v1)
    plan = delta_plan.make_plan(
        layout.index, layout.sizes, pre.header.payload_offset + p.data.offset, seed.chunk_device(dev.slot("a"), p, None)
    )
    drops = tuple(f.start + f.size // 2 for f in plan.fetches if f.size > 100)
    assert len(drops) >= 2
    with FileServer(faults=Faults(drop_at=drops)) as srv:
        Installer(dev.config(), http=FAST).install(srv.add("v2.pitb", b2))
        assert srv.stats.drops == len(drops)
        assert srv.stats.body_bytes < b2.stat().st_size * 0.3
    _slot_holds(dev, "b", v2)


def test_server_without_range_gets_a_full_install(
    tmp_path: Path, keys: Keys, versions: tuple[bytes, bytes, Path, Path]
) -> None:
    v1, v2, _, b2 = versions
    dev = make_device(tmp_path / "dev", keys, slot_size=SLOT, slot_a=v1)
    with FileServer(faults=Faults(ignore_range=True)) as srv:
        res = Installer(dev.config(), http=FAST).install(srv.add("v2.pitb", b2))
        assert srv.stats.statuses == [200] and srv.stats.body_bytes == b2.stat().st_size
    assert res.bytes_seeded == 0
    _slot_holds(dev, "b", v2)


def test_ext4_size(tmp_path: Path) -> None:
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", str(img), "3000"],
        check=True,
        env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"},
    )
    assert seed.ext4_size(img) == 3000 * 4096
    assert seed.ext4_size(tmp_path / "missing") is None
    (tmp_path / "zeros").write_bytes(bytes(8192))
    assert seed.ext4_size(tmp_path / "zeros") is None


def test_recorded_index_with_other_chunking_is_not_used(tmp_path: Path) -> None:
    from pitstop.ota.manifest import Payload, Region

    r = Region(0, 0, "")
    p = Payload("rootfs", "rootfs", "rootfs", 0, "", 0, "sha256", (16384, 65536, 262144), r, r, r)
    assert seed.recorded_index(tmp_path, "a", p) is None
    rec = tmp_path / "slots" / "a" / "x"
    rec.mkdir(parents=True)
    (rec / "manifest.json").write_text('{"payloads": [{"name": "rootfs", "type": "rootfs"}]}')
    (rec / "rootfs.caibx").write_bytes(caibx.encode(caibx.ChunkIndex(16384, 65536, 262144, (100,), (b"x" * 32,), 0)))
    assert seed.recorded_index(tmp_path, "a", p) is not None
    assert seed.recorded_index(tmp_path, "a", replace(p, chunking=(4096, 16384, 65536))) is None


# --- pitstop bundle diff ---------------------------------------------------------------------------------------


def test_bundle_diff_is_what_the_install_downloads(
    tmp_path: Path, keys: Keys, versions: tuple[bytes, bytes, Path, Path]
) -> None:
    """A device that installed v1 (its index recorded) and runs it downloads, for v2, exactly the bytes and
    requests that `bundle diff v1 v2` predicts."""
    _, v2, b1, b2 = versions
    dev = make_device(tmp_path / "dev", keys, slot_size=SLOT)
    Installer(dev.config()).install(str(b1))
    assert dev.reboot() == "b"
    Device(dev.config()).mark_good()
    with FileServer() as srv:
        res = Installer(dev.config(), http=FAST).install(srv.add("v2.pitb", b2))
        served, requests = srv.stats.body_bytes, srv.stats.requests
    _slot_holds(dev, "a", v2)
    d = bundle_diff.diff_bundles(b1, b2)
    (p,) = d.payloads
    assert (d.download, d.requests) == (served, requests)
    assert p.seed == "index" and p.reused_bytes == res.bytes_seeded
    assert d.new_size == b2.stat().st_size and (d.old_version, d.new_version) == ("1.0.0", "2.0.0")


def test_bundle_diff_chunks_old_again_for_other_chunking(
    tmp_path: Path, keys: Keys, versions: tuple[bytes, bytes, Path, Path]
) -> None:
    v1, v2, b1, _ = versions
    b3 = make_bundle(
        tmp_path / "v3.pitb",
        [rootfs_payload(tmp_path / "v3.img", v2)],
        keys,
        version="3.0.0",
        chunking=(8192, 32768, 131072),
    )
    d = bundle_diff.diff_bundles(b1, b3)
    (p,) = d.payloads
    assert p.seed == "chunked"
    # What a device flashed with v1 (no record: it chunks its slot) downloads for v3.
    dev = make_device(tmp_path / "dev", keys, slot_size=len(v1), slot_a=v1)
    with FileServer() as srv:
        res = Installer(dev.config(), http=FAST).install(srv.add("v3.pitb", b3))
        served = srv.stats.body_bytes
    assert served == d.download and res.bytes_seeded == p.reused_bytes
    assert p.reused_bytes > SIZE * 0.8


def test_bundle_diff_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, versions: tuple[bytes, bytes, Path, Path]
) -> None:
    _, _, b1, b2 = versions
    r = run_cli(capsys, "bundle", "diff", b1, b2)
    assert r.rc == 0, r.err
    assert "reused from OLD's chunk index" in r.out and "download " in r.out
    r = run_cli(capsys, "bundle", "diff", "--json", b1, b2)
    js = json.loads(r.out)
    d = bundle_diff.diff_bundles(b1, b2)
    assert js["download"] == d.download and js["payloads"][0]["reused_chunks"] == d.payloads[0].reused_chunks
    # A model payload is downloaded whole: index and table, then its data.
    files = tmp_path / "files"
    files.mkdir()
    (files / "app.conf").write_bytes(mixed_data(300_000, 9))
    bm = make_bundle(tmp_path / "m.pitb", [PayloadSpec("config", "files", files, "etc/app")], keys, version="4.0.0")
    dm = bundle_diff.diff_bundles(b1, bm)
    (pm,) = dm.payloads
    assert pm.reused_chunks == 0 and pm.requests == 2 and dm.download == bm.stat().st_size
    # Bad input: one line, its exit code.
    torn = tmp_path / "torn.pitb"
    torn.write_bytes(b2.read_bytes()[:100])
    assert_refused(run_cli(capsys, "bundle", "diff", b1, torn), 10)
    assert_refused(run_cli(capsys, "bundle", "diff", b1, tmp_path / "missing.pitb"), 4)


def test_no_delta_flag_reads_the_whole_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, versions: tuple[bytes, bytes, Path, Path]
) -> None:
    v1, v2, _, b2 = versions
    dev = make_device(tmp_path / "dev", keys, slot_size=SLOT, slot_a=v1)
    with FileServer() as srv:
        url = srv.add("v2.pitb", b2)
        r = run_cli(capsys, "-q", "install", "--config", dev.config_path, "--no-delta", url)
        assert r.rc == 0, r.err
        assert srv.stats.requests == 1 and srv.stats.body_bytes == b2.stat().st_size
    _slot_holds(dev, "b", v2)


@pytest.mark.parametrize("delta", [True, False])
def test_daemon_core_follows_update_delta(
    tmp_path: Path, keys: Keys, versions: tuple[bytes, bytes, Path, Path], delta: bool
) -> None:
    """[update] delta reaches the daemon's installs: on, the bundle is read by ranges; off, once, whole."""
    import asyncio

    from pitstop.daemon.core import DaemonCore

    v1, v2, _, b2 = versions
    dev = make_device(tmp_path / "dev", keys, slot_size=SLOT, slot_a=v1)
    with FileServer() as srv:
        url = srv.add("v2.pitb", b2)

        async def main() -> bool:
            core = DaemonCore(dev.config(), reboot=lambda: None, http=FAST, delta=delta)
            return (await core.install(url)).ok

        assert asyncio.run(main())
        size = b2.stat().st_size
        if delta:
            assert srv.stats.requests > 1 and srv.stats.body_bytes < size * 0.3
        else:
            assert srv.stats.requests == 1 and srv.stats.body_bytes == size
    _slot_holds(dev, "b", v2)
