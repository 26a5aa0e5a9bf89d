"""Health sampling (daemon/health.py, daemon/gpu_health.py) against a fake /proc and /sys built from real files,
and once against this machine's own."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pitstop.daemon.gpu_health import JetsonSource, NvmlSource, gpu_source, is_jetson
from pitstop.daemon.health import (
    CpuReader,
    HealthSample,
    HealthSampler,
    Metric,
    inference_metrics,
    read_meminfo,
    slot_metrics,
    state_metric,
)

# Captured from a 2-core x86_64 VM (Debian 12, kernel 6.1).
PROC_STAT_1 = """\
cpu  1078474 0 244596 1537241 41172 0 5108 5488 0 0
cpu0 495540 0 100775 843639 11464 0 856 2830 0 0
cpu1 582934 0 143821 693602 29707 0 4252 2657 0 0
intr 18805569 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 52270392
btime 1795395682
processes 395567
procs_running 3
procs_blocked 0
softirq 8222336 0 701969 4 491986 3165634 0 72 1758785 254324 1849562
"""
# The same machine 22 s later.
PROC_STAT_2 = """\
cpu  1079910 0 245186 1559600 41834 0 5124 5498 0 0
cpu0 495802 0 100991 855495 11655 0 858 2835 0 0
cpu1 584108 0 144194 704105 30179 0 4266 2663 0 0
intr 18905569 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 52370392
btime 1795395682
processes 395601
procs_running 2
procs_blocked 0
softirq 8232336 0 701969 4 491986 3165634 0 72 1758785 254324 1849562
"""
MEMINFO = """\
MemTotal:       24684084 kB
MemFree:        23812684 kB
MemAvailable:   24172292 kB
Buffers:            5092 kB
Cached:           381032 kB
SwapCached:            0 kB
Active:           150884 kB
Inactive:         233696 kB
SwapTotal:       2097148 kB
SwapFree:        2000000 kB
Dirty:               200 kB
Shmem:              8872 kB
KReclaimable:     333236 kB
Slab:             366752 kB
SReclaimable:     333236 kB
SUnreclaim:        33516 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""
LOADAVG = "0.08 0.60 1.11 2/89 4143\n"
UPTIME = "14660.11 15372.41\n"
# A Jetson-like layout: data on its own partition, the ESP listed but not mounted, a mount point with a space.
MOUNTS = """\
/dev/mmcblk0p1 / ext4 ro,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/mmcblk0p4 /data ext4 rw,relatime 0 0
/dev/sda1 /media/usb\\040stick vfat rw,relatime 0 0
/dev/mmcblk0p9 /gone ext4 rw,relatime 0 0
"""


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write(root, "proc/stat", PROC_STAT_1)
    write(root, "proc/meminfo", MEMINFO)
    write(root, "proc/loadavg", LOADAVG)
    write(root, "proc/uptime", UPTIME)
    write(root, "proc/mounts", MOUNTS)
    (root / "data").mkdir()
    (root / "media/usb stick").mkdir(parents=True)
    (root / "boot/efi").mkdir(parents=True)
    # Thermal zones as a laptop's kernel lays them out (thermal_zone1 reads fail: EIO stand-in).
    write(root, "sys/class/thermal/thermal_zone0/type", "acpitz\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", "27800\n")
    write(root, "sys/class/thermal/thermal_zone1/type", "INT3400 Thermal\n")
    (root / "sys/class/thermal/thermal_zone1/temp").mkdir(parents=True)
    write(root, "sys/class/thermal/thermal_zone10/type", "x86_pkg_temp\n")
    write(root, "sys/class/thermal/thermal_zone10/temp", "45000\n")
    # hwmon entries are links into /sys/devices, as on a real system.
    dev = root / "sys/devices/platform/coretemp.0/hwmon/hwmon3"
    write(dev, "name", "coretemp\n")
    write(dev, "temp1_input", "52000\n")
    write(dev, "temp1_label", "Package id 0\n")
    write(dev, "temp2_input", "49000\n")
    write(dev, "temp2_label", "Core 0\n")
    nvme = root / "sys/devices/pci0000:00/0000:00:1d.0/nvme/nvme0/hwmon1"
    write(nvme, "name", "nvme\n")
    write(nvme, "temp1_input", "38850\n")  # no label: named after the sensor file
    (root / "sys/class/hwmon").mkdir(parents=True)
    (root / "sys/class/hwmon/hwmon3").symlink_to(dev)
    (root / "sys/class/hwmon/hwmon1").symlink_to(nvme)
    return root


def one(sample: HealthSample, name: str, **attrs: Any) -> Metric:
    found = sample.find(name, **attrs)
    assert len(found) == 1, f"{name} {attrs}: {found}"
    return found[0]


def test_fake_tree(fake_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    parts = (Path("/"), Path("/data"), Path("/boot/efi"), Path("/media/usb stick"), Path("/gone"), Path("/data/"))
    sampler = HealthSampler(parts, root=fake_root)
    with caplog.at_level(logging.WARNING, "pitstop.daemon.health"):
        s = sampler.sample()

    # CPU: the first sample covers the time since boot.
    user = one(s, "system.cpu.utilization", **{"cpu.mode": "user"}).value
    total = 1078474 + 244596 + 1537241 + 41172 + 5108 + 5488
    assert user == pytest.approx(1078474 / total)
    assert one(s, "system.cpu.utilization", **{"cpu.mode": "interrupt"}).value == pytest.approx(5108 / total)
    assert sum(m.value for m in s.find("system.cpu.utilization")) == pytest.approx(1.0)
    assert one(s, "system.cpu.logical.count").value == 2

    assert one(s, "system.cpu.load_average.15m").value == 1.11
    assert one(s, "system.uptime").value == 14660.11 and one(s, "system.uptime").unit == "s"

    kib = 1024
    used = (24684084 - 23812684 - 5092 - 381032 - 333236) * kib
    assert one(s, "system.memory.usage", **{"system.memory.state": "used"}).value == used
    assert one(s, "system.memory.usage", **{"system.memory.state": "cached"}).value == (381032 + 333236) * kib
    assert one(s, "system.memory.limit").value == 24684084 * kib
    assert one(s, "system.memory.utilization").value == pytest.approx(used / (24684084 * kib))
    assert one(s, "system.linux.memory.available").value == 24172292 * kib
    assert one(s, "system.paging.usage", **{"system.paging.state": "used"}).value == (2097148 - 2000000) * kib

    # Filesystems: the configured mount points that are mounted, each once, with device and type.
    mps = {m.attributes["system.filesystem.mountpoint"] for m in s.find("system.filesystem.usage")}
    assert mps == {"/", "/data", "/media/usb stick"}
    st = os.statvfs(fake_root / "data")
    free = one(
        s, "system.filesystem.usage", **{"system.filesystem.mountpoint": "/data", "system.filesystem.state": "free"}
    )
    assert free.unit == "By" and free.attributes["system.device"] == "/dev/mmcblk0p4"
    assert free.attributes["system.filesystem.type"] == "ext4"
    # The mount's mode (OpenTelemetry's system.filesystem.mode): the read-only root (an A/B slot) says so.
    assert free.attributes["system.filesystem.mode"] == "rw"
    root_used = one(
        s, "system.filesystem.usage", **{"system.filesystem.mountpoint": "/", "system.filesystem.state": "used"}
    )
    assert root_used.attributes["system.filesystem.mode"] == "ro"
    # statvfs of the same directory a moment later: equal but for whatever the machine wrote meanwhile.
    assert abs(free.value - st.f_bavail * st.f_frsize) < 256 << 20
    assert (
        one(s, "system.filesystem.limit", **{"system.filesystem.mountpoint": "/data"}).value
        == st.f_blocks * st.f_frsize
    )
    assert 0 <= one(s, "system.filesystem.utilization", **{"system.filesystem.mountpoint": "/"}).value <= 1
    assert "partition /boot/efi is not mounted (it lives on /)" in caplog.text
    assert "partition /gone does not exist" in caplog.text

    # Temperatures, in natural order, labelled; the unreadable zone is left out.
    temps = [(m.attributes["hw.id"], m.attributes["hw.name"], m.value) for m in s.find("hw.temperature")]
    assert temps == [
        ("thermal_zone0", "acpitz", 27.8),
        ("thermal_zone10", "x86_pkg_temp", 45.0),
        ("hwmon1/temp1", "nvme temp1", 38.85),
        ("hwmon3/temp1", "coretemp Package id 0", 52.0),
        ("hwmon3/temp2", "coretemp Core 0", 49.0),
    ]
    assert all(m.unit == "Cel" for m in s.find("hw.temperature"))

    # Warnings are given once, not every interval.
    caplog.clear()
    with caplog.at_level(logging.WARNING, "pitstop.daemon.health"):
        sampler.sample()
    assert caplog.text == ""


def test_cpu_utilisation_from_deltas(fake_root: Path) -> None:
    cpu = CpuReader(fake_root)
    cpu()
    write(fake_root, "proc/stat", PROC_STAT_2)
    second = HealthSample(0, tuple(cpu()))
    d = {"user": 1436, "nice": 0, "system": 590, "idle": 22359, "iowait": 662, "interrupt": 16, "steal": 10}
    total = sum(d.values())
    for mode, jiffies in d.items():
        assert one(second, "system.cpu.utilization", **{"cpu.mode": mode}).value == pytest.approx(jiffies / total)


def test_meminfo_units(fake_root: Path) -> None:
    info = read_meminfo(fake_root)
    assert info["MemTotal"] == 24684084 * 1024
    assert info["HugePages_Total"] == 0  # a count, not kB


def test_failing_source_costs_only_itself(fake_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    sampler = HealthSampler((), root=fake_root)

    def broken() -> list[Metric]:
        raise OSError("sensor bus hung")

    sampler.add_source("broken", broken)
    sampler.add_source("update", lambda: [state_metric("pitstop.update.state", "downloading")])
    (fake_root / "proc/meminfo").unlink()
    with caplog.at_level(logging.WARNING, "pitstop.daemon.health"):
        for _ in range(3):
            s = sampler.sample()
    assert one(s, "pitstop.update.state").attributes == {"state": "downloading"}
    assert s.find("system.uptime") and not s.find("system.memory.usage")
    assert caplog.text.count("source 'broken' failed: OSError: sensor bus hung") == 1
    assert caplog.text.count("source 'memory' failed") == 1
    sampler.remove_source("broken")
    assert not any(m.name.startswith("pitstop.x") for m in sampler.sample().metrics)


def test_this_machine() -> None:
    sampler = HealthSampler((Path("/"), Path("/no/such/partition")))
    s = sampler.sample()
    assert abs(s.timestamp_ns / 1e9 - time.time()) < 60
    assert sum(m.value for m in s.find("system.cpu.utilization")) == pytest.approx(1.0)
    assert one(s, "system.memory.limit").value > 0
    assert one(s, "system.uptime").value > 0
    assert one(s, "system.filesystem.limit", **{"system.filesystem.mountpoint": "/"}).value > 0
    assert len(s.find("system.cpu.load_average.1m")) == 1
    for m in s.find("hw.temperature"):  # present where the machine has sensors
        assert -50 < float(m.value) < 150
    time.sleep(0.2)
    s2 = sampler.sample()  # the second one measures the interval between the two
    assert sum(m.value for m in s2.find("system.cpu.utilization")) == pytest.approx(1.0)


def test_inference_figures_from_a_real_loop() -> None:
    from pitstop.inference.stats import LoopStats

    stats = LoopStats("onnxruntime")
    for i in range(100):
        stats.stages["infer"].add(0.010 + i * 1e-5)
        stats.stages["end_to_end"].add(0.030)
        stats.frames_in += 1
        stats.delivered(1000.0 + i / 30)
    stats.drops = 7
    figures = stats.snapshot().as_dict()
    now = 1_800_000_000 * 10**9
    s = HealthSample(now, tuple(inference_metrics("front-cam", figures, now)))
    assert one(s, "pitstop.inference.throughput").value == pytest.approx(30.0)
    assert one(s, "pitstop.inference.throughput").attributes == {"loop": "front-cam"}
    p99 = one(s, "pitstop.inference.latency", stage="infer", quantile="0.99")
    assert p99.unit == "s" and p99.value == pytest.approx(figures["stages"]["infer"]["p99_ms"] / 1e3)
    assert one(s, "pitstop.inference.latency", stage="end_to_end", quantile="0.5").value == pytest.approx(0.030)
    assert not s.find("pitstop.inference.latency", stage="preprocess")  # a stage that saw no frame
    drops = one(s, "pitstop.inference.drops")
    assert drops.kind == "sum" and drops.value == 7
    assert drops.start_ns is not None and drops.start_ns <= now
    assert one(s, "pitstop.inference.frames", direction="out").value == 100


def test_slot_metrics() -> None:
    ms = slot_metrics(
        "a",
        {
            "a": {"content": "good", "bootable": True, "primary": True},
            "b": {"content": "installed", "bootable": True, "primary": False, "version": "1.2.0"},
        },
    )
    s = HealthSample(0, tuple(ms))
    assert one(s, "pitstop.slot.status", slot="a").attributes["booted"] is True
    assert one(s, "pitstop.slot.status", slot="b", booted=False).attributes["version"] == "1.2.0"


# -- GPU ----------------------------------------------------------------------------------------------------


def test_no_nvml_library_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """On a machine without the NVIDIA driver (this one, unless it has a GPU) the source is empty."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML: see test_real_gpu")
    source = NvmlSource()
    with caplog.at_level(logging.INFO, "pitstop.daemon.gpu_health"):
        for _ in range(3):
            assert source() == []
    assert caplog.text.count("no GPU metrics: NVML unavailable: NVMLError_") == 1


class FakeDriver:
    """Stands in for libnvidia-ml behind pynvml's functions (the pynvml module itself needs the real library)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError_NotSupported(Exception):  # pynvml's names
        pass

    class NVMLError_GpuIsLost(Exception):
        pass

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.lost = False

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-0000-{h}"

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA RTX A2000" if h == 0 else b"NVIDIA L4"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        if self.lost:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetEncoderUtilization(self, h: int) -> list[int]:
        return [5, 167000]

    def nvmlDeviceGetDecoderUtilization(self, h: int) -> list[int]:
        raise self.NVMLError_NotSupported("Not Supported")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=6 << 30, used=1 << 30, free=5 << 30)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError_NotSupported("Not Supported")
        return 41250

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return 123_456_789


def test_nvml_mapping(caplog: pytest.LogCaptureFixture) -> None:
    driver = FakeDriver()
    source = NvmlSource(driver)
    s = HealthSample(0, tuple(source()))
    gpu0 = {"hw.id": "GPU-0000-0"}
    assert one(s, "hw.gpu.utilization", **gpu0, **{"hw.gpu.task": "general"}).value == pytest.approx(0.37)
    assert one(s, "hw.gpu.utilization", **gpu0, **{"hw.gpu.task": "encoder"}).value == pytest.approx(0.05)
    assert not s.find("hw.gpu.utilization", **{"hw.gpu.task": "decoder"})
    assert one(s, "hw.gpu.memory.limit", **gpu0).value == 6 << 30
    assert one(s, "hw.gpu.memory.usage", **gpu0).unit == "By"
    assert one(s, "hw.temperature", **gpu0).value == 61.0
    assert one(s, "hw.temperature", **{"hw.id": "GPU-0000-1"}).attributes["hw.name"] == "NVIDIA L4"
    assert one(s, "hw.power", **gpu0).value == pytest.approx(41.25)
    assert not s.find("hw.power", **{"hw.id": "GPU-0000-1"})  # NotSupported: quietly absent
    energy = one(s, "hw.energy", **gpu0)
    assert energy.kind == "sum" and energy.value == pytest.approx(123456.789)

    driver.lost = True
    with caplog.at_level(logging.WARNING, "pitstop.daemon.gpu_health"):
        for _ in range(3):
            s = HealthSample(0, tuple(source()))
    assert not s.find("hw.gpu.utilization", **{"hw.gpu.task": "general"})
    assert s.find("hw.gpu.memory.usage")  # the rest still comes
    assert caplog.text.count("GPU-0000-0: utilization: NVMLError_GpuIsLost") == 1
    assert "NotSupported" not in caplog.text


def test_nvml_without_gpus(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "pitstop.daemon.gpu_health"):
        source = NvmlSource(FakeDriver(count=0))
        assert source() == [] and source() == []
    assert caplog.text.count("NVML finds no GPU") == 1


def test_jetson_hook(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not is_jetson(tmp_path)
    assert isinstance(gpu_source(tmp_path), NvmlSource)
    write(tmp_path, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic\n")
    source = gpu_source(tmp_path)
    assert isinstance(source, JetsonSource)
    with caplog.at_level(logging.INFO, "pitstop.daemon.gpu_health"):
        assert list(source()) == [] and list(source()) == []
    assert caplog.text.count("Jetson GPU telemetry") == 1
    (tmp_path / "etc/nv_tegra_release").unlink()
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/compatible").write_bytes(b"nvidia,p3768-0000+p3767-0005\0nvidia,tegra234\0")
    assert is_jetson(tmp_path)


@pytest.mark.gpu
def test_real_gpu() -> None:
    s = HealthSample(0, tuple(NvmlSource()()))
    limits = s.find("hw.gpu.memory.limit")
    assert limits and all(int(m.value) > 0 for m in limits)
    assert all(0 <= float(m.value) <= 1 for m in s.find("hw.gpu.utilization"))
