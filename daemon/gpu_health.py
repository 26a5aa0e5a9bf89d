"""GPU health: NVML (nvidia-ml-py, module `pynvml`) on discrete NVIDIA GPUs; sysfs and tegrastats on Jetson.

No library, no driver or no GPU is a normal device (CPU only): the source then yields nothing and says why
once in the log. A single figure a GPU does not support (power on some boards) is left out quietly.

Jetson: NVML initialises there but reports almost nothing (power, temperature, utilisation and memory are
NotSupported on Orin), so `gpu_source` picks `JetsonSource`: the iGPU's load, clock and temperature and the
INA3221 power rails from sysfs, and from a `tegrastats` child what sysfs does not show simply (the memory
controller's utilisation, the engines' clocks, and rails or temperatures where sysfs has none).
Readers and parser: jetson_telemetry.py.

pynvml is imported only once its library loads: the module alone is about 2 MiB of a CPU-only daemon's memory
(benchmarks/daemon_footprint.py), for a driver that is not there.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pitstop.daemon.health import AttrValue, LogOnce, Metric, MetricSource
from pitstop.daemon.jetson_telemetry import (
    TEGRASTATS_DIRS,
    GpuNode,
    RailChannel,
    TegrastatsProcess,
    TegrastatsSample,
    find_gpu,
    find_gpu_zone,
    find_rails,
    find_tegrastats,
    parse_tegrastats,
    read_gpu_freq_hz,
    read_gpu_load,
    read_rail_power_w,
    read_zone_celsius,
    thermal_zones,
)

log = logging.getLogger(__name__)

NVML_LIBRARY = "libnvidia-ml.so.1"  # what pynvml loads on Linux (the driver installs it)


def is_jetson(root: Path = Path("/")) -> bool:
    """L4T writes /etc/nv_tegra_release; the device tree names a Tegra SoC."""
    if (root / "etc/nv_tegra_release").exists():
        return True
    try:
        return b"nvidia,tegra" in (root / "proc/device-tree/compatible").read_bytes()
    except OSError:
        return False


def gpu_source(root: Path = Path("/")) -> MetricSource:
    """The GPU source that fits this device."""
    return JetsonSource(root) if is_jetson(root) else NvmlSource()


JETSON_GPU_ID = "igpu"  # hw.id of a Jetson's GPU: one per module, and sysfs shows no UUID for it
TEGRASTATS_INTERVAL_MS = 1000
_GPU_DESC = "Share of time the GPU was busy"
_TEMP_DESC = "Temperature of each sensor"
_NOT_ENGINES = frozenset({"GR3D", "GR3D2", "EMC"})  # the GPU (per GPC) and the memory controller: own metrics


@dataclass(frozen=True, slots=True)
class _JetsonFound:
    """What sysfs and the root's PATH offer, looked at once."""

    gpu: GpuNode | None
    gpu_zone: Path | None
    rails: list[RailChannel]
    zones: bool  # any thermal zone: then per-zone temperatures are the sampler's TemperatureReader's
    tegrastats: Path | None


class JetsonSource:
    """The iGPU, the memory controller (EMC), the power rails and the engines of a Jetson (docs/health.md).

    Each figure comes from sysfs where sysfs has it, from the newest tegrastats line otherwise: GPU load
    (gpu.0/load), GPU clock (devfreq cur_freq), GPU temperature (its thermal zone), rails (INA3221 hwmon). Only
    from tegrastats: EMC utilisation and clock, the engines' clocks. The thermal zones themselves are reported by
    the sampler's TemperatureReader; tegrastats' temperatures stand in only where sysfs shows no zone at all.

    Sysfs is looked at, and tegrastats started, on the first call, so the first sample has no tegrastats figures
    yet. A line older than `stale_s` is not used. `close()` ends the tegrastats child."""

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        tegrastats: Path | None = None,
        interval_ms: int = TEGRASTATS_INTERVAL_MS,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        stable_s: float = 60.0,
        stale_s: float | None = None,
    ) -> None:
        self.root = Path(root)
        self._tegrastats_path = tegrastats  # None: looked up under the root (/usr/bin/tegrastats on L4T)
        self._interval_ms = interval_ms
        self._backoff = (min_backoff_s, max_backoff_s, stable_s)
        # A line this old means tegrastats is stuck or gone: its figures would describe the past.
        self._stale_s = stale_s if stale_s is not None else max(10.0, 5 * interval_ms / 1000)
        self._lock = threading.Lock()
        self._found: _JetsonFound | None = None
        self._child: TegrastatsProcess | None = None
        self._bad_fields: set[str] = set()
        self._once = LogOnce(log)

    @property
    def tegrastats(self) -> TegrastatsProcess | None:
        """The tegrastats child (None before the first call, or without tegrastats)."""
        return self._child

    def close(self) -> None:
        with self._lock:
            child = self._child
        if child is not None:
            child.close()

    def __call__(self) -> list[Metric]:
        with self._lock:
            if self._found is None:
                self._found = self._discover()
            found = self._found
        ts = self._tegrastats_sample()
        out: list[Metric] = []
        gpu: dict[str, AttrValue] = {"hw.id": JETSON_GPU_ID, "hw.name": found.gpu.name if found.gpu else "gpu"}

        load = self._sysfs("GPU load", read_gpu_load, found.gpu)
        if load is None and ts is not None and ts.gpu is not None and ts.gpu.percent is not None:
            load = ts.gpu.percent / 100.0
        if load is not None:
            out.append(
                Metric("hw.gpu.utilization", load, "1", {**gpu, "hw.gpu.task": "general"}, description=_GPU_DESC)
            )

        freq = self._sysfs("GPU clock", read_gpu_freq_hz, found.gpu)
        if freq is None and ts is not None and ts.gpu is not None and ts.gpu.freq_mhz:
            freq = max(ts.gpu.freq_mhz) * 1_000_000  # per GPC on Orin; they run at one clock
        if freq is not None:
            out.append(Metric("pitstop.gpu.frequency", freq, "Hz", dict(gpu), description="GPU clock"))

        celsius: float | None = None
        if found.gpu_zone is not None:
            try:
                celsius = read_zone_celsius(found.gpu_zone)
            except (OSError, ValueError) as e:  # an absent sensor reads as an error (tegrastats: -256C)
                self._once(logging.DEBUG, f"health: Jetson GPU temperature unreadable: {e}")
        if celsius is None and ts is not None:
            celsius = next((c for name, c in ts.temperatures.items() if name.lower() == "gpu"), None)
        if celsius is not None:
            out.append(Metric("hw.temperature", celsius, "Cel", dict(gpu), description=_TEMP_DESC))

        if ts is not None and ts.emc is not None:
            if ts.emc.percent is not None:
                out.append(
                    Metric(
                        "pitstop.jetson.emc.utilization",
                        ts.emc.percent / 100.0,
                        "1",
                        description="Share of the memory controller's bandwidth in use (tegrastats EMC_FREQ)",
                    )
                )
            if ts.emc.freq_mhz:
                out.append(
                    Metric(
                        "pitstop.jetson.emc.frequency",
                        max(ts.emc.freq_mhz) * 1_000_000,
                        "Hz",
                        description="Memory controller clock",
                    )
                )

        out += self._rails(found, ts)

        if ts is not None:
            if not found.zones:
                out += [
                    Metric(
                        "hw.temperature",
                        c,
                        "Cel",
                        {"hw.id": f"tegrastats/{name}", "hw.name": name},
                        description=_TEMP_DESC,
                    )
                    for name, c in ts.temperatures.items()
                ]
            for name, engine in ts.engines.items():
                if name in _NOT_ENGINES or (engine.on and not engine.freq_mhz):
                    continue
                out.append(
                    Metric(
                        "pitstop.jetson.engine.frequency",
                        max(engine.freq_mhz) * 1_000_000 if engine.on else 0,
                        "Hz",
                        {"engine": name},
                        description="Clock of each accelerator engine (NVENC, NVDEC, VIC, DLA, APE...); 0 while off",
                    )
                )
        return out

    def _rails(self, found: _JetsonFound, ts: TegrastatsSample | None) -> list[Metric]:
        desc = "Power drawn through each power rail the module measures"
        out: list[Metric] = []
        if found.rails:
            for rail in found.rails:
                try:
                    watts = read_rail_power_w(rail)
                except (OSError, ValueError) as e:
                    self._once(logging.WARNING, f"health: power rail {rail.label} unreadable: {e}")
                    continue
                out.append(
                    Metric("hw.power", watts, "W", {"hw.id": rail.rail_id, "hw.name": rail.label}, description=desc)
                )
        elif ts is not None:
            out += [
                Metric("hw.power", r.current_mw / 1000.0, "W", {"hw.id": name, "hw.name": name}, description=desc)
                for name, r in ts.rails.items()
            ]
        return out

    def _sysfs(self, what: str, read: Callable[[GpuNode], float | int | None], node: GpuNode | None) -> float | None:
        if node is None:
            return None
        try:
            return read(node)
        except (OSError, ValueError) as e:
            self._once(logging.WARNING, f"health: Jetson {what} unreadable: {e}")
            return None

    def _tegrastats_sample(self) -> TegrastatsSample | None:
        child = self._child
        got = child.latest() if child is not None else None
        if got is None:
            return None
        line, age = got
        if age > self._stale_s:
            self._once(
                logging.WARNING, f"health: tegrastats printed nothing for {self._stale_s:g} s; its figures are left out"
            )
            return None
        sample = parse_tegrastats(line)
        for name, text in sample.problems:
            if name not in self._bad_fields:  # once per field, whatever its value
                self._bad_fields.add(name)
                log.warning("health: tegrastats field %s not understood (%r); left out", name, text[:100])
        return sample

    def _discover(self) -> _JetsonFound:
        root = self.root
        binary = self._tegrastats_path if self._tegrastats_path is not None else find_tegrastats(root)
        if binary is not None and not (binary.is_file() and os.access(binary, os.X_OK)):
            binary = None
        found = _JetsonFound(find_gpu(root), find_gpu_zone(root), find_rails(root), bool(thermal_zones(root)), binary)
        said: list[str] = []
        if found.gpu is not None:
            said.append(
                f"GPU {found.gpu.name}: load from {self._shown(found.gpu.load)}, "
                f"clock from {self._shown(found.gpu.devfreq, 'cur_freq')}"
            )
        else:
            said.append("no GPU in sysfs")
        said.append(f"GPU temperature from {self._shown(found.gpu_zone)}" if found.gpu_zone else "no GPU thermal zone")
        rails = ", ".join(r.rail_id for r in found.rails)
        said.append(f"power rails {rails} from INA3221" if rails else "no INA3221 power monitor in sysfs")
        if binary is not None:
            min_s, max_s, stable_s = self._backoff
            self._child = TegrastatsProcess(
                binary, self._interval_ms, min_backoff_s=min_s, max_backoff_s=max_s, stable_s=stable_s
            )
            said.append(f"EMC, engines and what sysfs lacks from {self._shown(binary)} every {self._interval_ms} ms")
        else:
            dirs = ", ".join(f"/{d}" for d in TEGRASTATS_DIRS)
            said.append(f"tegrastats not found (in {dirs}): no EMC figures, sysfs only")
        log.info("health: Jetson GPU telemetry: %s", "; ".join(said))
        return found

    def _shown(self, path: Path | None, child: str = "") -> str:
        """A path as the device names it (tests use a fake root)."""
        if path is None:
            return "nowhere"
        if child:
            path = path / child
        try:
            return "/" + str(path.relative_to(self.root))
        except ValueError:
            return str(path)


class NvmlSource:
    """Per-GPU utilisation, memory, temperature, power and energy through NVML.

    `nvml` is the pynvml module (imported on first use when None). Initialisation is tried once: a device
    without a driver does not grow one while the daemon runs."""

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml
        self._handles: list[tuple[Any, str, str]] | None = None  # (handle, uuid, name)
        self._disabled = False
        self._once = LogOnce(log)

    def _init(self) -> list[tuple[Any, str, str]]:
        if self._handles is not None:
            return self._handles
        try:
            if self._nvml is None:
                missing = nvml_library_error()
                if missing is not None:  # pynvml's own name for this, so the line reads the same either way
                    return self._disable(f"NVML unavailable: NVMLError_LibraryNotFound: {missing}")
                self._nvml = importlib.import_module("pynvml")
            nv = self._nvml
            nv.nvmlInit()
            handles = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                handles.append((h, _text(nv.nvmlDeviceGetUUID(h)), _text(nv.nvmlDeviceGetName(h))))
        except ImportError as e:
            return self._disable(f"nvidia-ml-py (pynvml) cannot be imported: {e}")
        except Exception as e:  # pynvml.NVMLError and its many leaves: no library, no driver, mismatch
            return self._disable(f"NVML unavailable: {_describe(e)}")
        if not handles:
            return self._disable("NVML finds no GPU")
        log.info("health: GPU metrics from NVML for %s", ", ".join(f"{name} ({uuid})" for _, uuid, name in handles))
        self._handles = handles
        return handles

    def _disable(self, reason: str) -> list[tuple[Any, str, str]]:
        self._disabled = True
        self._handles = []
        self._once(logging.INFO, f"health: no GPU metrics: {reason}")
        return []

    def __call__(self) -> list[Metric]:
        if self._disabled:
            return []
        out: list[Metric] = []
        for handle, uuid, name in self._init():
            out += self._device(handle, {"hw.id": uuid, "hw.name": name})
        return out

    def _device(self, h: Any, attrs: dict[str, str | bool | int | float]) -> list[Metric]:
        nv = self._nvml
        out: list[Metric] = []

        def get(what: str, fn: Any, *args: Any) -> Any:
            try:
                return fn(h, *args)
            except Exception as e:
                # NotSupported is a property of the board; anything else (GpuIsLost…) is worth one line.
                if type(e).__name__ != "NVMLError_NotSupported":
                    self._once(logging.WARNING, f"health: GPU {attrs['hw.id']}: {what}: {_describe(e)}")
                return None

        util = get("utilization", nv.nvmlDeviceGetUtilizationRates)
        if util is not None:
            out.append(
                Metric(
                    "hw.gpu.utilization",
                    util.gpu / 100.0,
                    "1",
                    {**attrs, "hw.gpu.task": "general"},
                    description="Share of time the GPU was busy",
                )
            )
        for task, fn_name in (
            ("encoder", "nvmlDeviceGetEncoderUtilization"),
            ("decoder", "nvmlDeviceGetDecoderUtilization"),
        ):
            coder = get(f"{task} utilization", getattr(nv, fn_name))
            if coder is not None:
                out.append(
                    Metric(
                        "hw.gpu.utilization",
                        coder[0] / 100.0,
                        "1",
                        {**attrs, "hw.gpu.task": task},
                        description="Share of time the GPU was busy",
                    )
                )
        mem = get("memory", nv.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            out += [
                Metric("hw.gpu.memory.usage", int(mem.used), "By", dict(attrs), description="GPU memory used"),
                Metric("hw.gpu.memory.limit", int(mem.total), "By", dict(attrs), description="GPU memory size"),
            ]
        temp = get("temperature", nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
        if temp is not None:
            out.append(
                Metric("hw.temperature", float(temp), "Cel", dict(attrs), description="Temperature of each sensor")
            )
        power = get("power", nv.nvmlDeviceGetPowerUsage)  # mW
        if power is not None:
            out.append(Metric("hw.power", power / 1000.0, "W", dict(attrs), description="GPU power draw"))
        energy = get("energy", nv.nvmlDeviceGetTotalEnergyConsumption)  # mJ since the driver loaded
        if energy is not None:
            out.append(
                Metric(
                    "hw.energy", energy / 1000.0, "J", dict(attrs), "sum", "GPU energy consumed since the driver loaded"
                )
            )
        return out


def nvml_library_error(name: str = NVML_LIBRARY) -> str | None:
    """Why the NVML library cannot be loaded (the loader's message), or None when it can."""
    try:
        ctypes.CDLL(name)
    except OSError as e:
        return str(e) or f"{name} cannot be loaded"
    return None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"
