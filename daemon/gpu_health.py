"""GPU health: NVML (nvidia-ml-py, module `pynvml`) on discrete NVIDIA GPUs; a hook for Jetson.

No library, no driver or no GPU is a normal device (CPU only): the source then yields nothing and says why
once in the log. A single figure a GPU does not support (power on some boards) is left out quietly.

Jetson: NVML initialises there but reports almost nothing (power, temperature, utilisation and memory are
NotSupported on Orin), so `gpu_source` picks `JetsonSource`, which is the place to read tegrastats or sysfs
(a later issue; it yields nothing for now).

pynvml is imported only once its library loads: the module alone is about 2 MiB of a CPU-only daemon's memory
(benchmarks/daemon_footprint.py), for a driver that is not there.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from pathlib import Path
from typing import Any

from pitstop.daemon.health import LogOnce, Metric, MetricSource

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
    return JetsonSource() if is_jetson(root) else NvmlSource()


class JetsonSource:
    """Hook for Jetson GPU telemetry (tegrastats: GR3D_FREQ, EMC_FREQ, temperatures, power rails; or sysfs
    under /sys/devices/platform/gpu.0 and /sys/class/devfreq). Not implemented yet: yields nothing."""

    def __init__(self) -> None:
        self._once = LogOnce(log)

    def __call__(self) -> list[Metric]:
        self._once(
            logging.INFO, "health: Jetson GPU telemetry (tegrastats/sysfs) is not implemented yet; no GPU metrics"
        )
        return []


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
