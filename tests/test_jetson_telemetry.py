"""Jetson telemetry (daemon/jetson_telemetry.py and JetsonSource in daemon/gpu_health.py).

Nothing here ran on a Jetson. The tegrastats lines are quoted, byte for byte, from public sources named beside
each one; the few made-up edge cases say so. The sysfs trees are real files in tmp_path laid out as the sources
named in fake_orin() describe. The child-process path is exercised for real: a stand-in `tegrastats` script
prints the quoted lines at the interval it is given, exits, hangs or is missing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pitstop.daemon.gpu_health import JETSON_GPU_ID, JetsonSource, gpu_source
from pitstop.daemon.health import HealthSample, HealthSampler, Metric
from pitstop.daemon.jetson_telemetry import (
    CpuCore,
    Engine,
    GpuNode,
    Memory,
    Rail,
    TegrastatsProcess,
    find_gpu,
    find_gpu_zone,
    find_rails,
    find_tegrastats,
    parse_tegrastats,
    read_gpu_freq_hz,
    read_gpu_load,
    read_rail_power_w,
    read_zone_celsius,
    zone_kind,
)

MIB = 1024  # tegrastats' MB in KiB

# -- quoted tegrastats lines --------------------------------------------------------------------------------

# JetPack 6 (L4T R36), Orin Nano/NX 8 GB class (7620 MB, six cores), run as root (EMC and GPU clock present).
# henrygd/beszel, agent/gpu_test.go, TestParseJetsonData "more valid data", added in commit 521be05bc149
# (2025-03-13) while working on https://github.com/henrygd/beszel/issues/286 ("On jetson orin nano some nvidia
# stats are not visible", a board on kernel 5.15.148-tegra, i.e. L4T R36; the line is dated the day after).
ORIN_NANO_R36 = (
    "11-15-2024 08:38:09 RAM 6185/7620MB (lfb 8x2MB) SWAP 851/3810MB (cached 1MB) "
    "CPU [15%@729,11%@729,14%@729,13%@729,11%@729,8%@729] EMC_FREQ 43%@2133 GR3D_FREQ 63%@[621] NVDEC off "
    "NVJPG off NVJPG1 off VIC off OFA off APE 200 cpu@53.968C soc2@52.437C soc0@50.75C gpu@53.343C tj@53.968C "
    "soc1@51.656C VDD_IN 12479mW/12479mW VDD_CPU_GPU_CV 4667mW/4667mW VDD_SOC 2817mW/2817mW"
)
# JetPack 6 format, Orin Nano 8 GB; no EMC_FREQ and no GPU clock (as tegrastats prints them without root).
# henrygd/beszel, agent/gpu_test.go, TestParseJetsonData "orin nano", added in commit 4395520a285d
# ("Probable fix for Jetson gpu issue (#895)", https://github.com/henrygd/beszel/issues/895).
ORIN_NANO_R36_NO_ROOT = (
    "06-18-2025 11:25:24 RAM 3452/7620MB (lfb 25x4MB) SWAP 1518/16384MB (cached 174MB) "
    "CPU [1%@1420,2%@1420,0%@1420,2%@1420,2%@729,1%@729] GR3D_FREQ 0% cpu@50.031C soc2@49.031C soc0@50C "
    "gpu@49.031C tj@50.25C soc1@50.25C VDD_IN 4824mW/4824mW VDD_CPU_GPU_CV 518mW/518mW VDD_SOC 1475mW/1475mW"
)
# AGX Orin 64 GB (62780 MB, twelve cores), timestamped format (JetPack release not stated), a DLA running.
# Muxindawang/jetson_dla_tutorial, README.md ("sudo tegrastats --interval 100 | grep -i dla", 输出),
# https://github.com/Muxindawang/jetson_dla_tutorial
AGX_ORIN_DLA = (
    "11-21-2025 08:49:48 RAM 13983/62780MB (lfb 424x4MB) SWAP 126/31390MB (cached 0MB) "
    "CPU [90%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,"
    "100%@2201,100%@2201] EMC_FREQ 1%@2133 GR3D_FREQ 14%@[407,407] VIC_FREQ 115 NVDLA0_FREQ @1600 APE 174 "
    "CV0@73.625C CPU@77.281C Tboard@62C SOC2@70C Tdiode@62.25C SOC0@69.531C CV1@72.5C GPU@69.125C tj@77.281C "
    "SOC1@68.968C CV2@67.25C VDD_GPU_SOC 3150mW/2971mW VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW "
    "VDDQ_VDD2_1V8AO 1091mW/1091mW"
)
# JetPack 5, AGX Orin Developer Kit 32 GB (the page gives kernel 5.10 and links the R35.1 guide): absent
# sensors as -256C, GR3D2_FREQ for the second GPC, unconnected monitor channels as "NC".
# gt-crnch-rg/read-the-docs, docs/neuromorphic/rudi-jetson-dev-boards.rst ("rudi2$> tegrastats"),
# https://github.com/gt-crnch-rg/read-the-docs
AGX_ORIN_R35 = (
    "10-16-2023 10:59:22 RAM 1205/30623MB (lfb 6429x4MB) SWAP 0/15311MB (cached 0MB) "
    "CPU [0%@729,0%@729,1%@729,0%@729,0%@729,0%@730,0%@730,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@204 "
    "GR3D_FREQ 0%@114 GR3D2_FREQ 0%@114 NVJPG1 729 VIC_FREQ 729 APE 233 CV0@-256C CPU@43.5C Tdiode@32.5C "
    "SOC2@40.062C SOC0@40.5C CV1@-256C GPU@38.156C SOC1@39.125C CV2@-256C VDD_GPU_SOC 4788mW/4788mW "
    "VDD_CPU_CV 798mW/798mW VIN_SYS_5V0 3842mW/3842mW NC 0mW/0mW VDDQ_VDD2_1V8AO 707mW/707mW NC 0mW/0mW"
)
# The next line of the same listing.
AGX_ORIN_R35_NEXT = (
    "10-16-2023 10:59:23 RAM 1206/30623MB (lfb 6429x4MB) SWAP 0/15311MB (cached 0MB) "
    "CPU [1%@732,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@728,0%@728,0%@729,0%@730,0%@729] EMC_FREQ 0%@204 "
    "GR3D_FREQ 0%@114 GR3D2_FREQ 0%@114 NVJPG1 729 VIC_FREQ 729 APE 233 CV0@-256C CPU@43.906C Tdiode@32.75C "
    "SOC2@40.093C SOC0@40.593C CV1@-256C GPU@38C SOC1@39.031C CV2@-256C VDD_GPU_SOC 4788mW/4788mW "
    "VDD_CPU_CV 798mW/798mW VIN_SYS_5V0 3842mW/3842mW NC 0mW/0mW VDDQ_VDD2_1V8AO 707mW/707mW NC 0mW/0mW"
)
# JetPack 4 (L4T R32, 2019), Jetson TX2 (six cores, VDD_SYS_* rails): no timestamp, rails without "mW", no SWAP,
# EMC and GPU without clocks. https://github.com/FindHao/tx-utils/issues/3 (2019-09-05).
TX2_JP4 = (
    "RAM 2020/7852MB (lfb 1164x4MB) CPU [9%@345,21%@345,25%@345,3%@345,1%@345,1%@345] EMC_FREQ 0% GR3D_FREQ 0% "
    "PLL@42.5C MCPU@42.5C PMIC@100C Tboard@40C GPU@41C BCPU@42.5C thermal@41.9C Tdiode@41.25C "
    "VDD_SYS_GPU 153/158 VDD_SYS_SOC 536/547 VDD_4V0_WIFI 633/527 VDD_IN 3140/3208 VDD_SYS_CPU 536/590 "
    "VDD_SYS_DDR 557/601"
)
# JetPack 4 format, Jetson TX2 (VDD_SYS_* rails, BCPU/MCPU sensors; beszel's test calls it "orin-style"), with
# the "MTS fg 1% bg 1%" field. henrygd/beszel, agent/gpu_test.go, added in commit 383913505fa7 (2026-01-12,
# "agent: fix tegrastats VDD_SYS_GPU parsing").
TX2_JP4_MTS = (
    "RAM 3276/7859MB (lfb 5x4MB) SWAP 1626/12122MB (cached 181MB) CPU [44%@1421,49%@2031,67%@2034,17%@1420,"
    "25%@1419,8%@1420] EMC_FREQ 1%@1866 GR3D_FREQ 0%@114 APE 150 MTS fg 1% bg 1% PLL@42.5C MCPU@42.5C PMIC@50C "
    "Tboard@38C GPU@39.5C BCPU@42.5C thermal@41.3C Tdiode@39.25C VDD_SYS_GPU 182/182 VDD_SYS_SOC 730/730 "
    "VDD_4V0_WIFI 0/0 VDD_IN 5297/5297 VDD_SYS_CPU 1917/1917 VDD_SYS_DDR 1241/1241"
)
# L4T R28.1, Jetson TX1: lower-case "cpu", one clock for all cores, "EMC" and "GR3D" without "_FREQ".
# hordiales/jetson-tx1-dev, SCRIPTS.md (second example line), https://github.com/hordiales/jetson-tx1-dev
TX1_R28 = (
    "RAM 3607/3983MB (lfb 47x4MB) SWAP 873/8192MB (cached 281MB) cpu [17%,11%,65%,0%]@1734 EMC 1%@1600 APE 25 "
    "GR3D 39%@76"
)
# One field each, from the "Example of statistic" column of NVIDIA's tegrastats appendix for L4T R32.5:
# https://docs.nvidia.com/jetson/archives/l4t-archived/l4t-325/Tegra%20Linux%20Driver%20Package%20Development%20Guide/AppendixTegraStats.html
NVIDIA_DOC_FIELDS = "RAM 220/38955MB (lfb 847x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB)"
NVIDIA_DOC_CPU = "CPU [1%@102,5%@102,0%@102,0%@102]"

QUOTED = [
    ORIN_NANO_R36,
    ORIN_NANO_R36_NO_ROOT,
    AGX_ORIN_DLA,
    AGX_ORIN_R35,
    AGX_ORIN_R35_NEXT,
    TX2_JP4,
    TX2_JP4_MTS,
    TX1_R28,
    NVIDIA_DOC_FIELDS,
    NVIDIA_DOC_CPU,
]


def cores(loads: list[float], mhz: int | list[int]) -> tuple[CpuCore, ...]:
    clocks = mhz if isinstance(mhz, list) else [mhz] * len(loads)
    return tuple(CpuCore(True, float(load), f) for load, f in zip(loads, clocks, strict=True))


# -- the parser ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", QUOTED)
def test_quoted_lines_parse_without_problems(line: str) -> None:
    assert parse_tegrastats(line).problems == ()


def test_orin_nano_r36() -> None:
    s = parse_tegrastats(ORIN_NANO_R36)
    assert s.timestamp == "11-15-2024 08:38:09"
    assert s.memory == {
        "RAM": Memory(6185 * MIB, 7620 * MIB, lfb_count=8, lfb_kib=2 * MIB),
        "SWAP": Memory(851 * MIB, 3810 * MIB, cached_kib=1 * MIB),
    }
    assert s.cpus == cores([15, 11, 14, 13, 11, 8], 729)
    assert s.engines == {
        "EMC": Engine(percent=43.0, freq_mhz=(2133,)),
        "GR3D": Engine(percent=63.0, freq_mhz=(621,)),
        "NVDEC": Engine(on=False),
        "NVJPG": Engine(on=False),
        "NVJPG1": Engine(on=False),
        "VIC": Engine(on=False),
        "OFA": Engine(on=False),
        "APE": Engine(freq_mhz=(200,)),
    }
    assert s.gpu == Engine(percent=63.0, freq_mhz=(621,)) and s.emc == Engine(percent=43.0, freq_mhz=(2133,))
    assert s.temperatures == {
        "cpu": 53.968,
        "soc2": 52.437,
        "soc0": 50.75,
        "gpu": 53.343,
        "tj": 53.968,
        "soc1": 51.656,
    }
    assert s.rails == {"VDD_IN": Rail(12479, 12479), "VDD_CPU_GPU_CV": Rail(4667, 4667), "VDD_SOC": Rail(2817, 2817)}


def test_orin_nano_r36_without_root() -> None:
    s = parse_tegrastats(ORIN_NANO_R36_NO_ROOT)
    assert s.timestamp == "06-18-2025 11:25:24"
    assert s.memory == {
        "RAM": Memory(3452 * MIB, 7620 * MIB, lfb_count=25, lfb_kib=4 * MIB),
        "SWAP": Memory(1518 * MIB, 16384 * MIB, cached_kib=174 * MIB),
    }
    assert s.cpus == cores([1, 2, 0, 2, 2, 1], [1420, 1420, 1420, 1420, 729, 729])
    assert s.engines == {"GR3D": Engine(percent=0.0)}
    assert s.emc is None
    assert s.temperatures == {"cpu": 50.031, "soc2": 49.031, "soc0": 50.0, "gpu": 49.031, "tj": 50.25, "soc1": 50.25}
    assert s.rails == {"VDD_IN": Rail(4824, 4824), "VDD_CPU_GPU_CV": Rail(518, 518), "VDD_SOC": Rail(1475, 1475)}


def test_agx_orin_with_dla() -> None:
    s = parse_tegrastats(AGX_ORIN_DLA)
    assert s.timestamp == "11-21-2025 08:49:48"
    assert s.memory == {
        "RAM": Memory(13983 * MIB, 62780 * MIB, lfb_count=424, lfb_kib=4 * MIB),
        "SWAP": Memory(126 * MIB, 31390 * MIB, cached_kib=0),
    }
    assert s.cpus == cores([90] + [100] * 11, 2201)
    assert s.engines == {
        "EMC": Engine(percent=1.0, freq_mhz=(2133,)),
        "GR3D": Engine(percent=14.0, freq_mhz=(407, 407)),
        "VIC": Engine(freq_mhz=(115,)),
        "NVDLA0": Engine(freq_mhz=(1600,)),
        "APE": Engine(freq_mhz=(174,)),
    }
    assert s.temperatures == {
        "CV0": 73.625,
        "CPU": 77.281,
        "Tboard": 62.0,
        "SOC2": 70.0,
        "Tdiode": 62.25,
        "SOC0": 69.531,
        "CV1": 72.5,
        "GPU": 69.125,
        "tj": 77.281,
        "SOC1": 68.968,
        "CV2": 67.25,
    }
    assert s.rails == {
        "VDD_GPU_SOC": Rail(3150, 2971),
        "VDD_CPU_CV": Rail(14312, 12415),
        "VIN_SYS_5V0": Rail(4968, 5048),
        "VDDQ_VDD2_1V8AO": Rail(1091, 1091),
    }


def test_agx_orin_r35_absent_sensors_second_gpc_and_nc_channels() -> None:
    s = parse_tegrastats(AGX_ORIN_R35)
    assert s.timestamp == "10-16-2023 10:59:22"
    assert s.memory == {
        "RAM": Memory(1205 * MIB, 30623 * MIB, lfb_count=6429, lfb_kib=4 * MIB),
        "SWAP": Memory(0, 15311 * MIB, cached_kib=0),
    }
    assert s.cpus == cores([0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [729] * 5 + [730, 730] + [729] * 5)
    assert s.engines == {
        "EMC": Engine(percent=0.0, freq_mhz=(204,)),
        "GR3D": Engine(percent=0.0, freq_mhz=(114,)),
        "GR3D2": Engine(percent=0.0, freq_mhz=(114,)),
        "NVJPG1": Engine(freq_mhz=(729,)),
        "VIC": Engine(freq_mhz=(729,)),
        "APE": Engine(freq_mhz=(233,)),
    }
    # CV0, CV1 and CV2 read -256C: no sensor, so no temperature.
    assert s.temperatures == {
        "CPU": 43.5,
        "Tdiode": 32.5,
        "SOC2": 40.062,
        "SOC0": 40.5,
        "GPU": 38.156,
        "SOC1": 39.125,
    }
    assert s.rails == {
        "VDD_GPU_SOC": Rail(4788, 4788),
        "VDD_CPU_CV": Rail(798, 798),
        "VIN_SYS_5V0": Rail(3842, 3842),
        "VDDQ_VDD2_1V8AO": Rail(707, 707),
    }
    nxt = parse_tegrastats(AGX_ORIN_R35_NEXT)
    assert nxt.timestamp == "10-16-2023 10:59:23"
    assert nxt.memory["RAM"].used_kib == 1206 * MIB
    assert [c.freq_mhz for c in nxt.cpus] == [732, 729, 729, 729, 729, 729, 729, 728, 728, 729, 730, 729]
    assert [c.load_percent for c in nxt.cpus] == [1.0] + [0.0] * 11
    assert nxt.temperatures == {
        "CPU": 43.906,
        "Tdiode": 32.75,
        "SOC2": 40.093,
        "SOC0": 40.593,
        "GPU": 38.0,
        "SOC1": 39.031,
    }
    assert nxt.rails == s.rails and nxt.engines == s.engines


def test_tx2_jetpack4() -> None:
    s = parse_tegrastats(TX2_JP4)
    assert s.timestamp is None
    assert s.memory == {"RAM": Memory(2020 * MIB, 7852 * MIB, lfb_count=1164, lfb_kib=4 * MIB)}
    assert s.cpus == cores([9, 21, 25, 3, 1, 1], 345)
    assert s.engines == {"EMC": Engine(percent=0.0), "GR3D": Engine(percent=0.0)}
    assert s.temperatures == {
        "PLL": 42.5,
        "MCPU": 42.5,
        "PMIC": 100.0,
        "Tboard": 40.0,
        "GPU": 41.0,
        "BCPU": 42.5,
        "thermal": 41.9,
        "Tdiode": 41.25,
    }
    assert s.rails == {
        "VDD_SYS_GPU": Rail(153, 158),
        "VDD_SYS_SOC": Rail(536, 547),
        "VDD_4V0_WIFI": Rail(633, 527),
        "VDD_IN": Rail(3140, 3208),
        "VDD_SYS_CPU": Rail(536, 590),
        "VDD_SYS_DDR": Rail(557, 601),
    }


def test_tx2_jetpack4_with_mts() -> None:
    s = parse_tegrastats(TX2_JP4_MTS)
    assert s.memory == {
        "RAM": Memory(3276 * MIB, 7859 * MIB, lfb_count=5, lfb_kib=4 * MIB),
        "SWAP": Memory(1626 * MIB, 12122 * MIB, cached_kib=181 * MIB),
    }
    assert s.cpus == cores([44, 49, 67, 17, 25, 8], [1421, 2031, 2034, 1420, 1419, 1420])
    # "MTS fg 1% bg 1%" is no engine and no rail: ignored.
    assert s.engines == {
        "EMC": Engine(percent=1.0, freq_mhz=(1866,)),
        "GR3D": Engine(percent=0.0, freq_mhz=(114,)),
        "APE": Engine(freq_mhz=(150,)),
    }
    assert s.temperatures == {
        "PLL": 42.5,
        "MCPU": 42.5,
        "PMIC": 50.0,
        "Tboard": 38.0,
        "GPU": 39.5,
        "BCPU": 42.5,
        "thermal": 41.3,
        "Tdiode": 39.25,
    }
    assert s.rails == {
        "VDD_SYS_GPU": Rail(182, 182),
        "VDD_SYS_SOC": Rail(730, 730),
        "VDD_4V0_WIFI": Rail(0, 0),
        "VDD_IN": Rail(5297, 5297),
        "VDD_SYS_CPU": Rail(1917, 1917),
        "VDD_SYS_DDR": Rail(1241, 1241),
    }


def test_tx1_l4t_r28() -> None:
    s = parse_tegrastats(TX1_R28)
    assert s.memory == {
        "RAM": Memory(3607 * MIB, 3983 * MIB, lfb_count=47, lfb_kib=4 * MIB),
        "SWAP": Memory(873 * MIB, 8192 * MIB, cached_kib=281 * MIB),
    }
    assert s.cpus == cores([17, 11, 65, 0], 1734)
    assert s.engines == {
        "EMC": Engine(percent=1.0, freq_mhz=(1600,)),
        "APE": Engine(freq_mhz=(25,)),
        "GR3D": Engine(percent=39.0, freq_mhz=(76,)),
    }
    assert s.temperatures == {} and s.rails == {}


def test_nvidia_documented_fields() -> None:
    s = parse_tegrastats(NVIDIA_DOC_FIELDS)
    assert s.memory == {
        "RAM": Memory(220 * MIB, 38955 * MIB, lfb_count=847, lfb_kib=4 * MIB),
        "SWAP": Memory(0, 1978 * MIB, cached_kib=0),
        "IRAM": Memory(0, 252, lfb_kib=252),  # kB, and "(lfb" glued to the value
    }
    assert parse_tegrastats(NVIDIA_DOC_CPU).cpus == cores([1, 5, 0, 0], 102)


def test_made_up_edge_cases() -> None:
    """SYNTHETIC lines (not quoted): a core powered down, truncated and malformed fields."""
    off = parse_tegrastats("CPU [30%@1036,off,28%@1036,off]")  # SYNTHETIC: NVIDIA's table describes 'off'
    assert off.cpus == (CpuCore(True, 30.0, 1036), CpuCore(False), CpuCore(True, 28.0, 1036), CpuCore(False))

    swap = ORIN_NANO_R36.index("SWAP 851/3810MB")
    cut = parse_tegrastats(ORIN_NANO_R36[: swap + 11])  # SYNTHETIC: the quoted line cut inside SWAP
    assert cut.memory == {"RAM": Memory(6185 * MIB, 7620 * MIB, lfb_count=8, lfb_kib=2 * MIB)}
    assert cut.problems == (("SWAP", "851/38"),)

    cut = parse_tegrastats(ORIN_NANO_R36[: swap - 6])  # SYNTHETIC: cut inside RAM's "(lfb 8x2MB)"
    assert cut.memory == {"RAM": Memory(6185 * MIB, 7620 * MIB)} and cut.problems[0][0] == "RAM"

    bad = parse_tegrastats(  # SYNTHETIC: malformed values beside good ones
        "RAM lots CPU [15%@729,?,8%@729] EMC_FREQ 43%@x GR3D_FREQ 63%@[621] VDD_IN 12479mW/12479mW tj@53.968C"
    )
    assert bad.problems == (("RAM", "lots"), ("CPU", "?"), ("EMC_FREQ", "43%@x"))
    assert bad.cpus == (CpuCore(True, 15.0, 729), CpuCore(True), CpuCore(True, 8.0, 729))
    assert bad.engines == {"GR3D": Engine(percent=63.0, freq_mhz=(621,))}
    assert bad.rails == {"VDD_IN": Rail(12479, 12479)} and bad.temperatures == {"tj": 53.968}

    for junk in ["", "   ", "\x00\xff", "RAM", "CPU [", "GR3D_FREQ", "@@@ 1/ C@", "x" * 10_000]:  # SYNTHETIC
        parse_tegrastats(junk)  # never raises


# -- sysfs --------------------------------------------------------------------------------------------------


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def fake_orin_nano(root: Path) -> Path:
    """An Orin Nano/NX as JetPack 6 lays it out (values made up; layout from the sources below).

    - GPU load: /sys/devices/platform/gpu.0/load, per-mille: the file tegrastats itself reads on Orin (its
      /tmp/.tstats.txt quoted in https://github.com/rbonghi/jetson_stats/issues/360); jetson_stats divides it
      by 10 for percent (jtop/core/gpu.py).
    - GPU clock: /sys/class/devfreq/<node>/cur_freq in Hz, the node found by its device's of_node name
      (jtop/core/gpu.py accepts ga10b, gv11b, gp10b, gpu).
    - Rails: INA3221 at I2C 1-0040, in1 VDD_IN, in2 VDD_CPU_GPU_CV, in3 VDD_SOC (NVIDIA's Orin power page for
      R35.4.1, JetsonOrinNanoSeriesJetsonOrinNxSeriesAndJetsonAgxOrinSeries.html, as cited in public code; and
      the rails the quoted Orin Nano lines print), hwmon files per the kernel's Documentation/hwmon/ina3221.rst:
      in<N>_label, in<N>_input mV, curr<N>_input mA, in7 the sum of shunt voltages.
    - Thermal zones: type "<name>-thermal" (assumed from the names tegrastats prints on R36), temp in m°C; the
      absent CV sensors raise on read (jtop/core/temperature.py treats an OSError as offline).
    """
    write(root, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic\n")
    write(root, "sys/devices/platform/gpu.0/load", "412\n")
    write(root, "sys/class/devfreq/17000000.ga10b/cur_freq", "624750000\n")
    write(root, "sys/class/devfreq/17000000.ga10b/device/of_node/name", "gpu\0")
    write(root, "sys/class/devfreq/15340000.vic/cur_freq", "115200000\n")  # not the GPU
    write(root, "sys/class/devfreq/15340000.vic/device/of_node/name", "vic\0")
    hw = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    for n, (label, mv, ma) in enumerate(
        [("VDD_IN", 5064, 2464), ("VDD_CPU_GPU_CV", 5056, 923), ("VDD_SOC", 5048, 558)]
    ):
        write(root, f"{hw}/in{n + 1}_label", label + "\n")
        write(root, f"{hw}/in{n + 1}_input", f"{mv}\n")
        write(root, f"{hw}/curr{n + 1}_input", f"{ma}\n")
    write(root, f"{hw}/in7_label", "sum of shunt voltages\n")
    write(root, f"{hw}/in7_input", "2080\n")
    write(root, f"{hw}/name", "ina3221\n")
    for i, (kind, milli) in enumerate([("cpu", 48000), ("gpu", 47000), ("cv0", None), ("soc0", 46500), ("tj", 48500)]):
        write(root, f"sys/class/thermal/thermal_zone{i}/type", f"{kind}-thermal\n")
        if milli is None:
            (root / f"sys/class/thermal/thermal_zone{i}/temp").mkdir()  # reading it fails, as an absent sensor's
        else:
            write(root, f"sys/class/thermal/thermal_zone{i}/temp", f"{milli}\n")
    return root


def fake_agx_orin_rails(root: Path) -> Path:
    """AGX Orin's two INA3221s: 1-0040 VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0; 1-0041 NC, VDDQ_VDD2_1V8AO, NC (the
    order and names the quoted AGX Orin tegrastats lines print, NC included; jetson_stats power.py skips NC)."""
    chips = {
        "1-0040/hwmon/hwmon3": [("VDD_GPU_SOC", 19200, 249), ("VDD_CPU_CV", 19200, 41), ("VIN_SYS_5V0", 4968, 773)],
        "1-0041/hwmon/hwmon4": [("NC", 0, 0), ("VDDQ_VDD2_1V8AO", 1800, 393), ("NC", 0, 0)],
    }
    for where, channels in chips.items():
        for n, (label, mv, ma) in enumerate(channels, 1):
            base = f"sys/bus/i2c/drivers/ina3221/{where}"
            write(root, f"{base}/in{n}_label", label + "\n")
            write(root, f"{base}/in{n}_input", f"{mv}\n")
            write(root, f"{base}/curr{n}_input", f"{ma}\n")
    return root


def test_gpu_sysfs(tmp_path: Path) -> None:
    root = fake_orin_nano(tmp_path)
    node = find_gpu(root)
    assert node == GpuNode("ga10b", root / "sys/devices/platform/gpu.0/load", root / "sys/class/devfreq/17000000.ga10b")
    assert read_gpu_load(node) == pytest.approx(0.412)
    assert read_gpu_freq_hz(node) == 624_750_000
    (root / "sys/devices/platform/gpu.0/load").write_text("busy\n")
    with pytest.raises(ValueError):
        read_gpu_load(node)


def test_gpu_sysfs_older_layout(tmp_path: Path) -> None:
    """Nano and AGX Xavier: /sys/devices/gpu.0/load (issue #360's lists); no devfreq node found here."""
    write(tmp_path, "sys/devices/gpu.0/load", "1000\n")
    node = find_gpu(tmp_path)
    assert node == GpuNode("gpu", tmp_path / "sys/devices/gpu.0/load", None)
    assert read_gpu_load(node) == 1.0 and read_gpu_freq_hz(node) is None
    # Only a devfreq node: its device's load file.
    other = tmp_path / "other"
    write(other, "sys/class/devfreq/57000000.gp10b/cur_freq", "114750000\n")
    write(other, "sys/class/devfreq/57000000.gp10b/device/load", "55\n")
    node = find_gpu(other)
    assert node is not None and node.name == "gp10b"
    assert read_gpu_load(node) == pytest.approx(0.055) and read_gpu_freq_hz(node) == 114_750_000
    assert find_gpu(tmp_path / "empty") is None


def test_rails_orin_nano(tmp_path: Path) -> None:
    rails = find_rails(fake_orin_nano(tmp_path))
    assert [(r.label, r.rail_id) for r in rails] == [
        ("VDD_IN", "VDD_IN"),
        ("VDD_CPU_GPU_CV", "VDD_CPU_GPU_CV"),
        ("VDD_SOC", "VDD_SOC"),
    ]  # in7, the sum of the shunt voltages, has no current: not a rail
    assert [read_rail_power_w(r) for r in rails] == pytest.approx([5.064 * 2.464, 5.056 * 0.923, 5.048 * 0.558])
    (rails[0].current).write_text("")
    with pytest.raises(ValueError):
        read_rail_power_w(rails[0])


def test_rails_agx_orin(tmp_path: Path) -> None:
    rails = find_rails(fake_agx_orin_rails(tmp_path))
    assert [r.label for r in rails] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert [read_rail_power_w(r) for r in rails] == pytest.approx([19.2 * 0.249, 19.2 * 0.041, 4.968 * 0.773, 0.7074])
    assert find_rails(tmp_path / "empty") == []


def test_rails_sharing_a_label_keep_apart(tmp_path: Path) -> None:
    for chip in ("1-0040", "1-0041"):  # SYNTHETIC: two monitors naming one rail alike
        base = f"sys/bus/i2c/drivers/ina3221/{chip}/hwmon/hwmon0"
        write(tmp_path, f"{base}/in1_label", "VDD_IN\n")
        write(tmp_path, f"{base}/in1_input", "5000\n")
        write(tmp_path, f"{base}/curr1_input", "100\n")
    assert [r.rail_id for r in find_rails(tmp_path)] == ["VDD_IN@1-0040", "VDD_IN@1-0041"]


def test_gpu_thermal_zone(tmp_path: Path) -> None:
    root = fake_orin_nano(tmp_path)
    zone = find_gpu_zone(root)
    assert zone == root / "sys/class/thermal/thermal_zone1"
    assert read_zone_celsius(zone) == 47.0
    with pytest.raises(OSError):
        read_zone_celsius(root / "sys/class/thermal/thermal_zone2")  # cv0: absent sensor
    assert [zone_kind(t) for t in ("gpu-thermal", "GPU-therm", "tj-thermal", "Tboard_tegra")] == [
        "gpu",
        "gpu",
        "tj",
        "tboard_tegra",
    ]
    assert find_gpu_zone(tmp_path / "empty") is None


# -- the tegrastats child and JetsonSource ------------------------------------------------------------------


def stand_in(
    path: Path, lines: list[str], *, exit_after: int | None = None, status: int = 0, hang: bool = False
) -> Path:
    """An executable that behaves like `tegrastats --interval MS`: prints `lines` in turn, one per interval.
    Each start appends its argv and pid to <path>.starts. `exit_after`: exit with `status` after that many
    lines (saying why on stderr); `hang`: print one line, then nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    starts = path.with_name(path.name + ".starts")
    path.write_text(
        f"""#!{sys.executable}
import os, sys, time
lines = {lines!r}
args = sys.argv[1:]
interval = int(args[args.index("--interval") + 1]) / 1000
with open({str(starts)!r}, "a") as f:
    f.write(f"{{os.getpid()}} {{' '.join(args)}}\\n")
n = 0
while True:
    print(lines[n % len(lines)], flush=True)
    n += 1
    if {exit_after!r} is not None and n >= {exit_after!r}:
        print("tegrastats stand-in: giving up", file=sys.stderr, flush=True)
        sys.exit({status})
    time.sleep(3600 if {hang!r} else interval)
"""
    )
    path.chmod(0o755)
    return path


def starts_of(path: Path) -> list[tuple[int, str]]:
    f = path.with_name(path.name + ".starts")
    if not f.exists():
        return []
    return [(int(pid), args) for pid, _, args in (ln.partition(" ") for ln in f.read_text().splitlines())]


def wait_for(what: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture
def sources() -> Iterator[list[JetsonSource]]:
    """JetsonSources to close after the test, so that no stand-in outlives it."""
    made: list[JetsonSource] = []
    yield made
    for s in made:
        s.close()


def sample_of(source: JetsonSource) -> HealthSample:
    return HealthSample(0, tuple(source()))


def one(sample: HealthSample, name: str, **attrs: str) -> Metric:
    found = sample.find(name, **attrs)
    assert len(found) == 1, f"{name} {attrs}: {found}"
    return found[0]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


GPU = {"hw.id": JETSON_GPU_ID}
TASK = {"hw.gpu.task": "general"}


def test_sysfs_preferred_tegrastats_for_the_rest(tmp_path: Path, sources: list[JetsonSource]) -> None:
    root = fake_orin_nano(tmp_path)
    binary = stand_in(root / "usr/bin/tegrastats", [ORIN_NANO_R36])  # found under the root, as /usr/bin on L4T
    assert find_tegrastats(root) == binary
    assert isinstance(gpu_source(root), JetsonSource)  # what the daemon gets; it starts nothing until called
    source = JetsonSource(root, interval_ms=50)  # a device keeps the default second
    sources.append(source)
    wait_for(lambda: bool(sample_of(source).find("pitstop.jetson.emc.utilization")))
    s = sample_of(source)
    assert one(s, "hw.gpu.utilization", **GPU, **TASK).value == pytest.approx(0.412)  # sysfs, not GR3D's 63%
    assert one(s, "hw.gpu.utilization", **GPU).attributes["hw.name"] == "ga10b"
    assert one(s, "pitstop.gpu.frequency", **GPU).value == 624_750_000  # devfreq, not GR3D's 621 MHz
    assert one(s, "hw.temperature", **GPU).value == 47.0  # the gpu zone, not tegrastats' 53.343
    assert one(s, "pitstop.jetson.emc.utilization").value == pytest.approx(0.43)
    assert one(s, "pitstop.jetson.emc.frequency").value == 2_133_000_000
    assert one(s, "hw.power", **{"hw.id": "VDD_IN"}).value == pytest.approx(5.064 * 2.464)  # INA3221, not 12.479
    assert one(s, "hw.power", **{"hw.id": "VDD_SOC"}).value == pytest.approx(5.048 * 0.558)
    assert len(s.find("hw.power")) == 3
    engines = {m.attributes["engine"]: m.value for m in s.find("pitstop.jetson.engine.frequency")}
    assert engines == {"NVDEC": 0, "NVJPG": 0, "NVJPG1": 0, "VIC": 0, "OFA": 0, "APE": 200_000_000}
    assert [m.attributes["hw.id"] for m in s.find("hw.temperature")] == [JETSON_GPU_ID]  # zones: the sampler's
    assert all(
        m.unit == u
        for m, u in [(one(s, "pitstop.gpu.frequency"), "Hz"), (one(s, "hw.power", **{"hw.id": "VDD_IN"}), "W")]
    )

    (pid, args), *_ = starts_of(binary)
    assert args == "--interval 50"
    source.close()
    assert source.tegrastats is not None and not source.tegrastats.running
    wait_for(lambda: gone(pid), 5)


def test_tegrastats_alone_without_sysfs(tmp_path: Path, sources: list[JetsonSource]) -> None:
    binary = stand_in(tmp_path / "bin/tegrastats", [AGX_ORIN_DLA])
    source = JetsonSource(tmp_path / "root", tegrastats=binary, interval_ms=50)
    sources.append(source)
    wait_for(lambda: bool(sample_of(source).find("hw.gpu.utilization")))
    s = sample_of(source)
    assert one(s, "hw.gpu.utilization", **GPU, **TASK).value == pytest.approx(0.14)
    assert one(s, "hw.gpu.utilization").attributes["hw.name"] == "gpu"
    assert one(s, "pitstop.gpu.frequency", **GPU).value == 407_000_000
    assert one(s, "hw.temperature", **GPU).value == 69.125
    assert one(s, "pitstop.jetson.emc.utilization").value == pytest.approx(0.01)
    rails = {m.attributes["hw.id"]: m.value for m in s.find("hw.power")}
    assert rails == pytest.approx(
        {"VDD_GPU_SOC": 3.15, "VDD_CPU_CV": 14.312, "VIN_SYS_5V0": 4.968, "VDDQ_VDD2_1V8AO": 1.091}
    )
    # No thermal zone in sysfs: tegrastats' sensors stand in, under ids of their own.
    temps = {m.attributes["hw.id"]: m.value for m in s.find("hw.temperature")}
    assert temps["tegrastats/CV0"] == 73.625 and temps["tegrastats/tj"] == 77.281 and len(temps) == 12
    engines = {m.attributes["engine"]: m.value for m in s.find("pitstop.jetson.engine.frequency")}
    assert engines == {"VIC": 115_000_000, "NVDLA0": 1_600_000_000, "APE": 174_000_000}


def test_restarts_after_exit(tmp_path: Path, sources: list[JetsonSource], caplog: pytest.LogCaptureFixture) -> None:
    root = fake_orin_nano(tmp_path)
    binary = stand_in(root / "usr/bin/tegrastats", [AGX_ORIN_R35, AGX_ORIN_R35_NEXT], exit_after=2, status=3)
    source = JetsonSource(root, interval_ms=20, min_backoff_s=0.05, max_backoff_s=0.2)
    sources.append(source)
    with caplog.at_level(logging.WARNING, "pitstop.daemon.jetson_telemetry"):
        source()
        wait_for(lambda: len(starts_of(binary)) >= 4)
        wait_for(lambda: bool(sample_of(source).find("pitstop.jetson.emc.utilization")))
    assert one(sample_of(source), "pitstop.jetson.emc.frequency").value == 204_000_000
    assert source.tegrastats is not None and source.tegrastats.starts >= 4
    # Said once, with the child's last words, however often it happens.
    assert caplog.text.count("tegrastats exited with status 3: tegrastats stand-in: giving up") == 1
    pids = [pid for pid, _ in starts_of(binary)]
    source.close()
    wait_for(lambda: all(gone(pid) for pid in pids), 5)


def test_missing_tegrastats_is_sysfs_only(
    tmp_path: Path, sources: list[JetsonSource], caplog: pytest.LogCaptureFixture
) -> None:
    root = fake_orin_nano(tmp_path)
    with caplog.at_level(logging.INFO, "pitstop.daemon.gpu_health"):
        source = gpu_source(root)
        assert isinstance(source, JetsonSource)
        sources.append(source)
        for _ in range(3):
            s = sample_of(source)
    assert source.tegrastats is None
    assert one(s, "hw.gpu.utilization", **GPU).value == pytest.approx(0.412)
    assert one(s, "pitstop.gpu.frequency", **GPU).value == 624_750_000
    assert one(s, "hw.temperature", **GPU).value == 47.0
    assert len(s.find("hw.power")) == 3
    assert not s.find("pitstop.jetson.emc.utilization") and not s.find("pitstop.jetson.engine.frequency")
    assert caplog.text.count("Jetson GPU telemetry") == 1
    assert "tegrastats not found" in caplog.text and "sysfs only" in caplog.text
    assert "load from /sys/devices/platform/gpu.0/load" in caplog.text
    # An explicit path that is not there is the same as none.
    other = JetsonSource(root, tegrastats=tmp_path / "nope")
    sources.append(other)
    assert other() and other.tegrastats is None


def test_stale_line_is_not_used(tmp_path: Path, sources: list[JetsonSource], caplog: pytest.LogCaptureFixture) -> None:
    binary = stand_in(tmp_path / "tegrastats", [ORIN_NANO_R36], hang=True)
    source = JetsonSource(tmp_path / "root", tegrastats=binary, interval_ms=20, stale_s=0.5)
    sources.append(source)
    with caplog.at_level(logging.WARNING, "pitstop.daemon.gpu_health"):
        wait_for(lambda: bool(sample_of(source).find("pitstop.jetson.emc.utilization")))
        wait_for(lambda: not sample_of(source).find("pitstop.jetson.emc.utilization"))
        sample_of(source)
    assert caplog.text.count("tegrastats printed nothing for 0.5 s") == 1


def test_unreadable_fields_logged_once(
    tmp_path: Path, sources: list[JetsonSource], caplog: pytest.LogCaptureFixture
) -> None:
    lines = [  # SYNTHETIC: the quoted Orin Nano line with EMC_FREQ's value broken, two ways
        ORIN_NANO_R36.replace("EMC_FREQ 43%@2133", "EMC_FREQ 43%@fast"),
        ORIN_NANO_R36.replace("EMC_FREQ 43%@2133", "EMC_FREQ ?"),
    ]
    binary = stand_in(tmp_path / "tegrastats", lines)
    source = JetsonSource(tmp_path / "root", tegrastats=binary, interval_ms=20)
    sources.append(source)
    with caplog.at_level(logging.WARNING, "pitstop.daemon.gpu_health"):
        wait_for(lambda: bool(sample_of(source).find("hw.gpu.utilization")))
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            s = sample_of(source)
            assert not s.find("pitstop.jetson.emc.utilization")
            assert one(s, "hw.gpu.utilization").value == pytest.approx(0.63)  # the rest of the line still counts
    assert caplog.text.count("tegrastats field EMC_FREQ not understood") == 1


def test_process_alone(tmp_path: Path) -> None:
    binary = stand_in(tmp_path / "tegrastats", [TX2_JP4, TX2_JP4_MTS])
    proc = TegrastatsProcess(binary, 30)

    def newest() -> str | None:
        got = proc.latest()
        return got[0] if got else None

    try:
        assert not proc.running
        wait_for(lambda: newest() == TX2_JP4_MTS)  # the second line: it keeps printing, in turn
        line, age = proc.latest() or ("", 0.0)
        assert line in (TX2_JP4, TX2_JP4_MTS) and 0 <= age < 5
        assert proc.running and proc.starts == 1
    finally:
        proc.close()
    assert not proc.running
    assert proc.latest() is not None  # the last line stays; nothing starts again after close()
    assert proc.starts == 1


def test_in_the_sampler_zones_are_not_doubled(tmp_path: Path, sources: list[JetsonSource]) -> None:
    root = fake_orin_nano(tmp_path)
    stand_in(root / "usr/bin/tegrastats", [ORIN_NANO_R36])
    jetson = JetsonSource(root, interval_ms=20)
    sources.append(jetson)
    sampler = HealthSampler(root=root)
    sampler.add_source("gpu", jetson)
    wait_for(lambda: bool(sampler.sample().find("pitstop.jetson.emc.utilization")))
    temps = {m.attributes["hw.id"]: m.value for m in sampler.sample().find("hw.temperature")}
    # The TemperatureReader's zones (cv0 unreadable, so left out), plus the GPU's under its own id.
    assert temps == {
        "thermal_zone0": 48.0,
        "thermal_zone1": 47.0,
        "thermal_zone3": 46.5,
        "thermal_zone4": 48.5,
        JETSON_GPU_ID: 47.0,
    }
