"""Jetson telemetry: `tegrastats` lines, the sysfs files behind them, and a long-running `tegrastats` child.

Three parts, each usable alone:

- `parse_tegrastats(line)`: one line of tegrastats output as a `TegrastatsSample`. Pure, and it never raises: a
  field it cannot read is left out and named in `problems`, and the rest of the line is still read. It reads the
  formats of JetPack 6 (L4T R36) and JetPack 5 (R35, R34), both with a leading `MM-DD-YYYY HH:MM:SS`, and the
  older JetPack 4 and L4T R28 lines (no timestamp, rails without `mW`, `cpu`/`EMC`/`GR3D` spelt the old way).
- sysfs readers, all relative to a `root` so tests can build a fake tree: the iGPU's load and clock
  (`find_gpu`), the INA3221 power monitors' rails (`find_rails`), the GPU's thermal zone (`find_gpu_zone`).
- `TegrastatsProcess`: `tegrastats --interval MS` as a child whose latest line a reader thread keeps, started on
  first use and restarted with back-off when it exits.

Why a child at all: the memory controller's (EMC) utilisation is not in sysfs on Orin (tegrastats reads it from
debugfs, as root), and boards without the INA3221 hwmon show their rails only through tegrastats. Every figure
sysfs has too is read there instead: no parsing, no child (docs/health.md, "Jetson").
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pitstop.daemon.health import LogOnce
from pitstop.daemon.restart_policy import ExitKind, LoopState, RestartPolicy
from pitstop.runner import clean_env

log = logging.getLogger(__name__)

TEGRASTATS = "tegrastats"
# Where L4T installs it (/usr/bin/tegrastats); looked up under the root so that tests can provide a stand-in.
TEGRASTATS_DIRS = ("usr/bin", "usr/sbin", "usr/local/bin", "bin", "sbin")

# tegrastats prints -256C for a sensor it cannot read (CV0..CV2, and GPU on some modules); no silicon is that cold.
ABSENT_BELOW_C = -100.0

# iGPU names: those jetson_stats accepts (jtop/core/gpu.py: Orin ga10b, Xavier gv11b, TX2 gp10b, gpu) and TX1's.
GPU_NODE_NAMES = frozenset({"ga10b", "gv11b", "gp10b", "gm20b", "gpu"})
# The load file tegrastats itself reads (its /tmp/.tstats.txt, quoted in jetson_stats issue #360): per-mille.
GPU_LOAD_FILES = ("sys/devices/platform/gpu.0/load", "sys/devices/gpu.0/load")

_LINE_LIMIT = 64 * 1024  # a tegrastats line is under 1 KiB; anything this long is not one
_STDERR_TAIL = 5
_STOP_GRACE_S = 2.0


# -- the parser ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Memory:
    """RAM, SWAP or IRAM as tegrastats prints them (its MB are MiB: it divides /proc/meminfo's kB by 1024)."""

    used_kib: int
    total_kib: int
    lfb_count: int | None = None  # "(lfb 8x2MB)": 8 free blocks ...
    lfb_kib: int | None = None  # ... of 2 MiB each, the largest the allocator has
    cached_kib: int | None = None  # SWAP's "(cached 1MB)"


@dataclass(frozen=True, slots=True)
class CpuCore:
    online: bool
    load_percent: float | None = None
    freq_mhz: int | None = None


@dataclass(frozen=True, slots=True)
class Engine:
    """EMC, GR3D (the GPU), NVENC, NVDEC, NVJPG, VIC, APE, NVDLA0, OFA ...: `X%@Y`, `X%@[Y,Y]`, `X%`, `@Y`, `Y`
    (a clock in MHz alone) or `off`."""

    on: bool = True
    percent: float | None = None
    freq_mhz: tuple[int, ...] = ()  # one per GPC for GR3D on Orin ("14%@[407,407]")


@dataclass(frozen=True, slots=True)
class Rail:
    """A power rail: `VDD_IN 4824mW/4824mW` (JetPack 5 and later) or `VDD_IN 3140/3208` (JetPack 4, also mW)."""

    current_mw: int
    average_mw: int  # tegrastats' own running average, since it started


@dataclass(frozen=True, slots=True)
class TegrastatsSample:
    timestamp: str | None = None  # "11-15-2024 08:38:09", local time as tegrastats printed it
    memory: Mapping[str, Memory] = field(default_factory=dict)  # "RAM", "SWAP", "IRAM"
    cpus: tuple[CpuCore, ...] = ()
    engines: Mapping[str, Engine] = field(default_factory=dict)  # names without "_FREQ": "EMC", "GR3D", "VIC"
    temperatures: Mapping[str, float] = field(default_factory=dict)  # names as printed: "cpu", "tj", "SOC0"
    rails: Mapping[str, Rail] = field(default_factory=dict)  # "VDD_IN", "VDD_CPU_GPU_CV"; "NC" left out
    problems: tuple[tuple[str, str], ...] = ()  # (field, text) that could not be read

    @property
    def gpu(self) -> Engine | None:
        return self.engines.get("GR3D")

    @property
    def emc(self) -> Engine | None:
        return self.engines.get("EMC")


_DATE = re.compile(r"\d{2}-\d{2}-\d{4}")
_TIME = re.compile(r"\d{2}:\d{2}:\d{2}")
_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_MEM_VALUE = re.compile(r"(\d+)/(\d+)(MB|kB)(\(.*)?")  # IRAM glues its "(lfb" to the value
_SIZE = re.compile(r"(?:(\d+)x)?(\d+)(MB|kB)")
_CPU_LIST = re.compile(r"\[(.*)\](?:@(\d+))?")
_CPU_CORE = re.compile(r"(\d+(?:\.\d+)?)%(?:@(\d+))?")
_TEMP = re.compile(r"([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C")
_RAIL_VALUE = re.compile(r"(\d+)(?:mW)?/(\d+)(?:mW)?")
_ENGINE_VALUE = re.compile(r"(?:(\d+(?:\.\d+)?)%)?(?:@(\d+|\[\d+(?:,\d+)*\]))?")
_MEMORY_NAMES = ("RAM", "SWAP", "IRAM")
_KIB = {"MB": 1024, "kB": 1}


def parse_tegrastats(line: str) -> TegrastatsSample:
    """One line of tegrastats output. Unknown fields are ignored; a known one that cannot be read is left out
    and named in `problems`. Never raises."""
    try:
        return _Parser(line).parse()
    except Exception as e:  # a bug here must cost one line, never the health source
        return TegrastatsSample(problems=(("line", f"{type(e).__name__}: {e}"),))


class _Parser:
    def __init__(self, line: str) -> None:
        self.tokens = line.split()
        self.timestamp: str | None = None
        self.memory: dict[str, Memory] = {}
        self.cpus: list[CpuCore] = []
        self.engines: dict[str, Engine] = {}
        self.temperatures: dict[str, float] = {}
        self.rails: dict[str, Rail] = {}
        self.problems: list[tuple[str, str]] = []

    def parse(self) -> TegrastatsSample:
        tokens = self.tokens
        i = 0
        if len(tokens) >= 2 and _DATE.fullmatch(tokens[0]) and _TIME.fullmatch(tokens[1]):
            self.timestamp = f"{tokens[0]} {tokens[1]}"
            i = 2
        while i < len(tokens):
            i = self._field(i)
        return TegrastatsSample(
            self.timestamp,
            self.memory,
            tuple(self.cpus),
            self.engines,
            self.temperatures,
            self.rails,
            tuple(self.problems),
        )

    def _field(self, i: int) -> int:
        """Read the field starting at token i; return the index of the next one."""
        tok = self.tokens[i]
        nxt = self.tokens[i + 1] if i + 1 < len(self.tokens) else None
        if tok in _MEMORY_NAMES:
            return self._memory(i)
        if tok.upper() == "CPU" and nxt is not None and nxt.startswith("["):
            return self._cpu(i)
        if m := _TEMP.fullmatch(tok):
            celsius = float(m.group(2))
            if celsius > ABSENT_BELOW_C:
                self.temperatures[m.group(1)] = celsius
            return i + 1
        if not _NAME.fullmatch(tok):
            return i + 1
        if nxt is not None and (m := _RAIL_VALUE.fullmatch(nxt)):
            if tok != "NC":  # a monitor channel that is not connected
                self.rails[tok] = Rail(int(m.group(1)), int(m.group(2)))
            return i + 2
        engine = _engine(nxt) if nxt is not None else None
        if engine is not None:
            self.engines[tok.removesuffix("_FREQ")] = engine
            return i + 2
        if tok.endswith("_FREQ"):  # a field we know, with a value we do not
            self.problems.append((tok, nxt or ""))
        return i + 1

    def _memory(self, i: int) -> int:
        name = self.tokens[i]
        value = self.tokens[i + 1] if i + 1 < len(self.tokens) else ""
        m = _MEM_VALUE.fullmatch(value)
        if m is None:
            self.problems.append((name, value))
            return i + 1
        unit = _KIB[m.group(3)]
        used, total = int(m.group(1)) * unit, int(m.group(2)) * unit
        j = i + 2
        words: list[str] = []
        opening = m.group(4)
        if opening is None and j < len(self.tokens) and self.tokens[j].startswith("("):
            opening = self.tokens[j]
            j += 1
        if opening is not None:
            text = opening
            while not text.endswith(")") and j < len(self.tokens):
                text += " " + self.tokens[j]
                j += 1
            if not text.endswith(")"):
                self.problems.append((name, f"{value} {text}"))
                self.memory[name] = Memory(used, total)
                return j
            words = text[1:-1].split()
        extra: dict[str, int | None] = {}
        if len(words) == 2 and (s := _SIZE.fullmatch(words[1])):
            size = int(s.group(2)) * _KIB[s.group(3)]
            if words[0] == "lfb":
                extra = {"lfb_count": int(s.group(1)) if s.group(1) else None, "lfb_kib": size}
            elif words[0] == "cached":
                extra = {"cached_kib": size}
        elif words:
            self.problems.append((name, " ".join(words)))
        self.memory[name] = Memory(used, total, **extra)
        return j

    def _cpu(self, i: int) -> int:
        j = i + 1
        text = self.tokens[j]
        while "]" not in text and j + 1 < len(self.tokens):
            j += 1
            text += self.tokens[j]
        m = _CPU_LIST.fullmatch(text)
        if m is None:
            self.problems.append(("CPU", text))
            return j + 1
        shared = int(m.group(2)) if m.group(2) else None  # L4T R28: "cpu [17%,13%,29%,5%]@408"
        for item in m.group(1).split(","):
            if item == "off":
                self.cpus.append(CpuCore(online=False))
            elif c := _CPU_CORE.fullmatch(item):
                self.cpus.append(CpuCore(True, float(c.group(1)), int(c.group(2)) if c.group(2) else shared))
            else:  # keep the place: the position is the core's number
                self.problems.append(("CPU", item))
                self.cpus.append(CpuCore(online=True))
        return j + 1


def _engine(value: str) -> Engine | None:
    if value == "off":
        return Engine(on=False)
    if value.isdigit():
        return Engine(freq_mhz=(int(value),))
    m = _ENGINE_VALUE.fullmatch(value)
    if m is None or (m.group(1) is None and m.group(2) is None):
        return None
    freq = m.group(2)
    clocks = tuple(int(f) for f in freq.strip("[]").split(",")) if freq else ()
    return Engine(percent=float(m.group(1)) if m.group(1) is not None else None, freq_mhz=clocks)


# -- sysfs --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuNode:
    """Where the iGPU's figures are: its load (per-mille) and its devfreq node (cur_freq in Hz)."""

    name: str  # "ga10b", or "gpu" when only the load file says there is one
    load: Path | None
    devfreq: Path | None


def find_gpu(root: Path) -> GpuNode | None:
    """The iGPU under `root`, or None when sysfs shows none."""
    devfreq: Path | None = None
    name = "gpu"
    base = root / "sys/class/devfreq"
    for node in sorted(base.iterdir()) if base.is_dir() else []:
        of_name = _read_text(node / "device/of_node/name")
        chip = node.name.rpartition(".")[2]  # "17000000.ga10b"
        if (of_name in GPU_NODE_NAMES or chip in GPU_NODE_NAMES) and (node / "cur_freq").exists():
            devfreq = node
            name = chip if chip in GPU_NODE_NAMES else of_name or name
            break
    load = next((root / p for p in GPU_LOAD_FILES if (root / p).is_file()), None)
    if load is None and devfreq is not None and (devfreq / "device/load").is_file():
        load = devfreq / "device/load"
    if load is None and devfreq is None:
        return None
    return GpuNode(name, load, devfreq)


def read_gpu_load(node: GpuNode) -> float | None:
    """Share of time the GPU was busy (0..1). Raises OSError or ValueError when the file cannot be read."""
    if node.load is None:
        return None
    return _read_int(node.load) / 1000.0


def read_gpu_freq_hz(node: GpuNode) -> int | None:
    if node.devfreq is None:
        return None
    return _read_int(node.devfreq / "cur_freq")


@dataclass(frozen=True, slots=True)
class RailChannel:
    """One INA3221 channel: in<N>_input (bus voltage, mV) and curr<N>_input (current, mA) under `label`."""

    label: str
    rail_id: str  # the label; "<label>@<i2c device>" where two channels share one
    voltage: Path
    current: Path


_IN_LABEL = re.compile(r"in(\d+)_label")


def find_rails(root: Path) -> list[RailChannel]:
    """Every connected INA3221 channel: /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon*/in<N>_label.

    Left out: channels labelled NC (not connected) and those without a current file (in7 is the sum of the
    shunt voltages, not a rail: kernel Documentation/hwmon/ina3221.rst)."""
    found: list[tuple[str, str, Path, Path]] = []
    for hwmon in sorted((root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
        device = hwmon.parent.parent.name  # "1-0040": bus 1, address 0x40
        for label_file in sorted(hwmon.glob("in*_label")):
            m = _IN_LABEL.fullmatch(label_file.name)
            label = _read_text(label_file)
            if m is None or not label or label == "NC":
                continue
            n = m.group(1)
            voltage, current = hwmon / f"in{n}_input", hwmon / f"curr{n}_input"
            if voltage.exists() and current.exists():
                found.append((label, device, voltage, current))
    labels = collections.Counter(label for label, *_ in found)
    return [
        RailChannel(label, label if labels[label] == 1 else f"{label}@{device}", voltage, current)
        for label, device, voltage, current in found
    ]


def read_rail_power_w(rail: RailChannel) -> float:
    """mV x mA. Raises OSError or ValueError when either file cannot be read."""
    return _read_int(rail.voltage) * _read_int(rail.current) / 1e6


def thermal_zones(root: Path) -> list[Path]:
    return sorted((root / "sys/class/thermal").glob("thermal_zone*"))


def zone_kind(zone_type: str) -> str:
    """The name tegrastats prints for a zone: "gpu-thermal" (R36) and "GPU-therm" (R35 and older) are "gpu"."""
    kind = zone_type.strip().lower()
    for suffix in ("-thermal", "-therm", "_thermal", "_therm"):
        kind = kind.removesuffix(suffix)
    return kind


def find_gpu_zone(root: Path) -> Path | None:
    """The thermal zone of the GPU, or None."""
    return next((z for z in thermal_zones(root) if zone_kind(_read_text(z / "type") or "") == "gpu"), None)


def read_zone_celsius(zone: Path) -> float:
    """Raises OSError where the sensor cannot be read (an absent one, as tegrastats' -256C) or ValueError."""
    return _read_int(zone / "temp") / 1000.0


def find_tegrastats(root: Path) -> Path | None:
    for d in TEGRASTATS_DIRS:
        candidate = root / d / TEGRASTATS
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _read_text(path: Path) -> str | None:
    try:
        # Device-tree strings end in NUL.
        return path.read_text(errors="replace").strip().strip("\0").strip() or None
    except OSError:
        return None


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


# -- the tegrastats child -----------------------------------------------------------------------------------


class TegrastatsProcess:
    """`tegrastats --interval MS` as a child process; a reader thread keeps its latest line.

    Started by the first `latest()`. When it exits it is started again after a back-off (RestartPolicy: doubling
    from `min_backoff_s` to `max_backoff_s`, reset by a run of `stable_s`); why it exited is logged once per
    distinct cause. `close()` ends it (SIGTERM, then SIGKILL) and is registered with atexit. Should the daemon
    die without it, the child goes at its next line: its stdout is a pipe nobody reads any more (SIGPIPE).

    Like every child of the daemon it runs with the clean environment of pitstop.runner and in its own process
    group, so that a stop reaches whatever it started."""

    def __init__(
        self,
        binary: Path,
        interval_ms: int = 1000,
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        stable_s: float = 60.0,
    ) -> None:
        self.binary = binary
        self.interval_ms = interval_ms
        self.starts = 0  # children spawned
        self._policy = RestartPolicy(min_backoff_s, max_backoff_s, stable_s)
        self._lock = threading.Lock()
        self._line: str | None = None
        self._line_at = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._once = LogOnce(log)

    def latest(self) -> tuple[str, float] | None:
        """The newest line and its age in seconds, or None before the first one."""
        self._start()
        with self._lock:
            if self._line is None:
                return None
            return self._line, time.monotonic() - self._line_at

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            _end(proc)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_STOP_GRACE_S * 2)
        atexit.unregister(self.close)

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._supervise, name="tegrastats", daemon=True)
            self._thread.start()
        atexit.register(self.close)

    def _supervise(self) -> None:
        self._policy.start(time.monotonic())
        while not self._stop.is_set():
            cause = self._run_once()
            if self._stop.is_set():
                break
            decision = self._policy.exited(time.monotonic(), ExitKind.CRASHED)
            delay = decision.delay_s if decision.delay_s is not None else self._policy.max_s
            self._once(logging.WARNING, f"health: tegrastats {cause}; restarting it with back-off")
            log.debug("health: tegrastats restarts in %.1f s", delay)
            if self._stop.wait(delay):
                break
            self._policy.backoff_over(time.monotonic())

    def _run_once(self) -> str:
        """Run one child to its end; say how it ended."""
        argv = [str(self.binary), "--interval", str(self.interval_ms)]
        log.debug("+ %s", shlex.join(argv))
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=clean_env(),
                start_new_session=True,
            )
        except OSError as e:
            return f"cannot be started: {e.strerror or e}"
        with self._lock:
            self._proc = proc
            self.starts += 1
        if self._stop.is_set():  # close() came between the spawn and the line above
            _end(proc)
        tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        errors = threading.Thread(target=_drain, args=(proc.stderr, tail), name="tegrastats-stderr", daemon=True)
        errors.start()
        try:
            self._read_lines(proc)
        finally:
            _end(proc)
            errors.join(_STOP_GRACE_S)
            with self._lock:
                self._proc = None
        said = f": {tail[-1]}" if tail else ""
        return f"{_describe(proc.returncode)}{said}"

    def _read_lines(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        too_long = False
        while True:
            raw = proc.stdout.readline(_LINE_LIMIT)
            if not raw:
                return
            if not raw.endswith(b"\n") and len(raw) >= _LINE_LIMIT:
                too_long = True  # skip up to the end of this "line"
                continue
            if too_long:
                too_long = False
                continue
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            now = time.monotonic()
            with self._lock:
                self._line, self._line_at = line, now
            if self._policy.state is LoopState.STARTING:
                self._policy.running(now)


def _drain(stream: IO[bytes] | None, tail: collections.deque[str]) -> None:
    """Keep the last lines of the child's stderr (for its exit cause); an unread pipe would stall it."""
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        while raw := stream.readline(_LINE_LIMIT):
            text = raw.decode("utf-8", "replace").strip()
            if text:
                tail.append(text[:200])


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's group, SIGKILL after the grace period; reaped either way."""
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(_STOP_GRACE_S)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"
