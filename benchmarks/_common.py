"""Shared helpers for the benchmark scripts: sizes, timing external commands, machine description, and
a deterministic filesystem-like payload generator.

Benchmarks are run as scripts (`.venv/bin/python benchmarks/NAME.py`), so this module is imported as
`_common` from the script's own directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitstop.progress import human_size

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)
PAGE = 4096


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '100M' (decimal), '4096' -> bytes."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 1GiB, 512MiB, 100M, 4096)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def human(n: float) -> str:
    return human_size(n, 2)


# --- machine -----------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def tool_version(argv: Sequence[str]) -> str:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "not found"
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0].strip("* ") if lines else "unknown"


def machine() -> dict[str, object]:
    mem = 0
    with contextlib.suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "sha_ni": "sha_ni" in flags,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def require_tools(*names: str) -> dict[str, str]:
    paths = {}
    missing = []
    for name in names:
        p = shutil.which(name)
        if p is None:
            missing.append(name)
        else:
            paths[name] = p
    if missing:
        sys.exit(f"benchmark needs {', '.join(missing)} on PATH")
    return paths


# --- timing ------------------------------------------------------------------------------------------


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], rc: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {rc}: {stderr.strip()[-2000:]}")
        self.argv = list(argv)
        self.rc = rc
        self.stderr = stderr


def run_timed(argv: Sequence[str], *, stdout: int | None = subprocess.DEVNULL) -> Sample:
    """Wall and CPU (user + system) time of one run of `argv`, process start included; raise CommandFailed."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(list(argv), stdout=stdout, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise CommandFailed(argv, res.returncode, res.stderr.decode(errors="replace"))
    return Sample(elapsed, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float

    def __add__(self, other: Sample) -> Sample:
        return Sample(self.wall + other.wall, self.cpu + other.cpu)


@dataclass
class Timing:
    samples: list[Sample] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median wall time."""
        return statistics.median(s.wall for s in self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    def to_json(self) -> dict[str, object]:
        return {"median_s": round(self.median, 4), "samples_s": [round(s.wall, 4) for s in self.samples],
                "min_s": round(min(s.wall for s in self.samples), 4),
                "max_s": round(max(s.wall for s in self.samples), 4),
                "cpu_median_s": round(self.cpu_median, 4)}


def repeat(fn: Callable[[], Sample], n: int, before: Callable[[], None] | None = None) -> Timing:
    """Call `fn` (which returns what it measured) n times; `before` runs untimed before each call."""
    t = Timing()
    for _ in range(n):
        if before:
            before()
        t.samples.append(fn())
    return t


def warm(*paths: Path) -> None:
    """Read each file once so it is in the page cache before anything is timed."""
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def drop_file(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- a filesystem-like payload -----------------------------------------------------------------------

DEFAULT_CORPUS = (Path("/usr/lib"), Path("/usr/share"))
# Byte shares of the payload: real files (each padded to a 4 KiB block, like a filesystem image),
# incompressible extents (already-compressed files: .gz, .jpg, .zst, firmware) and free space.
DEFAULT_MIX = {"files": 0.65, "random": 0.25, "zeros": 0.10}
_MAX_FILE_EXTENT = 16 << 20


def iter_corpus_files(dirs: Sequence[Path]) -> Iterator[Path]:
    """Regular, non-empty files under `dirs`, in a stable (sorted) order; symlinks are not followed."""
    for top in dirs:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if p.is_file() and not p.is_symlink() and st.st_size > 0:
                    yield p


def _synthetic_files(rng: random.Random) -> Iterator[bytes]:
    """Text-like stand-in when no corpus directory is readable."""
    words = [b"usr", b"lib", b"share", b"libc.so.6", b"ELF", b"\n", b"#include", b"return", b"0x7f", b"pitstop"]
    while True:
        n = rng.randint(1, 256) * 1024
        yield b" ".join(rng.choice(words) for _ in range(n // 5))[:n]


def _corpus(dirs: Sequence[Path], rng: random.Random) -> Iterator[bytes]:
    """File contents in corpus order, repeated from the start when exhausted."""
    while True:
        found = False
        for p in iter_corpus_files(dirs):
            try:
                with open(p, "rb") as f:
                    data = f.read(_MAX_FILE_EXTENT)
            except OSError:
                continue
            if data:
                found = True
                yield data
        if not found:
            yield from _synthetic_files(rng)


@dataclass
class PayloadStats:
    size: int
    shares: dict[str, int]
    corpus_files: int
    corpus: list[str]
    seed: int

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "bytes_by_kind": self.shares, "corpus_files": self.corpus_files,
                "corpus": self.corpus, "seed": self.seed}


def write_fs_like_payload(path: Path, size: int, *, seed: int = 1, corpus: Sequence[Path] = DEFAULT_CORPUS,
                          mix: dict[str, float] | None = None) -> PayloadStats:
    """Write `size` bytes that look like a root filesystem image: real files from `corpus` (padded to
    4 KiB), seeded random extents and zero runs, interleaved by a seeded RNG.

    Deterministic for a given seed and corpus content (the corpus is this machine's files, so another
    machine gets different but similar bytes)."""
    mix = dict(mix or DEFAULT_MIX)
    rng = random.Random(seed)
    files = _corpus([d for d in corpus if d.is_dir()], random.Random(seed + 1))
    kinds = list(mix)
    emitted = dict.fromkeys(kinds, 0)
    written = 0
    nfiles = 0
    with open(path, "wb") as out:
        while written < size:
            # The kind furthest below its share goes next; the jitter varies the interleaving.
            done = max(written, 1)
            kind = max(kinds, key=lambda k: mix[k] - emitted[k] / done + rng.uniform(0.0, 0.01))
            if kind == "files":
                data = next(files)
                nfiles += 1
                pad = -len(data) % PAGE
                extent = data + bytes(pad) if pad else data
            elif kind == "random":
                extent = rng.randbytes(rng.randint(4, 512) * PAGE)  # 16 KiB .. 2 MiB
            else:
                extent = bytes(rng.randint(4, 2048) * PAGE)  # 16 KiB .. 8 MiB
            extent = extent[: size - written]
            out.write(extent)
            emitted[kind] += len(extent)
            written += len(extent)
    return PayloadStats(size, emitted, nfiles, [str(d) for d in corpus], seed)


def bench_main(name: str, args: Any, run: Callable[[Any, Path], dict[str, Any]],
               table: Callable[[dict[str, Any]], str]) -> int:
    """The shared driver: a fresh work directory (kept with --keep), run, print the table or --json."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"pitstop-bench-{name}-", dir=args.workdir))
    try:
        results = run(args, work)
    except CommandFailed as e:
        sys.stderr.write(f"{name}: could not measure: {e}\n")
        return 1
    finally:
        if args.keep:
            sys.stderr.write(f"work directory kept: {work}\n")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


# --- a private D-Bus ---------------------------------------------------------------------------------

# Every call reaches the service (the session-bus kind of policy): what is measured is the daemon, not the bus.
_PERMISSIVE_BUS = (
    '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" '
    '"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
    "<busconfig><type>pitstop-bench</type><listen>unix:path={sock}</listen><auth>EXTERNAL</auth>"
    '<policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>'
    '<allow send_type="signal"/><allow send_requested_reply="true"/><allow receive_type="*"/></policy>'
    "</busconfig>\n"
)


@contextlib.contextmanager
def private_bus(directory: Path) -> Iterator[str]:
    """A dbus-daemon of its own (socket and configuration in `directory`), never the host's buses; yields its
    address and stops it afterwards. Raises CommandFailed when it does not start."""
    exe = require_tools("dbus-daemon")["dbus-daemon"]
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "bus.conf"
    conf.write_text(_PERMISSIVE_BUS.format(sock=directory / "bus"))
    argv = [exe, "--config-file", str(conf), "--nofork", "--nopidfile", "--print-address=1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            raise CommandFailed(argv, proc.wait(), proc.stderr.read() if proc.stderr else "")
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


def bus_call(address: str, *args: str, timeout: float = 20) -> str:
    """`dbus-send --print-reply` on the bus at `address`: its output; raises CommandFailed."""
    argv = ["dbus-send", f"--bus={address}", "--print-reply", f"--reply-timeout={int(timeout * 1000)}", *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5, check=False)
    if res.returncode != 0:
        raise CommandFailed(argv, res.returncode, res.stderr)
    return res.stdout


def bus_has_owner(address: str, name: str) -> bool:
    out = bus_call(address, "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus.NameHasOwner", f"string:{name}")
    return "boolean true" in out


def pitstop_command(explicit: str | None) -> list[str]:
    """The pitstop to measure: --pitstop, else the venv's script, else PATH, else `python -m`."""
    if explicit:
        return [explicit]
    script = Path(sys.executable).parent / "pitstop"
    if script.exists():
        return [str(script)]
    found = shutil.which("pitstop")
    if found:
        return [found]
    return [sys.executable, "-m", "pitstop.cli"]


def log(msg: str) -> None:
    # Progress goes to stderr so that stdout is only the table (or the JSON).
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()
