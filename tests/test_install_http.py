"""`pitstop install URL` against a real loopback server (tests/httpkit.py): resume after dropped
connections with every byte served about once, retries, refusals that change nothing, TLS, rate limit."""

from __future__ import annotations

import functools
import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bundlekit import CliResult, Keys, assert_refused, make_bundle, rootfs_payload, run_cli
from devicekit import TestDevice as Dev
from devicekit import make_device
from httpkit import Faults, FileServer, TlsFiles, make_tls

from pitstop.ota import http_source
from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.errors import PayloadError
from pitstop.ota.http_source import DownloadError, HttpOptions

DOWNLOAD = DownloadError.exit_code
PAYLOAD = PayloadError.exit_code


@dataclass(frozen=True)
class Bundle:
    path: Path
    payload: bytes
    payload_offset: int      # first byte of the payload area
    data_start: int          # first byte of the rootfs payload's compressed chunks

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _bundle(d: Path, keys: Keys, size: int, seed: int) -> Bundle:
    payload = random.Random(seed).randbytes(size)  # incompressible: the bundle is as big as the payload
    path = make_bundle(d / f"b{seed}.pitb", [rootfs_payload(d / f"rootfs{seed}.img", payload)], keys,
                       version="2.0.0", security_version=2, chunking=(16384, 65536, 262144))
    with path.open("rb") as f:
        pre = read_preamble(f)
    p = pre.manifest.payloads[0]
    start = pre.header.payload_offset
    return Bundle(path, payload, start, start + p.region_start + p.index.size + p.table.size)


def ranged_starts(b: Bundle) -> list[int]:
    """Where the requests of an install over HTTP start: header, manifest and signature, index and table, chunk
    data (in one request: the device's slot a holds none of the chunks)."""
    return [0, 64, b.payload_offset, b.data_start]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Bundle:
    return _bundle(tmp_path_factory.mktemp("http-bundle"), keys, 6 << 20, 1)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's HTTP options with a short back-off (the defaults wait 0.5 s, 1 s, 2 s, ...). `pitstop install`
    imports HttpOptions when it runs, from the module patched here."""
    monkeypatch.setattr(http_source, "HttpOptions", functools.partial(HttpOptions, backoff=0.01, backoff_max=0.05))


@pytest.fixture
def dev(tmp_path: Path, keys: Keys) -> Dev:
    return make_device(tmp_path / "dev", keys)


def install(capsys: Any, dev: Dev, source: str | Path, *extra: str | Path) -> CliResult:
    return run_cli(capsys, "-q", "install", "--config", dev.config_path, *extra, source)


def status(capsys: Any, dev: Dev) -> dict[str, Any]:
    r = run_cli(capsys, "status", "--json", "--config", dev.config_path)
    assert r.rc == 0, r.err
    out: dict[str, Any] = json.loads(r.out)
    return out


def slot_holds(dev: Dev, slot: str, payload: bytes) -> bool:
    with dev.slot(slot).open("rb") as f:
        return hashlib.sha256(f.read(len(payload))).digest() == hashlib.sha256(payload).digest()


def assert_activated(dev: Dev, b: Bundle) -> None:
    assert dev.env() == {"ORDER": "b a", "a_OK": "1", "a_TRY": "3", "b_OK": "1", "b_TRY": "3"}
    assert slot_holds(dev, "b", b.payload)


def assert_booted_slot_untouched(dev: Dev, before: dict[str, str]) -> None:
    """Slot a, still primary and booted next, is bit for bit what it was; grubenv too."""
    now = dev.snapshot()
    assert now["slot_a.img"] == before["slot_a.img"]
    assert now["esp/EFI/BOOT/grubenv"] == before["esp/EFI/BOOT/grubenv"]
    assert dev.env()["ORDER"].split()[0] == "a"


def slot_b_record(capsys: Any, dev: Dev) -> dict[str, Any]:
    st = status(capsys, dev)
    assert st["primary"] == "a" and st["next_boot"] == "a" and st["pending"] is None
    b: dict[str, Any] = next(s for s in st["slots"] if s["name"] == "b")
    return b


# --- the same install as from a file ---------------------------------------------------------------------


def test_http_install_equals_local(tmp_path: Path, capsys: Any, keys: Keys, bundle: Bundle,
                                   server: FileServer) -> None:
    local = make_device(tmp_path / "local", keys)
    remote = make_device(tmp_path / "remote", keys)
    r = install(capsys, local, bundle.path)
    assert r.rc == 0, r.err
    r = install(capsys, remote, server.add("b.pitb", bundle.path))
    assert r.rc == 0, r.err
    assert remote.slot("b").read_bytes() == local.slot("b").read_bytes()
    assert remote.grubenv.read_bytes() == local.grubenv.read_bytes()
    assert_activated(remote, bundle)

    def without_source(st: dict[str, Any]) -> dict[str, Any]:
        for s in st["slots"]:
            s["bundle"].pop("source", None)
        return st

    st_remote, st_local = status(capsys, remote), status(capsys, local)
    assert next(s for s in st_remote["slots"] if s["name"] == "b")["bundle"]["source"].startswith("http://")
    assert without_source(st_remote) == without_source(st_local)
    stats = server.stats
    # One connection, kept alive for the requests of a ranged install: header, manifest and signature, chunk
    # index and table, chunk data (slot a holds none of the chunks). Every byte sent once.
    assert (stats.connections, stats.requests, stats.drops, stats.body_bytes) == (1, 4, 0, bundle.size)


# --- resume ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("abrupt", [True, False], ids=["reset", "fin"])
def test_resume_after_drops(capsys: Any, dev: Dev, bundle: Bundle, server: FileServer, abrupt: bool,
                            fast_retries: None) -> None:
    """Four cuts: one inside the signed preamble, three mid-payload. Each resumes where it stopped."""
    span = bundle.size - bundle.data_start
    drops = (200, bundle.data_start + span // 5, bundle.data_start + span // 2, bundle.data_start + 4 * span // 5)
    server.faults = Faults(drop_at=drops, abrupt=abrupt)
    t0 = time.monotonic()
    r = install(capsys, dev, server.add("b.pitb", bundle.path))
    elapsed = time.monotonic() - t0
    assert r.rc == 0, r.err
    assert_activated(dev, bundle)
    st = server.stats
    ratio = st.body_bytes / bundle.size
    print(f"\nresume ({'RST' if abrupt else 'FIN'}): {st.drops} drops, {st.connections} connections, "
          f"{st.body_bytes} bytes served for a {bundle.size}-byte bundle: ratio {ratio:.4f}; {elapsed:.2f} s")
    assert st.drops == len(drops) >= 3
    # The ranged install's own requests (header; manifest and signature; index and table; chunk data) go over
    # one kept-alive connection; each cut costs a connection and one request for exactly the next byte.
    assert st.connections == len(drops) + 1
    assert st.requests == len(drops) + 4
    assert st.starts == sorted([*ranged_starts(bundle), *drops])
    assert ratio <= 1.1


def test_many_drops_stay_within_budget(capsys: Any, dev: Dev, bundle: Bundle, server: FileServer,
                                       fast_retries: None) -> None:
    """Ten cuts at random offsets in the payload: still every byte served once."""
    rng = random.Random(5)
    drops = tuple(sorted(rng.sample(range(bundle.data_start, bundle.size), 10)))
    server.faults = Faults(drop_at=drops)
    r = install(capsys, dev, server.add("b.pitb", bundle.path))
    assert r.rc == 0, r.err
    assert_activated(dev, bundle)
    st = server.stats
    assert st.connections == len(drops) + 1
    assert st.body_bytes / bundle.size <= 1.1


def test_server_ignoring_range(capsys: Any, dev: Dev, bundle: Bundle, server: FileServer,
                               fast_retries: None) -> None:
    """200 with the whole file for every request: the reader re-reads up to where it was; slower, but done."""
    drops = (bundle.data_start + 100_000, bundle.size // 2)
    server.faults = Faults(drop_at=drops, ignore_range=True)
    r = install(capsys, dev, server.add("b.pitb", bundle.path))
    assert r.rc == 0, r.err
    assert_activated(dev, bundle)
    assert server.stats.statuses == [200, 200, 200]
    assert server.stats.starts == [0, 0, 0]


# --- retries and refusals -------------------------------------------------------------------------------


def test_unavailable_then_success(capsys: Any, dev: Dev, bundle: Bundle, server: FileServer,
                                  fast_retries: None) -> None:
    server.faults = Faults(unavailable=3)
    r = install(capsys, dev, server.add("b.pitb", bundle.path), "--retries", "3")
    assert r.rc == 0, r.err
    assert_activated(dev, bundle)
    assert server.stats.statuses == [503, 503, 503, 206, 206, 206, 206]


def test_unavailable_too_long_changes_nothing(capsys: Any, dev: Dev, bundle: Bundle, server: FileServer,
                                              fast_retries: None) -> None:
    """Never a byte of the bundle: refused before anything is recorded."""
    before = dev.snapshot()
    server.faults = Faults(unavailable=1000)
    r = install(capsys, dev, server.add("b.pitb", bundle.path), "--retries", "3")
    assert_refused(r, DOWNLOAD)
    assert "503" in r.err and "4 attempt(s)" in r.err
    assert server.stats.requests == 4
    assert dev.snapshot() == before


@pytest.mark.parametrize("where", ["preamble", "chunk index", "payload"])
def test_stalled(capsys: Any, dev: Dev, bundle: Bundle, server: FileServer, fast_retries: None, where: str) -> None:
    """Every connection is cut at the same byte: no progress, so the retries run out (exit 26).

    Cut inside the signed preamble: nothing was verified, nothing is recorded. Past it, the target is recorded
    as being written before its first byte is read (record, then write): slot b is 'writing', never bootable,
    its bytes untouched while the cut is still in the chunk index. Always: slot a, booted and primary, and
    grubenv are untouched, and a later install from a healthy server completes."""
    before = dev.snapshot()
    stall = {"preamble": 300, "chunk index": bundle.payload_offset + 40,
             "payload": bundle.data_start + (bundle.size - bundle.data_start) // 2}[where]
    server.faults = Faults(stall_at=stall)
    url = server.add("b.pitb", bundle.path)
    r = install(capsys, dev, url, "--retries", "2")
    assert_refused(r, DOWNLOAD)
    assert server.stats.connections == 3
    assert server.stats.starts == [s for s in ranged_starts(bundle) if s < stall] + [stall, stall]
    if where == "preamble":
        assert dev.snapshot() == before
    else:
        assert_booted_slot_untouched(dev, before)
        b = slot_b_record(capsys, dev)
        assert b["content"] == "writing" and not b["bootable"] and not b["next_boot"]
        assert dev.env()["b_OK"] == "0"
        if where == "chunk index":
            assert dev.snapshot()["slot_b.img"] == before["slot_b.img"]

    server.reset_stats(Faults())
    r = install(capsys, dev, url)
    assert r.rc == 0, r.err
    assert_activated(dev, bundle)


def test_failure_as_users_see_it(tmp_path: Path, dev: Dev, bundle: Bundle, server: FileServer) -> None:
    """The real command: retry warnings, then one error line and exit 26; no traceback."""
    server.faults = Faults(stall_at=bundle.data_start + 1000)
    url = server.add("b.pitb", bundle.path)
    res = subprocess.run([sys.executable, "-m", "pitstop.cli", "-q", "install", "--config", str(dev.config_path),
                          "--retries", "1", url], capture_output=True, text=True, check=False, cwd=tmp_path, timeout=60)
    assert res.returncode == DOWNLOAD, res.stderr
    lines = res.stderr.splitlines()
    assert "Traceback" not in res.stderr
    assert lines[-1].startswith("pitstop: error: ") and "connection broken" in lines[-1], res.stderr
    assert all("download interrupted" in ln for ln in lines[:-1]), res.stderr


def test_not_found_changes_nothing(capsys: Any, dev: Dev, server: FileServer) -> None:
    before = dev.snapshot()
    t0 = time.monotonic()
    r = install(capsys, dev, server.url("missing.pitb"))
    assert_refused(r, DOWNLOAD)
    assert "404" in r.err
    assert time.monotonic() - t0 < 5
    assert server.stats.requests == 1  # not retried
    assert dev.snapshot() == before


def test_corrupt_bytes_over_http(capsys: Any, dev: Dev, bundle: Bundle, server: FileServer) -> None:
    """One flipped byte in the middle of the compressed chunks: the chunk fails verification before it is
    written; slot b stays 'writing' (never bootable), slot a and grubenv untouched."""
    before = dev.snapshot()
    server.faults = Faults(corrupt=((bundle.data_start + bundle.size) // 2,))
    r = install(capsys, dev, server.add("b.pitb", bundle.path))
    assert_refused(r, PAYLOAD)
    assert_booted_slot_untouched(dev, before)
    b = slot_b_record(capsys, dev)
    assert b["content"] == "writing" and not b["bootable"]
    assert not slot_holds(dev, "b", bundle.payload)


# --- TLS -------------------------------------------------------------------------------------------------


def test_https_with_ca(capsys: Any, dev: Dev, bundle: Bundle, tls: TlsFiles) -> None:
    with FileServer(tls=tls) as srv:
        url = srv.add("b.pitb", bundle.path)
        assert url.startswith("https://")
        r = install(capsys, dev, url, "--ca", tls.ca_cert)
        assert r.rc == 0, r.err
    assert_activated(dev, bundle)


def test_https_without_ca_refused(capsys: Any, dev: Dev, bundle: Bundle, tls: TlsFiles) -> None:
    before = dev.snapshot()
    with FileServer(tls=tls) as srv:
        r = install(capsys, dev, srv.add("b.pitb", bundle.path))
        assert srv.stats.requests == 0
    assert_refused(r, DOWNLOAD)
    assert "TLS" in r.err and "certificate verify failed" in r.err
    assert dev.snapshot() == before


def test_mutual_tls(capsys: Any, tmp_path: Path, keys: Keys, bundle: Bundle, tls: TlsFiles) -> None:
    with FileServer(tls=tls, require_client_cert=True) as srv:
        url = srv.add("b.pitb", bundle.path)
        for name, extra in (("none", ()), ("stranger", ("--client-cert", tls.stranger_cert,
                                                        "--client-key", tls.stranger_key))):
            dev = make_device(tmp_path / name, keys)
            before = dev.snapshot()
            r = install(capsys, dev, url, "--ca", tls.ca_cert, *extra)
            assert_refused(r, DOWNLOAD)
            assert "TLS" in r.err, r.err
            assert dev.snapshot() == before
        assert srv.stats.requests == 0
        dev = make_device(tmp_path / "ok", keys)
        r = install(capsys, dev, url, "--ca", tls.ca_cert, "--client-cert", tls.client_cert,
                    "--client-key", tls.client_key)
        assert r.rc == 0, r.err
        assert srv.stats.requests == len(ranged_starts(bundle))
    assert_activated(dev, bundle)


# --- bandwidth -------------------------------------------------------------------------------------------


def test_rate_limit(tmp_path: Path, capsys: Any, keys: Keys, server: FileServer) -> None:
    """A 2 MiB bundle at 1 MiB/s: about 2 s. A loose lower bound: the limiter works, this is no benchmark."""
    b = _bundle(tmp_path, keys, 2 << 20, 3)
    assert b.size >= 2 << 20
    dev = make_device(tmp_path / "dev", keys)
    url = server.add("b.pitb", b.path)
    t0 = time.monotonic()
    r = install(capsys, dev, url, "--rate-limit", "1M")
    elapsed = time.monotonic() - t0
    assert r.rc == 0, r.err
    assert_activated(dev, b)
    print(f"\nrate limit 1 MiB/s: {b.size} bytes in {elapsed:.2f} s")
    assert elapsed >= 1.5


@pytest.mark.parametrize("given, recorded", [
    ("https://user:secret@h.example:8443/b/x.pbd?token=abc#f", "https://h.example:8443/b/x.pbd"),
    ("http://[::1]:8080/x.pbd?sig=1", "http://[::1]:8080/x.pbd"),
    ("http://h.example/x.pbd", "http://h.example/x.pbd"),
])
def test_recorded_source_drops_credentials_and_query(given: str, recorded: str) -> None:
    from pitstop.ota.installer import _recordable

    assert _recordable(given) == recorded
