"""The daemon's idle footprint: resident memory and CPU of `pitstop daemon` over a quiet window, with no loops
and with one ONNX Runtime CPU loop.

Issue targets: idle RSS <= 45 MiB without loops; idle CPU <= 0.5% of one core.

The real daemon runs as a subprocess (`pitstop daemon --config CFG --system-config SYS --bus-address ADDR`),
the way a device runs it but for what a development machine lacks:

- a private dbus-daemon with a permissive (session-bus-like) policy; the daemon's configuration says
  `bus = "session"` and --bus-address points it at the private bus;
- a file-backed development device: system.toml with two slot files, a grubenv in an ESP directory, a data
  directory and development keys (`pitstop keys create-dev`);
- no systemd: no NOTIFY_SOCKET (so `watchdog = false`), no journal (logs go to a file in the work directory);
- health at its default interval (30 s, --health-interval to change), the Prometheus endpoint on a free
  loopback port (the default configuration has it on; --no-prometheus turns it off), no OTLP URL, no update
  server (`server = ""`).

First one untimed start fills a bytecode cache in the work directory (PYTHONPYCACHEPREFIX; `warm_up`), so the
measured daemons load compiled modules as an installed pitstop does. Each case starts a fresh daemon, waits
until its bus name has an owner (and, with a loop, until the loop reports `running` and has written results),
lets it settle (--settle, default 5 s), then samples /proc every --interval seconds for --duration seconds
(default 60):

- RSS: VmRSS from /proc/PID/status at the start and end of the window and its maximum; PSS and USS
  (Private_Clean + Private_Dirty) from /proc/PID/smaps_rollup; VmHWM, the peak since the process started
  (start-up included), for scale;
- CPU: the change of utime + stime (/proc/PID/stat, all threads) over the window's wall time, in percent
  of one core; the same from the threads' run time in /proc/PID/task/*/schedstat (nanoseconds, where stat
  counts 10 ms steps; threads that exit during the window are missing from it); wake-ups: context switches of
  all its threads per second (/proc/PID/task/*/status).

The figures judged are the daemon's own: the maximum VmRSS against 45 MiB without loops, and its CPU
against 0.5% in both cases. With a loop, the loop runs in a child process (its own process group); the
child's figures (its process tree: RSS and PSS summed) are informational, as is the daemon's RSS with a
loop (the issue sets the RSS target without loops).

Usage:  .venv/bin/python benchmarks/daemon_footprint.py [--duration 60] [--case both] [--json]

Exits 0 whatever the verdict (benchmarks report, tests judge); non-zero only when it could not measure
(dbus-daemon missing, the daemon not starting or dying, the loop not running).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    CommandFailed,
    bench_main,
    bus_call,
    bus_has_owner,
    human,
    log,
    machine,
    pitstop_command,
    private_bus,
    require_tools,
    run_timed,
    tool_version,
)

from pitstop.daemon.dbus_api import BUS_NAME, INTERFACE, PATH
from pitstop.inference.errors import ModelError
from pitstop.inference.test_models import ORIENTATION, TEXT_DETECTION, locate
from pitstop.ota import grubenv

MIB = 1 << 20
RSS_TARGET = 45 * MIB  # idle RSS without loops
CPU_TARGET = 0.5  # percent of one core
CASES = ("no-loops", "one-loop")
LOOP_NAME = "bench"
COMPATIBLE = "pitstop-bench"
SLOT_SIZE = 8 << 20
START_TIMEOUT_S = 60.0
LOOP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds sampled per case (default 60)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds between ready (and, with a loop, running) and the window (default 5)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between /proc samples (default 1)")
    p.add_argument("--case", choices=(*CASES, "both"), default="both", help="which case to run (default both)")
    p.add_argument("--health-interval", type=float,
                   help="health.interval_s of the daemon (default: unset, the daemon's default of 30 s)")
    p.add_argument("--no-prometheus", action="store_true", help="prometheus_listen = \"\" (default: on loopback)")
    p.add_argument("--loop-model", choices=("orientation", "det"), default="orientation",
                   help="the loop's model: the orientation classifier (default) or the PP-OCRv4 text detector")
    p.add_argument("--loop-fps", type=float, default=10.0, help="frames per second of the loop's source (default 10)")
    p.add_argument("--loop-threads", type=int, default=1, help="the loop's CPU intra-op threads (default 1)")
    p.add_argument("--pitstop", help="pitstop executable (default: the one next to this Python)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the temporary work directory is made (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configuration, daemon logs)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.settle < 0:
        p.error("--duration and --interval must be positive, --settle not negative")
    return args


# --- /proc ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    """One look at one process (or the sum over a process tree)."""

    t: float  # time.monotonic()
    cpu_s: float  # utime + stime, all threads (those that exited included)
    rss: int  # VmRSS, bytes
    pss: int  # smaps_rollup Pss
    uss: int  # smaps_rollup Private_Clean + Private_Dirty
    hwm: int  # VmHWM: peak RSS since the process started
    threads: int
    switches: int  # voluntary + involuntary context switches of its live threads
    run_ns: int  # time on CPU of its live threads, in ns (schedstat): finer than cpu_s's clock ticks

    def __add__(self, other: ProcSample) -> ProcSample:
        return ProcSample(max(self.t, other.t), self.cpu_s + other.cpu_s, self.rss + other.rss,
                          self.pss + other.pss, self.uss + other.uss, self.hwm + other.hwm,
                          self.threads + other.threads, self.switches + other.switches, self.run_ns + other.run_ns)


def _kib_fields(text: str, names: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(names, 0)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in out:
            out[key] = int(rest.split()[0]) * 1024
    return out


def read_proc(pid: int) -> ProcSample | None:
    """None when the process is gone (or a zombie: no memory left to measure)."""
    base = Path(f"/proc/{pid}")
    try:
        t = time.monotonic()
        stat = (base / "stat").read_text()
        status = (base / "status").read_text()
        rollup = (base / "smaps_rollup").read_text()
        switches = run_ns = 0
        for task in (base / "task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that just exited
                sw = _kib_fields((task / "status").read_text(), ("voluntary_ctxt_switches",
                                                                 "nonvoluntary_ctxt_switches"))
                switches += sum(sw.values()) // 1024
                run_ns += int((task / "schedstat").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    st = _kib_fields(status, ("VmRSS", "VmHWM", "Threads"))
    roll = _kib_fields(rollup, ("Pss", "Private_Clean", "Private_Dirty"))
    return ProcSample(
        t=t,
        cpu_s=(int(fields[11]) + int(fields[12])) / CLK_TCK,  # utime, stime: fields 14 and 15 of stat(5)
        rss=st["VmRSS"], pss=roll["Pss"], uss=roll["Private_Clean"] + roll["Private_Dirty"], hwm=st["VmHWM"],
        threads=st["Threads"] // 1024, switches=switches, run_ns=run_ns,
    )  # fmt: skip


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (no /proc/PID/task/TID/children on kernels without
    CONFIG_PROC_CHILDREN)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int, tree: dict[int, int] | None = None) -> list[int]:
    tree = parents() if tree is None else tree
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in tree.items() if pp == p]
        found += kids
        todo += kids
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    try:
        return (Path(f"/proc/{pid}") / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def loop_child(daemon: int) -> int | None:
    """The loop child among the daemon's children (`python -m pitstop.daemon.loop_child`)."""
    tree = parents()
    return next((c for c, pp in tree.items() if pp == daemon and "pitstop.daemon.loop_child" in cmdline(c)), None)


def read_tree(pid: int) -> ProcSample | None:
    """`pid` and all its descendants, summed; None when `pid` is gone."""
    top = read_proc(pid)
    if top is None:
        return None
    for d in descendants(pid):
        s = read_proc(d)
        if s is not None:
            top = top + s
    return top


# --- a development device and the daemon ------------------------------------------------------------------


def make_device(root: Path, keyring: Path) -> Path:
    """A file-backed A/B device booted from slot a (as tests/devicekit.py makes one); returns its system.toml."""
    esp = root / "esp" / "EFI" / "BOOT"
    esp.mkdir(parents=True)
    (root / "data").mkdir()
    (esp / "grubenv").write_bytes(grubenv.encode({"ORDER": "a b", "a_OK": "1", "a_TRY": "3", "b_OK": "0",
                                                  "b_TRY": "0"}))
    for name in ("a", "b"):
        with open(root / f"slot_{name}.img", "wb") as f:
            f.truncate(SLOT_SIZE)
    (root / "boot_id").write_text("bench-boot-0\n")
    cfg = root / "system.toml"
    cfg.write_text(f'''compatible = "{COMPATIBLE}"
data_dir = "{root / "data"}"
keyring = "{keyring}"
clock = "floor"
booted_slot = "a"
boot_id = "{root / "boot_id"}"

[bootloader]
backend = "grub"
grubenv = "{esp / "grubenv"}"
tries = 3

[[slot]]
name = "a"
device = "{root / "slot_a.img"}"

[[slot]]
name = "b"
device = "{root / "slot_b.img"}"
''')
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LoopSetup:
    model: Path  # a link to the test model, its description beside it
    model_name: str
    size: tuple[int, int]  # (height, width) of the synthetic frames
    set_size: bool  # the model has dynamic spatial dimensions: the loop's `size` is set to the frames'
    fps: float
    threads: int
    sink: Path

    def toml(self) -> str:
        h, w = self.size
        size = f'size = "{h}x{w}"\n' if self.set_size else ""
        return f"""
[[loop]]
name = "{LOOP_NAME}"
model = "{self.model}"
source = "synthetic:"
source_opts = {{ width = "{w}", height = "{h}", fps = "{self.fps:g}" }}
sink = "jsonl:{self.sink}"
runtime = "onnxruntime"
providers = ["cpu"]
threads = {self.threads}
{size}"""


def prepare_loop(args: argparse.Namespace, work: Path) -> LoopSetup:
    try:
        found = locate(ORIENTATION if args.loop_model == "orientation" else TEXT_DETECTION)
    except ModelError as e:  # not installed: `./dev setup`
        sys.exit(f"daemon_footprint: no model for the loop: {e.message}")
    models = work / "models"
    models.mkdir(exist_ok=True)
    link = models / f"{args.loop_model}.onnx"
    link.symlink_to(found.model)
    (models / f"{args.loop_model}.toml").write_bytes(found.description.read_bytes())
    # The classifier takes 224x224 (its pre-processing resizes and crops); the detector is run at 320x320.
    size, dynamic = ((240, 320), False) if args.loop_model == "orientation" else ((320, 320), True)
    return LoopSetup(link, found.model.name, size, dynamic, args.loop_fps, args.loop_threads, work / "loop.jsonl")


def daemon_config(path: Path, state: Path, *, port: int | None, health_interval: float | None,
                  loop: LoopSetup | None) -> None:
    health = f"interval_s = {health_interval}\n" if health_interval is not None else ""
    listen = f"127.0.0.1:{port}" if port is not None else ""
    path.write_text(f'''bus = "session"
state_dir = "{state}"
watchdog = false

[health]
{health}prometheus_listen = "{listen}"

[update]
server = ""
{loop.toml() if loop else ""}''')


def daemon_env(pycache: Path) -> dict[str, str]:
    """This environment without what systemd (or a desktop session) would have set: no notify socket, no
    watchdog, no journal stream, no session bus; bytecode cached under `pycache` (see `warm_up`)."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "DBUS_SESSION_BUS_ADDRESS",
            "PITSTOP_CONFIG", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


@dataclass(frozen=True)
class Started:
    proc: subprocess.Popen[bytes]
    argv: list[str]
    logfile: Path
    ready_s: float  # from the start to the bus name having an owner
    running_s: float | None  # from the start to the loop running and writing results (with a loop)


@contextlib.contextmanager
def started(name: str, args: argparse.Namespace, work: Path, pitstop: list[str], bus: str, system: Path,
            loop: LoopSetup | None) -> Iterator[Started]:
    """A daemon with its own configuration, state and log under work/NAME, ready (and its loop running);
    SIGTERM (then SIGKILL) when the block ends if it still runs."""
    cdir = work / name
    cdir.mkdir()
    config = cdir / "pitstop.toml"
    port = None if args.no_prometheus else free_port()
    daemon_config(config, cdir / "state", port=port, health_interval=args.health_interval, loop=loop)
    logfile = cdir / "daemon.log"
    argv = [*pitstop, "daemon", "--config", str(config), "--system-config", str(system), "--bus-address", bus]
    log(f"{name}: starting the daemon")
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=daemon_env(work / "pycache"))
    try:
        ready_s = wait_for(f"{BUS_NAME} on the bus", lambda: bus_has_owner(bus, BUS_NAME), proc, argv, logfile,
                           START_TIMEOUT_S)
        running_s = None
        if loop is not None:

            def loop_running() -> bool:
                out = bus_call(bus, f"--dest={BUS_NAME}", PATH, "org.freedesktop.DBus.Properties.Get",
                               f"string:{INTERFACE}", "string:Loops")
                return '"running"' in out and count_lines(loop.sink) > 0

            running_s = ready_s + wait_for("the loop running", loop_running, proc, argv, logfile, LOOP_TIMEOUT_S)
        yield Started(proc, argv, logfile, ready_s, running_s)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def warm_up(args: argparse.Namespace, work: Path, pitstop: list[str], bus: str, system: Path,
            loop: LoopSetup | None) -> float:
    """One untimed start, with the loop when there is one, that fills the bytecode cache (PYTHONPYCACHEPREFIX in
    the work directory) with everything the daemon and its loop child import: the measured daemons then load
    compiled modules, as an installed pitstop does (pip compiles at install), whether or not this environment
    writes bytecode (PYTHONDONTWRITEBYTECODE) or the source tree has any. Returns the seconds to ready."""
    with started("warm-up", args, work, pitstop, bus, system, loop) as d:
        return d.running_s if d.running_s is not None else d.ready_s


def log_tail(logfile: Path, lines: int = 15) -> str:
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], argv: list[str], logfile: Path,
             timeout: float) -> float:
    """Poll `check()` until true; the seconds it took. CommandFailed when the daemon exits or time runs out."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise CommandFailed(argv, proc.returncode, f"the daemon exited before {what}:\n{log_tail(logfile)}")
        with contextlib.suppress(CommandFailed):
            if check():
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise CommandFailed(argv, -1, f"no {what} within {timeout:.0f} s:\n{log_tail(logfile)}")
        time.sleep(0.1)


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


# --- one case ------------------------------------------------------------------------------------------------


def summarize(samples: list[ProcSample]) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    wall = last.t - first.t
    cpu = last.cpu_s - first.cpu_s
    return {
        "samples": len(samples),
        "wall_s": round(wall, 3),
        "rss_start": first.rss,
        "rss_end": last.rss,
        "rss_max": max(s.rss for s in samples),
        "pss_end": last.pss,
        "pss_max": max(s.pss for s in samples),
        "uss_end": last.uss,
        "uss_max": max(s.uss for s in samples),
        "hwm": max(s.hwm for s in samples),
        "cpu_s": round(cpu, 3),
        "cpu_percent": round(100.0 * cpu / wall, 4) if wall > 0 else 0.0,
        # The same from schedstat (ns, threads alive at both ends only): a check on the tick-rounded figure.
        "cpu_percent_schedstat": round(100.0 * (last.run_ns - first.run_ns) / 1e9 / wall, 4) if wall > 0 else 0.0,
        "threads_max": max(s.threads for s in samples),
        "wakeups_per_s": round((last.switches - first.switches) / wall, 2) if wall > 0 else 0.0,
        "rss_series": [s.rss for s in samples],
    }


def run_case(case: str, args: argparse.Namespace, work: Path, pitstop: list[str], bus: str, system: Path,
             loop: LoopSetup | None) -> dict[str, Any]:
    warnings: list[str] = []
    with started(case, args, work, pitstop, bus, system, loop) as st:
        proc, argv, logfile, ready_s, running_s = st.proc, st.argv, st.logfile, st.ready_s, st.running_s
        log(f"{case}: ready after {ready_s:.2f} s; settling {args.settle:g} s, then sampling {args.duration:g} s")
        time.sleep(args.settle)
        child = loop_child(proc.pid) if loop is not None else None
        if loop is not None and child is None:
            raise CommandFailed(argv, -1, f"the loop child is not running:\n{log_tail(logfile)}")
        frames0 = count_lines(loop.sink) if loop else 0
        own: list[ProcSample] = []
        kids: list[ProcSample] = []
        others: set[int] = set()
        end = time.monotonic() + args.duration
        next_at = time.monotonic()
        while True:
            s = read_proc(proc.pid)
            if s is None or proc.poll() is not None:
                raise CommandFailed(argv, proc.poll() or -1, f"the daemon died while sampled:\n{log_tail(logfile)}")
            own.append(s)
            if child is not None:
                k = read_tree(child)
                if k is None:
                    warnings.append(f"the loop child {child} exited during the window")
                    child = None
                else:
                    kids.append(k)
            tree = parents()
            loop_tree = {child, *descendants(child, tree)} if child else set()
            others |= set(descendants(proc.pid, tree)) - loop_tree
            if s.t >= end:
                break
            next_at += args.interval
            time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
        frames1 = count_lines(loop.sink) if loop else 0
        if others:
            warnings.append(f"other children of the daemon seen during the window: {sorted(others)} "
                            "(their CPU is not in the daemon's figure)")
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
            warnings.append(f"the daemon did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM")
    if rc not in (0, None):
        warnings.append(f"the daemon exited {rc} after SIGTERM")
    if "Traceback" in logfile.read_text(errors="replace"):
        warnings.append(f"a Traceback in the daemon's log ({logfile}; --keep keeps it)")
    d = summarize(own)
    result: dict[str, Any] = {
        "case": case,
        "ready_s": round(ready_s, 3),
        "daemon": d,
        "rss_figure": d["rss_max"],
        "rss_ratio": round(d["rss_max"] / RSS_TARGET, 4),
        "rss_pass": d["rss_max"] <= RSS_TARGET,
        "rss_judged": loop is None,
        "cpu_figure": d["cpu_percent"],
        "cpu_ratio": round(d["cpu_percent"] / CPU_TARGET, 4),
        "cpu_pass": d["cpu_percent"] <= CPU_TARGET,
        "stop_returncode": rc,
        "warnings": warnings,
    }
    if loop is not None:
        result["loop_running_s"] = round(running_s or 0.0, 3)
        result["loop_child"] = summarize(kids) if len(kids) >= 2 else None
        result["loop_frames_per_s"] = round((frames1 - frames0) / d["wall_s"], 2) if d["wall_s"] else 0.0
    return result


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    require_tools("dbus-daemon", "dbus-send")
    pitstop = pitstop_command(args.pitstop)
    cases = CASES if args.case == "both" else (args.case,)
    load_start = round(os.getloadavg()[0], 2)
    log("development keys and a file-backed device")
    run_timed([*pitstop, "-q", "keys", "create-dev", str(work / "keys")])
    system = make_device(work / "device", work / "keys" / "keyring.pem")
    loop = prepare_loop(args, work) if "one-loop" in cases else None
    results: dict[str, Any] = {
        "benchmark": "daemon_footprint",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "tools": {"pitstop": tool_version([*pitstop, "--version"]),
                  "dbus-daemon": tool_version(["dbus-daemon", "--version"])},
        "settings": {"duration_s": args.duration, "settle_s": args.settle, "interval_s": args.interval,
                     "health_interval_s": args.health_interval or 30.0, "prometheus": not args.no_prometheus},
        "targets": {"rss_bytes": RSS_TARGET, "cpu_percent": CPU_TARGET},
        "load_average_start": load_start,
        "cases": {},
    }
    if loop is not None:
        results["loop"] = {"model": loop.model_name, "size": list(loop.size), "fps": loop.fps,
                           "threads": loop.threads, "runtime": "onnxruntime", "providers": ["cpu"]}
    with private_bus(work / "bus") as bus:
        log("warm-up start (fills the bytecode cache; not measured)")
        results["warm_up_ready_s"] = round(warm_up(args, work, pitstop, bus, system, loop), 3)
        for case in cases:
            results["cases"][case] = run_case(case, args, work, pitstop, bus, system,
                                              loop if case == "one-loop" else None)
    return results


# --- output --------------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def table(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        f"daemon_footprint  {r['date']}  window {s['duration_s']:g} s after a {s['settle_s']:g} s settle, "
        f"/proc sampled every {s['interval_s']:g} s",
        f"machine  {m['cpu']}, {m['cores']} cores, {human(m['memory_bytes'])} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; load average {r['load_average_start']} before",
        f"daemon   {r['tools']['pitstop']}: `pitstop daemon` on a private {r['tools']['dbus-daemon']}; "
        f"watchdog off, health every {s['health_interval_s']:g} s, Prometheus "
        f"{'on loopback' if s['prometheus'] else 'off'}, no OTLP, no update server",
    ]
    if "loop" in r:
        lp = r["loop"]
        lines.append(f"loop     {lp['model']} on ONNX Runtime's CPU EP, {lp['threads']} thread(s), synthetic "
                     f"{lp['size'][1]}x{lp['size'][0]} frames at {lp['fps']:g} fps -> a jsonl file")
    lines += ["", f"{'figure':<42} {'value':>10} {'target':>10} {'x target':>8}  result"]
    labels = {"no-loops": "no loops", "one-loop": "one loop"}
    for case, c in r["cases"].items():
        name = labels[case]
        judged = c["rss_judged"]
        verdict = "PASS" if c["rss_pass"] else "FAIL"
        lines.append(f"{'idle RSS, ' + name + ' (daemon, max VmRSS)':<42} {mib(c['rss_figure']) + ' MiB':>10} "
                     f"{'<=45 MiB' if judged else '(45 MiB)':>10} {c['rss_ratio']:>8.2f}  "
                     f"{verdict if judged else '(' + verdict.lower() + ', info)'}")
        lines.append(f"{'idle CPU, ' + name + ' (daemon)':<42} {c['cpu_figure']:>8.3f} % {'<=0.5 %':>10} "
                     f"{c['cpu_ratio']:>8.2f}  {'PASS' if c['cpu_pass'] else 'FAIL'}")
    lines += ["", f"{'process':<26} {'RSS start':>9} {'end':>6} {'max':>6} {'PSS':>6} {'USS':>6} {'HWM':>6}  "
              f"{'CPU %':>6} {'sched%':>6} {'cpu s':>6} {'thr':>3} {'wake/s':>6}"]

    def row(name: str, d: dict[str, Any]) -> str:
        return (f"{name:<26} {mib(d['rss_start']):>9} {mib(d['rss_end']):>6} {mib(d['rss_max']):>6} "
                f"{mib(d['pss_end']):>6} {mib(d['uss_end']):>6} {mib(d['hwm']):>6}  {d['cpu_percent']:>6.3f} "
                f"{d['cpu_percent_schedstat']:>6.3f} {d['cpu_s']:>6.2f} {d['threads_max']:>3} "
                f"{d['wakeups_per_s']:>6.1f}")

    for case, c in r["cases"].items():
        lines.append(row(f"{labels[case]}: daemon", c["daemon"]))
        if c.get("loop_child"):
            lines.append(row(f"{labels[case]}: loop child (info)", c["loop_child"]))
    lines.append("")
    for case, c in r["cases"].items():
        extra = f"; loop running after {c['loop_running_s']:.2f} s, {c['loop_frames_per_s']:.1f} results/s " \
                "in the window" if "loop_running_s" in c else ""
        lines.append(f"{labels[case]}: bus name owned {c['ready_s']:.2f} s after the start{extra}")
        lines += [f"{labels[case]}: warning: {w}" for w in c["warnings"]]
    lines += [
        "",
        "MiB throughout. RSS = VmRSS; PSS, USS (private pages) from smaps_rollup at the end of the window; HWM = peak",
        "VmRSS since the process started (start-up included). CPU % = (utime+stime) / window wall time, of one core",
        "(/proc shows it in 10 ms steps); sched% = the same from the threads' schedstat run time in ns (live threads",
        "only); wake/s = context switches of all its threads per second. The loop child's row is its process tree.",
        "Verdicts: the daemon's max VmRSS without loops against 45 MiB; its CPU in both cases against 0.5%.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("daemon_footprint", parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
