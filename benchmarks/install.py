"""`pitstop install` of a 1 GiB rootfs payload into a file-backed slot, as a ratio to a floor.

Issue target: installing a 1 GiB rootfs payload from a local bundle file into a file-backed slot takes
at most 1.25x the floor measured in the same run, the floor being `cat PAYLOAD > SLOT && sync` of the
uncompressed bytes. The same install over HTTP on loopback is reported as a ratio to the same floor.

Everything is timed through the real command line (`pitstop -q install --config SYSTEM.TOML SOURCE` as
a subprocess: the real `Installer`, process start included, as it is for `sh -c 'cat …'`):

- the slot is a regular file on the same file system as the payload and the bundle, the payload size
  plus 1 MiB, written full of zeros and synced before every timed run, for the floor as for pitstop:
  like a partition, it is overwritten in place (no block allocation while timed). The floor writes it
  without truncating it: `cat PAYLOAD 1<>SLOT && sync SLOT` (`sync FILE` fsyncs that file, as the
  installer does; a bare `sync` would also wait for other processes' writes);
- the device is file-backed (grubenv in an ESP directory, a data directory, `booted_slot = "a"`),
  made afresh before every pitstop run, so every install is a first install into slot b;
- the page cache is warm and quiet: payload and bundle are read once and `sync` runs (untimed) before
  every timed run (caches cannot be dropped here, so every run starts from the same state instead);
- floor, local install and HTTP install take turns (rotating their order), --runs times each (at
  least 3); the best run of each is compared (the median is shown too);
- over HTTP a threaded loopback server in this process serves the bundle (Range, sendfile), counting
  the bytes it sends;
- informational rows: `pitstop bundle verify` of the same bundle (the same decompress-and-hash work
  without the prescan and the writes) and pitstop's start-up (`pitstop -q status`).

After each install the slot's first PAYLOAD-size bytes must hash to the payload's SHA-256 and grubenv
must name slot b first.

--profile adds an analysis after the timed runs: the single-threaded cost of each piece of work over
the real bundle (hashing, decompressing, writing), the phases of one in-process install, and cProfile
of the installer's main thread.

Usage:  .venv/bin/python benchmarks/install.py [--size 1GiB] [--runs 3] [--json] [--keep] [--profile]

Exits 0 whatever the verdict (benchmarks report, tests judge); non-zero only when it could not
measure (a tool missing, a command failing, a slot that does not hold the payload afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import hashlib
import http.server
import io
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from _common import (
    DEFAULT_CORPUS,
    CommandFailed,
    Sample,
    Timing,
    bench_main,
    human,
    log,
    machine,
    parse_size,
    pitstop_command,
    require_tools,
    run_timed,
    tool_version,
    warm,
    write_fs_like_payload,
)

from pitstop.ota import grubenv, slot_device
from pitstop.ota import installer as inst
from pitstop.ota import system_config as sc
from pitstop.ota.bundle_reader import read_layout, read_preamble

TARGET = 1.25
COMPATIBLE = "pitstop-bench"
_BLOCK = 8 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="payload size (default 1GiB)")
    p.add_argument("--runs", type=int, default=3,
                   help="timed runs of each measurement; the best is compared (default 3, at least 3)")
    p.add_argument("--seed", type=int, default=1, help="payload RNG seed (default 1)")
    p.add_argument("--corpus", type=Path, action="append",
                   help="directory of real files to mix into the payload (repeatable; default /usr/lib, /usr/share)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the temporary work directory is made (default /var/tmp); slots, payload and "
                   "bundle all live there")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--zstd-level", type=int, default=3, help="zstd level of the bundle (default 3)")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP install")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs: work costs, install phases and cProfile (see the module doc)")
    p.add_argument("--pitstop", help="pitstop executable (default: the one next to this Python)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error("--runs must be at least 3")
    if args.size < 1:
        p.error("--size must be positive")
    return args


# --- the file-backed device -------------------------------------------------------------------------------


def zeroed_file(path: Path, size: int) -> None:
    """A new file of `size` zero bytes, written out and fsynced: a stand-in for a partition."""
    path.unlink(missing_ok=True)
    zeros = bytes(_BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        offset = 0
        while offset < size:
            offset += os.pwrite(fd, zeros[:min(_BLOCK, size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BenchDevice:
    root: Path
    slot_size: int
    compatible: str = COMPATIBLE

    @property
    def config(self) -> Path:
        return self.root / "system.toml"

    @property
    def grubenv(self) -> Path:
        return self.root / "esp" / "EFI" / "BOOT" / "grubenv"

    @property
    def slot_a(self) -> Path:
        return self.root / "slot_a.img"

    @property
    def slot_b(self) -> Path:
        return self.root / "slot_b.img"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def reset(self, keyring: Path) -> None:
        """A factory-fresh device booted from slot a, with a fresh zeroed slot b."""
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True)
        self.grubenv.parent.mkdir(parents=True, exist_ok=True)
        self.grubenv.write_bytes(grubenv.encode({"ORDER": "a b", "a_OK": "1", "a_TRY": "3", "b_OK": "0",
                                                 "b_TRY": "0"}))
        if not self.slot_a.exists():
            with open(self.slot_a, "wb") as f:  # the running slot: never written, so sparse will do
                f.truncate(self.slot_size)
        zeroed_file(self.slot_b, self.slot_size)
        (self.root / "boot_id").write_text("bench-boot-0\n")
        self.config.write_text(f'''compatible = "{self.compatible}"
data_dir = "{self.data}"
keyring = "{keyring}"
clock = "floor"
booted_slot = "a"
boot_id = "{self.root / "boot_id"}"

[bootloader]
backend = "grub"
grubenv = "{self.grubenv}"
tries = 3

[[slot]]
name = "a"
device = "{self.slot_a}"

[[slot]]
name = "b"
device = "{self.slot_b}"
''')


def digest(path: Path, size: int | None = None) -> str:
    """SHA-256 of the first `size` bytes of `path` (all of it if None)."""
    h = hashlib.sha256()
    view = memoryview(bytearray(_BLOCK))
    left = size if size is not None else os.stat(path).st_size
    with open(path, "rb", buffering=0) as f:
        while left:
            n = f.readinto(view[:min(left, _BLOCK)])
            if not n:
                break
            h.update(view[:n])
            left -= n
    return h.hexdigest()


def check_installed(dev: BenchDevice, size: int, payload_sha: str) -> None:
    got = digest(dev.slot_b, size)
    if got != payload_sha:
        raise CommandFailed(["pitstop", "install"], 0, f"slot b does not hold the payload afterwards ({got})")
    order = grubenv.decode(dev.grubenv.read_bytes()).get("ORDER")
    if order != "b a":
        raise CommandFailed(["pitstop", "install"], 0, f"grubenv ORDER is {order!r} afterwards, not 'b a'")


# --- a loopback HTTP server with Range -------------------------------------------------------------------

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # As nginx's tcp_nodelay and pitstop's site server: without it, a small range's last segment waits for the
    # client's delayed ACK of the headers (about 40 ms a request), which would dominate a delta install here.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = self.server.file
        size = path.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.fullmatch(rng.strip())
            if not m or int(m.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if not body:
            return
        self.wfile.flush()
        with open(path, "rb") as f, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            offset, left = start, end - start + 1
            while left:
                n = os.sendfile(self.connection.fileno(), f.fileno(), offset, min(left, _BLOCK))
                if n == 0:
                    break
                offset += n
                left -= n
                self.server.count(n)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, file: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.file = file
        self.sent = 0
        self._lock = threading.Lock()

    def count(self, n: int) -> None:
        with self._lock:
            self.sent += n


@contextlib.contextmanager
def serve(file: Path) -> Iterator[tuple[str, _Server]]:
    srv = _Server(file)
    t = threading.Thread(target=srv.serve_forever, name="http", daemon=True)
    t.start()
    try:
        host, port = srv.server_address[:2]
        yield f"http://{host!s}:{port}/{file.name}", srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


# --- analysis (--profile) ----------------------------------------------------------------------------------


@dataclass
class Best(Timing):
    """Timing where the best (fastest) run is what counts."""

    @property
    def best(self) -> float:
        return min(s.wall for s in self.samples)

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "best_s": round(self.best, 4)}


def work_costs(bundle: Path, slot: Path, slot_size: int) -> dict[str, float]:
    """Seconds each piece of the install's work takes alone, on one thread, over the real bundle."""
    costs = dict.fromkeys(("read compressed data (page cache)", "sha256 compressed data", "zstd decompress chunks",
                           "sha256 each chunk (ids)", "sha256 whole payload", "pwrite chunks into slot",
                           "fsync slot"), 0.0)
    zeroed_file(slot, slot_size)
    os.sync()
    dctx = zstandard.ZstdDecompressor()
    with open(bundle, "rb") as f:
        pre = read_preamble(f)
        p = next(x for x in pre.manifest.payloads if x.type == "rootfs")
        layout = read_layout(f, p)
        data_h, full_h = hashlib.sha256(), hashlib.sha256()
        fd = os.open(slot, os.O_WRONLY | os.O_CLOEXEC)
        try:
            offset, i, sizes = 0, 0, layout.sizes
            while i < len(sizes):
                j = min(len(sizes), i + 32)
                t0 = time.perf_counter()
                buf = f.read(sum(sizes[i:j]))
                t1 = time.perf_counter()
                data_h.update(buf)
                t2 = time.perf_counter()
                costs["read compressed data (page cache)"] += t1 - t0
                costs["sha256 compressed data"] += t2 - t1
                pos = 0
                for k in range(i, j):
                    frame = buf[pos:pos + sizes[k]]
                    pos += sizes[k]
                    t0 = time.perf_counter()
                    chunk = dctx.decompress(frame, max_output_size=layout.index.chunk_span(k)[1])
                    t1 = time.perf_counter()
                    hashlib.sha256(chunk).digest()
                    t2 = time.perf_counter()
                    full_h.update(chunk)
                    t3 = time.perf_counter()
                    view = memoryview(chunk)
                    while view:
                        n = os.pwrite(fd, view, offset)
                        view, offset = view[n:], offset + n
                    t4 = time.perf_counter()
                    costs["zstd decompress chunks"] += t1 - t0
                    costs["sha256 each chunk (ids)"] += t2 - t1
                    costs["sha256 whole payload"] += t3 - t2
                    costs["pwrite chunks into slot"] += t4 - t3
                i = j
            t0 = time.perf_counter()
            os.fsync(fd)
            costs["fsync slot"] = time.perf_counter() - t0
        finally:
            os.close(fd)
    if full_h.hexdigest() != p.sha256 or data_h.hexdigest() != p.data.sha256:
        raise CommandFailed(["work_costs"], 0, "the analysis pass read something other than the payload")
    return {k: round(v, 4) for k, v in costs.items()}


def install_phases(config: Path, bundle: Path) -> dict[str, Any]:
    """One local install in this process, its steps timed by wrapping the installer's functions."""
    marks: dict[str, float] = {}
    spans: dict[str, float] = {}
    calls: dict[str, int] = {}

    def add(name: str, t0: float) -> None:
        spans[name] = spans.get(name, 0.0) + time.perf_counter() - t0
        calls[name] = calls.get(name, 0) + 1

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                add(name, t0)
        return wrapper

    real_write_all, real_fsync = slot_device.write_all, os.fsync

    def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
        marks.setdefault("first pwrite", time.perf_counter())
        t0 = time.perf_counter()
        real_write_all(fd, data, offset)
        add("pwrite into the slot (main thread)", t0)
        marks["last pwrite"] = time.perf_counter()

    def fsync(fd: int) -> None:
        try:
            what = "slot" if os.readlink(f"/proc/self/fd/{fd}").endswith("slot_b.img") else "state and records"
        except OSError:
            what = "state and records"
        t0 = time.perf_counter()
        try:
            real_fsync(fd)
        finally:
            add(f"fsync {what}", t0)

    patches: list[tuple[Any, str, Any]] = [
        (inst, "open_verified", timed("read and verify the preamble", inst.open_verified)),
        (inst, "_prescan", timed("prescan (sha256 of the compressed data)", inst._prescan)),
        (inst.Installer, "_save_slot_record", timed("record manifest, signature, index",
                                                     inst.Installer._save_slot_record)),
        (inst.Installer, "activate", timed("activate (state.json, grubenv)", inst.Installer.activate)),
        (slot_device, "write_all", write_all),
        (os, "fsync", fsync),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        t0 = time.perf_counter()
        inst.Installer(sc.load(config)).install(str(bundle))
        total = time.perf_counter() - t0
    finally:
        for obj, name, old in originals:
            setattr(obj, name, old)
    out: dict[str, Any] = {"total_s": round(total, 4)}
    if "first pwrite" in marks:
        out["start_to_first_pwrite_s"] = round(marks["first pwrite"] - t0, 4)
        out["first_to_last_pwrite_s"] = round(marks["last pwrite"] - marks["first pwrite"], 4)
        out["after_last_pwrite_s"] = round(t0 + total - marks["last pwrite"], 4)
    out["steps_s"] = {k: round(v, 4) for k, v in spans.items()}
    out["step_calls"] = calls
    return out


def profile_main_thread(config: Path, bundle: Path, top: int) -> str:
    installer = inst.Installer(sc.load(config))
    prof = cProfile.Profile()
    prof.enable()
    installer.install(str(bundle))
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    return text[text.find("   ncalls"):].rstrip() if "   ncalls" in text else text.rstrip()


# --- the run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tools = require_tools("cat", "sh", "sync")
    load_start = round(os.getloadavg()[0], 2)
    pitstop = pitstop_command(args.pitstop)
    size = args.size
    payload = work / "payload.img"
    bundle = work / "bundle.pitb"
    keys = work / "keys"
    dev = BenchDevice(work / "device", size + (1 << 20))
    dev.root.mkdir()

    log(f"writing a {human(size)} filesystem-like payload to {payload}")
    t0 = time.perf_counter()
    stats = write_fs_like_payload(payload, size, seed=args.seed, corpus=args.corpus or DEFAULT_CORPUS)
    gen_s = time.perf_counter() - t0
    payload_sha = digest(payload)

    log("development keys and the bundle (pitstop bundle create, untimed setup)")
    run_timed([*pitstop, "-q", "keys", "create-dev", str(keys)])
    keyring = keys / "keyring.pem"
    warm(payload)
    create_s = run_timed([*pitstop, "-q", "bundle", "create", "-o", str(bundle), "--version", "1.0.0",
                          "--security-version", "1", "--compatible", COMPATIBLE, "--zstd-level",
                          str(args.zstd_level), "--payload", f"rootfs:rootfs:{payload}",
                          "--key", str(keys / "signing.key"), "--cert", str(keys / "chain.pem")])
    info = json.loads(subprocess.run([*pitstop, "bundle", "info", "--json", str(bundle)], check=True,
                                     capture_output=True).stdout)
    p_info = info["manifest"]["payloads"][0]
    bundle_size = bundle.stat().st_size

    def quiet() -> None:
        warm(payload, bundle)
        os.sync()

    def floor() -> Sample:
        zeroed_file(dev.slot_b, dev.slot_size)
        quiet()
        # `1<>` opens the slot read-write without truncating it: the same kind of target the installer gets.
        return run_timed([tools["sh"], "-c", 'cat "$1" 1<>"$2" && sync "$2"', "sh", str(payload), str(dev.slot_b)])

    def install(source: str) -> Sample:
        dev.reset(keyring)
        quiet()
        s = run_timed([*pitstop, "-q", "install", "--config", str(dev.config), source])
        check_installed(dev, size, payload_sha)
        return s

    def verify() -> Sample:
        quiet()
        return run_timed([*pitstop, "-q", "bundle", "verify", "--keyring", str(keyring), str(bundle)])

    def startup() -> Sample:
        return run_timed([*pitstop, "-q", "status", "--config", str(dev.config)])

    http_sent: list[int] = []
    modes = ["floor", "local"] + ([] if args.no_http else ["http"])
    t: dict[str, Best] = {m: Best() for m in [*modes, "verify", "startup"]}
    with serve(bundle) as (url, srv):
        def over_http() -> Sample:
            before = srv.sent
            s = install(url)
            http_sent.append(srv.sent - before)
            return s

        fns: dict[str, Callable[[], Sample]] = {"floor": floor, "local": lambda: install(str(bundle)),
                                                "http": over_http, "verify": verify, "startup": startup}
        for i in range(args.runs):
            k = i % len(modes)
            for mode in [*modes[k:], *modes[:k], "verify", "startup"]:
                s = fns[mode]()
                t[mode].samples.append(s)
                rate = f"{size / s.wall / 1e6:6.0f} MB/s" if mode != "startup" else " " * 11
                log(f"run {i + 1}/{args.runs} {mode:<7} {s.wall:7.3f} s  {rate}  cpu {s.cpu:.2f} s")

    profile: dict[str, Any] | None = None
    if args.profile:
        log("profile: single-threaded cost of each piece of work")
        quiet()
        costs = work_costs(bundle, dev.slot_b, dev.slot_size)
        log("profile: phases of one in-process install")
        dev.reset(keyring)
        quiet()
        phases = install_phases(dev.config, bundle)
        check_installed(dev, size, payload_sha)
        log("profile: cProfile of one in-process install (main thread)")
        dev.reset(keyring)
        quiet()
        prof = profile_main_thread(dev.config, bundle, 20)
        check_installed(dev, size, payload_sha)
        profile = {"work_costs_s": costs, "install_phases": phases, "cprofile_main_thread": prof}

    floor_best = t["floor"].best
    floor_median = statistics.median(s.wall for s in t["floor"].samples)
    results: dict[str, Any] = {
        "benchmark": "install",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "tools": {"cat": tool_version([tools["cat"], "--version"]), "pitstop": tool_version([*pitstop, "--version"])},
        "runs": args.runs,
        "payload": stats.to_json(),
        "payload_generate_s": round(gen_s, 3),
        "bundle_size": bundle_size,
        "bundle_chunks": p_info["chunks"],
        "bundle_ratio": round(size / p_info["data"]["size"], 3),
        "compressed_size": p_info["data"]["size"],
        "create_s": round(create_s.wall, 3),
        "slot_size": dev.slot_size,
        "timings": {k: v.to_json() for k, v in t.items()},
        "floor_s": round(floor_best, 4),
        "target": TARGET,
        "results": {},
    }
    for mode in ("local", "http", "verify"):
        if mode not in t:
            continue
        best = t[mode].best
        r: dict[str, Any] = {
            "best_s": round(best, 4),
            "median_s": round(t[mode].median, 4),
            "cpu_median_s": round(t[mode].cpu_median, 4),
            "mb_per_s": round(size / best / 1e6, 1),
            "ratio": round(best / floor_best, 3),
            "ratio_medians": round(t[mode].median / floor_median, 3),
        }
        if mode == "local":
            r["pass"] = best / floor_best <= TARGET
        if mode == "http":
            r["bytes_served"] = max(http_sent)
            r["bytes_served_ratio"] = round(max(http_sent) / bundle_size, 4)
        results["results"][mode] = r
    if profile is not None:
        results["profile"] = profile
    return results


def table(r: dict[str, Any]) -> str:
    t, res, m, pay = r["timings"], r["results"], r["machine"], r["payload"]
    size = pay["size"]
    kinds = ", ".join(f"{k} {v / size:.0%}" for k, v in pay["bytes_by_kind"].items())

    def row(name: str, key: str, ratio: str = "", target: str = "", verdict: str = "") -> str:
        k = t[key]
        best = k["best_s"]
        rate = f"{size / best / 1e6:>6.0f}" if key != "startup" else " " * 6
        return (f"{name:<40} {best:>7.3f} {rate} {ratio:>7} {target:>7} {verdict:>6}  "
                f"{k['median_s']:>6.3f}  {k['min_s']:.2f}-{k['max_s']:.2f}  {k['cpu_median_s']:>5.2f}").rstrip()

    load = r["load_average_start_end"]
    lines = [
        f"install  {r['date']}  payload {human(size)} ({size} bytes), best of {r['runs']} runs, page cache warm",
        f"machine  {m['cpu']}, {m['cores']} cores, {human(m['memory_bytes'])} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; load average {load[0]} before the runs",
        f"tools    {r['tools']['cat']}; {r['tools']['pitstop']}",
        f"payload  {kinds} ({pay['corpus_files']} real files; seed {pay['seed']}); bundle "
        f"{human(r['bundle_size'])}, ratio {r['bundle_ratio']}x, {r['bundle_chunks']} chunks",
        f"slot     regular file of {human(r['slot_size'])}, zero-filled and synced before every run",
        "",
        f"{'operation':<40} {'best s':>7} {'MB/s':>6} {'x floor':>7} {'target':>7} {'result':>6}  "
        f"{'median':>6}  {'range s':<9}  {'cpu s':>5}",
        row("floor: cat PAYLOAD 1<>SLOT && sync SLOT", "floor", "1.00"),
    ]
    loc = res["local"]
    lines.append(row("pitstop install BUNDLE (local file)", "local", f"{loc['ratio']:.2f}", f"<={TARGET}",
                     "PASS" if loc["pass"] else "FAIL"))
    if "http" in res:
        lines.append(row("pitstop install http://127.0.0.1:…", "http", f"{res['http']['ratio']:.2f}"))
    lines += [
        "",
        "informational:",
        row("  pitstop bundle verify BUNDLE", "verify", f"{res['verify']['ratio']:.2f}"),
        row("  pitstop start-up (pitstop -q status)", "startup"),
        f"  bundle create {r['create_s']:.2f} s (setup)"
        + (f"; bytes served per HTTP install: {res['http']['bytes_served']} = "
           f"{res['http']['bytes_served_ratio']:.4f}x the bundle" if "http" in res else ""),
        "",
        "MB/s: payload (uncompressed) bytes / 1e6 per second of the best run; range: fastest-slowest run;",
        "cpu s: user+system of the median run. x floor: best run / best floor run (medians in the JSON).",
    ]
    if "profile" in r:
        p = r["profile"]
        costs = p["work_costs_s"]
        cores = m["cores"] or 1
        compressed = sum(v for k, v in costs.items() if "compressed" in k)
        # A local install hashes the compressed data twice (prescan, then again while streaming).
        demand = sum(costs.values()) + compressed
        lines += ["", "profile (--profile; in this process, not part of the figures above)", "",
                  "  single-threaded cost of each piece of the install's work over this bundle:"]
        lines += [f"    {k:<40} {v:>7.3f} s" for k, v in costs.items()]
        lines += [f"    {'sum, compressed data read+hashed twice':<40} {demand:>7.3f} s  -> at least "
                  f"{demand / cores:.3f} s on {cores} cores, {demand / cores / r['floor_s']:.2f}x the floor",
                  "", "  one in-process local install:"]
        ph = p["install_phases"]
        lines.append(f"    {'total':<40} {ph['total_s']:>7.3f} s")
        for key, label in (("start_to_first_pwrite_s", "start to first slot write"),
                           ("first_to_last_pwrite_s", "first to last slot write"),
                           ("after_last_pwrite_s", "after the last slot write")):
            if key in ph:
                lines.append(f"    {label:<40} {ph[key]:>7.3f} s")
        lines.append("    steps inside (wall time in the main thread; they overlap: the record step includes fsyncs):")
        for k, v in ph["steps_s"].items():
            lines.append(f"      {k:<38} {v:>7.3f} s  ({ph['step_calls'][k]} calls)")
        lines += ["", "  cProfile of one in-process install, main thread only (the verify pool and hash thread are "
                  "not profiled;", "  'acquire' is the main thread waiting for them):",
                  *("    " + ln for ln in p["cprofile_main_thread"].splitlines())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("install", parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
