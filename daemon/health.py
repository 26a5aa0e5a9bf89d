"""Health sampling: the system's figures read from /proc and /sys, plus whatever sources the daemon registers.

A sample is a flat list of `Metric`s taken at one instant. Names follow the OpenTelemetry semantic
conventions where one exists (system.*, hw.*) and `pitstop.*` otherwise; docs/health.md lists them all.
Every reader takes a `root` (default "/") so tests can point it at a fake /proc and /sys tree.

A reader or a registered source that fails costs only its own metrics: the failure is logged once per
distinct message and the rest of the sample is still taken.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

AttrValue = str | bool | int | float
Kind = Literal["gauge", "sum"]


@dataclass(frozen=True, slots=True)
class Metric:
    """One value. `sum` is a monotonic cumulative counter counted from `start_ns` (None: the reporter's start);
    `gauge` is a value at the sample's instant."""

    name: str
    value: float | int
    unit: str = "1"  # UCUM, as OpenTelemetry writes it: "By", "s", "Cel", "1", "{report}"
    attributes: Mapping[str, AttrValue] = field(default_factory=dict)
    kind: Kind = "gauge"
    description: str = ""
    start_ns: int | None = None


@dataclass(frozen=True, slots=True)
class HealthSample:
    timestamp_ns: int  # wall clock (time.time_ns), as OTLP wants
    metrics: tuple[Metric, ...]

    def find(self, name: str, **attributes: AttrValue) -> list[Metric]:
        """The metrics called `name` whose attributes include `attributes`."""
        return [
            m for m in self.metrics if m.name == name and all(m.attributes.get(k) == v for k, v in attributes.items())
        ]


MetricSource = Callable[[], Iterable[Metric]]


class LogOnce:
    """Logs each distinct message once: a reader failing every interval must not flood the journal."""

    LIMIT = 1000  # distinct messages remembered; past that, new ones are logged every time

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[str] = set()

    def __call__(self, level: int, message: str) -> None:
        if message in self._seen:
            return
        if len(self._seen) < self.LIMIT:
            self._seen.add(message)
        self._log.log(level, "%s", message)


def _under(root: Path, path: str | Path) -> Path:
    """`path` (absolute, as the device sees it) inside `root`."""
    return root / Path(path).relative_to("/")


# -- CPU ----------------------------------------------------------------------------------------------------

# /proc/stat's cpu line: user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
# already inside user and nice, so only the first eight fields add up to the total.
_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# cpu.mode values of the semantic conventions; irq and softirq are both "interrupt" time.
_CPU_MODE = {"irq": "interrupt", "softirq": "interrupt"}


def read_cpu_times(root: Path) -> tuple[dict[str, int], int]:
    """Jiffies per cpu.mode over all CPUs, and the number of logical CPUs, from /proc/stat."""
    times: dict[str, int] = {}
    ncpu = 0
    for line in _under(root, "/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1 : 1 + len(_CPU_FIELDS)]]
            for name, v in zip(_CPU_FIELDS, values, strict=False):
                mode = _CPU_MODE.get(name, name)
                times[mode] = times.get(mode, 0) + v
        elif re.match(r"cpu\d+ ", line):
            ncpu += 1
    if not times:
        raise ValueError("no aggregate 'cpu' line in /proc/stat")
    return times, ncpu


class CpuReader:
    """Utilisation per mode between two readings; the first reading covers the time since boot."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._last: dict[str, int] = {}

    def __call__(self) -> list[Metric]:
        times, ncpu = read_cpu_times(self.root)
        delta = {mode: v - self._last.get(mode, 0) for mode, v in times.items()}
        if any(v < 0 for v in delta.values()):  # counters went back (CPU hot-unplug): start over from boot
            delta = times
        self._last = times
        total = sum(delta.values())
        out = [Metric("system.cpu.logical.count", ncpu, "{cpu}", description="Logical CPUs online")]
        if total > 0:
            out += [
                Metric(
                    "system.cpu.utilization",
                    v / total,
                    "1",
                    {"cpu.mode": mode},
                    description="Share of CPU time in each mode since the previous sample, all CPUs together",
                )
                for mode, v in delta.items()
            ]
        return out


def read_load(root: Path) -> list[Metric]:
    fields = _under(root, "/proc/loadavg").read_text().split()
    return [
        Metric(f"system.cpu.load_average.{span}", float(v), "{thread}", description=f"Load average over {span}")
        for span, v in zip(("1m", "5m", "15m"), fields[:3], strict=True)
    ]


def read_uptime(root: Path) -> list[Metric]:
    up = float(_under(root, "/proc/uptime").read_text().split()[0])
    return [Metric("system.uptime", up, "s", description="Time since boot")]


# -- memory -------------------------------------------------------------------------------------------------


def read_meminfo(root: Path) -> dict[str, int]:
    """/proc/meminfo in bytes (its "kB" are KiB)."""
    info: dict[str, int] = {}
    for line in _under(root, "/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        info[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def read_memory(root: Path) -> list[Metric]:
    m = read_meminfo(root)
    total, free = m["MemTotal"], m["MemFree"]
    buffers, cached = m.get("Buffers", 0), m.get("Cached", 0) + m.get("SReclaimable", 0)
    used = max(total - free - buffers - cached, 0)  # what free(1) calls used
    states = {"used": used, "free": free, "buffers": buffers, "cached": cached}
    out = [
        Metric("system.memory.usage", v, "By", {"system.memory.state": s}, description="Memory in each state")
        for s, v in states.items()
    ]
    out.append(Metric("system.memory.limit", total, "By", description="Total usable memory"))
    if total:
        out.append(
            Metric(
                "system.memory.utilization",
                used / total,
                "1",
                {"system.memory.state": "used"},
                description="Share of memory used",
            )
        )
    if "MemAvailable" in m:
        out.append(
            Metric(
                "system.linux.memory.available",
                m["MemAvailable"],
                "By",
                description="Memory available to start new applications without swapping",
            )
        )
    if m.get("SwapTotal"):
        swap_free = m.get("SwapFree", 0)
        out += [
            Metric(
                "system.paging.usage",
                m["SwapTotal"] - swap_free,
                "By",
                {"system.paging.state": "used"},
                description="Swap in each state",
            ),
            Metric(
                "system.paging.usage",
                swap_free,
                "By",
                {"system.paging.state": "free"},
                description="Swap in each state",
            ),
        ]
    return out


# -- filesystems --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    device: str
    mountpoint: str
    fstype: str
    read_only: bool = False


def _unescape(field_: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in octal (\040 …).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def read_mounts(root: Path) -> list[Mount] | None:
    """The mount table, or None where it cannot be read (then every existing path counts as mounted)."""
    try:
        text = _under(root, "/proc/mounts").read_text()
    except OSError:
        return None
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            ro = len(parts) >= 4 and "ro" in parts[3].split(",")
            mounts.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2], ro))
    return mounts


def _mount_of(path: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount `path` lives on: the longest mount point above it (the last one wins when stacked)."""
    best: Mount | None = None
    for m in mounts:
        mp = m.mountpoint.rstrip("/") or "/"
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mountpoint.rstrip("/") or "/")
        ):
            best = m
    return best


class FilesystemReader:
    """Usage of each configured partition through statvfs. A path that does not exist, or that is only a
    directory on another mount (the partition is not mounted), is skipped and named once in the log."""

    def __init__(self, root: Path, partitions: Sequence[Path]) -> None:
        self.root = root
        self.partitions = tuple(partitions)
        self._once = LogOnce(log)

    def __call__(self) -> list[Metric]:
        mounts = read_mounts(self.root)
        out: list[Metric] = []
        seen: set[str] = set()
        for part in self.partitions:
            path = os.path.normpath(str(part))
            attrs: dict[str, AttrValue] = {"system.filesystem.mountpoint": path}
            if path in seen:
                continue
            if not _under(self.root, path).exists():
                self._once(logging.WARNING, f"health: partition {path} does not exist; not reported")
                continue
            if mounts is not None:
                mount = _mount_of(path, mounts)
                if mount is None or (mount.mountpoint.rstrip("/") or "/") != path:
                    on = f"it lives on {mount.mountpoint}" if mount else "no mount covers it"
                    self._once(logging.WARNING, f"health: partition {path} is not mounted ({on}); not reported")
                    continue
                attrs.update({"system.device": mount.device, "system.filesystem.type": mount.fstype})
            try:
                st = os.statvfs(_under(self.root, path))
            except OSError as e:
                self._once(logging.WARNING, f"health: cannot statvfs {path}: {e.strerror}; not reported")
                continue
            # A read-only root (an A/B slot) is as full as its image: collectors tell it from space running out.
            ro = mount.read_only if mounts is not None and mount is not None else bool(st.f_flag & os.ST_RDONLY)
            attrs["system.filesystem.mode"] = "ro" if ro else "rw"
            seen.add(path)
            out += _fs_metrics(st, attrs)
        return out


def _fs_metrics(st: os.statvfs_result, attrs: Mapping[str, AttrValue]) -> list[Metric]:
    free = st.f_bavail * st.f_frsize  # what an unprivileged writer can still use
    reserved = (st.f_bfree - st.f_bavail) * st.f_frsize  # kept for root (ext4's reserved blocks)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    desc = "Filesystem space in each state"
    out = [
        Metric("system.filesystem.usage", v, "By", {**attrs, "system.filesystem.state": s}, description=desc)
        for s, v in (("used", used), ("free", free), ("reserved", reserved))
    ]
    out.append(
        Metric("system.filesystem.limit", st.f_blocks * st.f_frsize, "By", dict(attrs), description="Filesystem size")
    )
    if used + free:  # df's Use%: reserved space counts as neither
        out.append(
            Metric(
                "system.filesystem.utilization",
                used / (used + free),
                "1",
                dict(attrs),
                description="Share of the space available to unprivileged users that is used",
            )
        )
    return out


# -- temperatures -------------------------------------------------------------------------------------------


def _read_milli(path: Path) -> float:
    return int(path.read_text().strip()) / 1000.0


def _read_label(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class TemperatureReader:
    """hw.temperature from thermal zones and hwmon sensors. A sensor that cannot be read right now (many
    report EIO or ENODATA while their device sleeps) is left out of this sample."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._once = LogOnce(log)

    def __call__(self) -> list[Metric]:
        out: list[Metric] = []
        desc = "Temperature of each sensor"
        for zone in sorted(glob.glob(str(_under(self.root, "/sys/class/thermal/thermal_zone*"))), key=_natural):
            zone_path = Path(zone)
            try:
                celsius = _read_milli(zone_path / "temp")
            except (OSError, ValueError) as e:
                self._once(logging.DEBUG, f"health: {zone_path.name}: temperature unreadable: {e}")
                continue
            name = _read_label(zone_path / "type") or zone_path.name
            out.append(
                Metric("hw.temperature", celsius, "Cel", {"hw.id": zone_path.name, "hw.name": name}, description=desc)
            )
        for hwmon in sorted(glob.glob(str(_under(self.root, "/sys/class/hwmon/hwmon*"))), key=_natural):
            hwmon_path = Path(hwmon)
            chip = _read_label(hwmon_path / "name") or hwmon_path.name
            for sensor in sorted(hwmon_path.glob("temp*_input"), key=lambda p: _natural(str(p))):
                stem = sensor.name.removesuffix("_input")
                try:
                    celsius = _read_milli(sensor)
                except (OSError, ValueError) as e:
                    self._once(logging.DEBUG, f"health: {hwmon_path.name}/{stem}: temperature unreadable: {e}")
                    continue
                label = _read_label(hwmon_path / f"{stem}_label") or stem
                out.append(
                    Metric(
                        "hw.temperature",
                        celsius,
                        "Cel",
                        {"hw.id": f"{hwmon_path.name}/{stem}", "hw.name": f"{chip} {label}"},
                        description=desc,
                    )
                )
        return out


def _natural(s: str) -> list[Any]:
    """thermal_zone2 before thermal_zone10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# -- figures from other parts of the daemon -----------------------------------------------------------------

_QUANTILES = (("0.5", "p50_ms"), ("0.99", "p99_ms"))


def inference_metrics(loop: str, figures: Mapping[str, Any], timestamp_ns: int | None = None) -> list[Metric]:
    """An inference loop's figures (inference.stats.LoopFigures.as_dict()) as metrics with a `loop` attribute.

    Frame counters start when the loop process started (now - elapsed_s): a restarted loop starts them over,
    which OTLP consumers see as a counter reset."""
    now = time.time_ns() if timestamp_ns is None else timestamp_ns
    start = now - int(float(figures.get("elapsed_s", 0.0)) * 1e9)
    base = {"loop": loop}
    out = [
        Metric(
            "pitstop.inference.throughput",
            float(figures["throughput_fps"]),
            "{frame}/s",
            base,
            description="Frames delivered per second",
        ),
        Metric(
            "pitstop.inference.frames",
            int(figures["frames_in"]),
            "{frame}",
            {**base, "direction": "in"},
            "sum",
            "Frames read from the source (in) and delivered to the sink (out)",
            start,
        ),
        Metric(
            "pitstop.inference.frames",
            int(figures["frames_out"]),
            "{frame}",
            {**base, "direction": "out"},
            "sum",
            "Frames read from the source (in) and delivered to the sink (out)",
            start,
        ),
        Metric(
            "pitstop.inference.drops",
            int(figures["drops"]),
            "{frame}",
            base,
            "sum",
            "Frames replaced before preprocessing (live sources: latest frame wins)",
            start,
        ),
    ]
    for stage, fig in figures.get("stages", {}).items():
        if not fig.get("count"):
            continue
        out += [
            Metric(
                "pitstop.inference.latency",
                float(fig[key]) / 1e3,
                "s",
                {**base, "stage": stage, "quantile": q},
                description="Latency of each stage, p50 and p99",
            )
            for q, key in _QUANTILES
        ]
    return out


def state_metric(name: str, state: str, description: str = "", **attributes: AttrValue) -> Metric:
    """A state as a gauge of 1 with the state as attribute (`pitstop.update.state{state="downloading"} 1`)."""
    return Metric(name, 1, "", {**attributes, "state": state}, description=description)


def slot_metrics(booted: str | None, slots: Mapping[str, Mapping[str, AttrValue]]) -> list[Metric]:
    """pitstop.slot.status per slot: 1 with its facts as attributes (content, bootable, primary, version…),
    plus `booted`; `slots` comes from the update agent's view of BootEnv and Record."""
    return [
        Metric(
            "pitstop.slot.status",
            1,
            "",
            {**facts, "slot": slot, "booted": slot == booted},
            description="Each boot slot and what it holds",
        )
        for slot, facts in sorted(slots.items())
    ]


# -- the sampler --------------------------------------------------------------------------------------------


class HealthSampler:
    """Takes one `HealthSample`: the system readers, then each registered source in registration order."""

    def __init__(self, partitions: Sequence[Path] = (), *, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self._system: dict[str, MetricSource] = {
            "cpu": CpuReader(self.root),
            "load": lambda: read_load(self.root),
            "memory": lambda: read_memory(self.root),
            "filesystem": FilesystemReader(self.root, partitions),
            "temperature": TemperatureReader(self.root),
            "uptime": lambda: read_uptime(self.root),
        }
        self._sources: dict[str, MetricSource] = {}
        self._once = LogOnce(log)

    def set_partitions(self, partitions: Sequence[Path]) -> None:
        """A reloaded `partitions` list."""
        self._system["filesystem"] = FilesystemReader(self.root, partitions)

    def add_source(self, name: str, source: MetricSource) -> None:
        """Register (or replace) a source: inference loops, update state, slot status, GPU."""
        self._sources[name] = source

    def remove_source(self, name: str) -> None:
        self._sources.pop(name, None)

    def sample(self) -> HealthSample:
        """Reads files and calls statvfs: run it off the event loop (asyncio.to_thread)."""
        now = time.time_ns()
        metrics: list[Metric] = []
        for name, source in [*self._system.items(), *self._sources.items()]:
            try:
                metrics.extend(source())
            except Exception as e:  # one broken reader or source must not cost the others
                self._once(logging.WARNING, f"health: source {name!r} failed: {type(e).__name__}: {e}")
        return HealthSample(now, tuple(metrics))
