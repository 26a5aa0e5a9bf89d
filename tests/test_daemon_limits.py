"""Loop limits (daemon/limits.py): cpu.max and CPU choice, cgroup discovery from /proc texts, the fallback's plan,
the limits a real child applies to itself, and the real cgroup v2 path where this machine delegates one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pitstop.daemon.config import LoopConfig
from pitstop.daemon.errors import LoopSupervisionError
from pitstop.daemon.limits import (
    CGROUP,
    FALLBACK,
    FALLBACK_NICE,
    CgroupTree,
    ChildLimits,
    Limits,
    cgroup_name,
    check_gpu,
    child_env,
    cpu_max_line,
    gpu_env,
    own_cgroup,
    pick_cpus,
)

CPU_ONLY: dict[str, Any] = {"runtime": "onnxruntime", "providers": ("cpu",)}


def cfg(name: str = "cam", **kw: Any) -> LoopConfig:
    return LoopConfig(name=name, model=Path("/m.onnx"), **kw)


# -- pure helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "line"),
    [
        (1.0, "100000 100000"),
        (1.5, "150000 100000"),
        (0.25, "25000 100000"),
        (4, "400000 100000"),
        (0.001, "1000 100000"),
    ],
)
def test_cpu_max_line(cores: float, line: str) -> None:
    assert cpu_max_line(cores) == line


@pytest.mark.parametrize("cores", [0.0, -1.0])
def test_cpu_max_line_refuses_no_cpu(cores: float) -> None:
    with pytest.raises(LoopSupervisionError, match="more than 0"):
        cpu_max_line(cores)


def test_pick_cpus_takes_ceil_cores_from_the_allowed_set_the_same_way_each_time() -> None:
    allowed = (0, 2, 4, 6, 8, 10)
    for cores, count in ((0.2, 1), (1.0, 1), (1.01, 2), (2.5, 3), (6.0, 6), (64.0, 6)):
        cpus = pick_cpus(allowed, cores, "cam")
        assert len(cpus) == count
        assert set(cpus) <= set(allowed)
        assert cpus == tuple(sorted(cpus))
        assert pick_cpus(list(reversed(allowed)), cores, "cam") == cpus  # a restart gets the same ones
    starts = {pick_cpus(allowed, 1.0, f"loop{i}") for i in range(20)}
    assert len(starts) > 2  # loops spread over the CPUs


@pytest.mark.parametrize(("name", "want"), [("cam", "loop-cam"), ("front_door-2", "loop-front_door-2")])
def test_cgroup_name_keeps_safe_names(name: str, want: str) -> None:
    assert cgroup_name(name) == want


@pytest.mark.parametrize("name", ["a/b", "cpu.max", "..", "x y", "é"])
def test_cgroup_name_makes_others_safe_and_distinct(name: str) -> None:
    got = cgroup_name(name)
    assert got.startswith("loop-")
    assert "/" not in got and "." not in got and " " not in got
    assert got.isascii()


def test_cgroup_names_of_look_alikes_differ() -> None:
    assert cgroup_name("a/b") != cgroup_name("a_b")
    assert cgroup_name("a.b") != cgroup_name("a/b")


def test_gpu_env_makes_the_chosen_gpu_the_only_one() -> None:
    assert gpu_env(None) == {}
    assert gpu_env(1) == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_check_gpu_against_the_driver_list(tmp_path: Path) -> None:
    gpus = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (gpus / bus).mkdir(parents=True)
    check_gpu(cfg(gpu=None), gpus)
    check_gpu(cfg(gpu=1), gpus)
    with pytest.raises(LoopSupervisionError, match=r"gpu 2: no such GPU \(2 found\)"):
        check_gpu(cfg(gpu=2), gpus)
    with pytest.raises(LoopSupervisionError, match="not a GPU index"):
        check_gpu(cfg(gpu=-1), gpus)
    check_gpu(cfg(gpu=7), tmp_path / "absent")  # no driver list (Jetson): the runtime will tell


SYSTEMD_MOUNTS = """\
24 1 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
25 1 0:23 / /proc rw shared:10 - proc proc rw
"""
HYBRID_MOUNTS = """\
30 24 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
31 24 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
"""
CONTAINER_MOUNTS = """\
700 690 0:30 /system.slice/docker-abc.scope /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
"""


def test_own_cgroup_under_systemd() -> None:
    got = own_cgroup("0::/system.slice/pitstop.service\n", SYSTEMD_MOUNTS)
    assert got == Path("/sys/fs/cgroup/system.slice/pitstop.service")


def test_own_cgroup_on_a_hybrid_hierarchy() -> None:
    text = "4:memory:/system.slice/pitstop.service\n0::/system.slice/pitstop.service\n"
    assert own_cgroup(text, HYBRID_MOUNTS) == Path("/sys/fs/cgroup/unified/system.slice/pitstop.service")


def test_own_cgroup_inside_a_bind_mounted_subtree() -> None:
    text = "0::/system.slice/docker-abc.scope/app\n"
    assert own_cgroup(text, CONTAINER_MOUNTS) == Path("/sys/fs/cgroup/app")


def test_own_cgroup_without_cgroup_v2() -> None:
    assert own_cgroup("4:memory:/x\n3:cpu:/x\n", HYBRID_MOUNTS) is None
    assert own_cgroup("0::/x\n", "25 1 0:23 / /proc rw - proc proc rw\n") is None


# -- the fallback's plan ---------------------------------------------------------------------------


def test_fallback_limits_memory_with_rlimit_as_for_cpu_only_loops() -> None:
    limits = Limits.fallback("test")
    assert limits.mechanism == FALLBACK
    plan = limits.prepare(cfg(memory_max=512 << 20, **CPU_ONLY))
    assert plan == ChildLimits(FALLBACK, rlimit_as=512 << 20)
    assert child_env(cfg(**CPU_ONLY), plan) == {"MALLOC_ARENA_MAX": "2"}
    assert "RLIMIT_AS 512 MiB" in plan.describe()


@pytest.mark.parametrize(
    "kw",
    [{"gpu": 0, **CPU_ONLY}, {"runtime": "auto"}, {"runtime": "onnxruntime", "providers": ("cuda", "cpu")}],
)
def test_fallback_does_not_put_rlimit_as_on_loops_that_may_use_cuda(kw: dict[str, Any]) -> None:
    plan = Limits(None, "test", allowed_cpus=(0,)).prepare(cfg(memory_max=512 << 20, **kw))
    assert plan.rlimit_as is None
    assert "memory_max not enforced" in plan.note
    assert "memory_max not enforced" in plan.describe()


def test_fallback_limits_cpu_with_affinity_and_nice() -> None:
    limits = Limits(None, "test", allowed_cpus=(0, 1, 2, 3))
    plan = limits.prepare(cfg(cpu_max=1.5))
    assert plan.cpus is not None and len(plan.cpus) == 2
    assert plan.nice == FALLBACK_NICE
    assert plan.rlimit_as is None
    assert limits.prepare(cfg()) == ChildLimits(FALLBACK)  # nothing asked, nothing applied


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"cpu_max": 0.0}, "cpu_max 0.0"), ({"memory_max": 0}, "memory_max 0"), ({"gpu": -2}, "gpu -2")],
)
def test_nonsense_limits_are_refused(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(LoopSupervisionError, match=match):
        Limits.fallback().prepare(cfg(**kw))


def test_child_limits_round_trip_as_json() -> None:
    plan = ChildLimits(FALLBACK, rlimit_as=1 << 30, cpus=(1, 3), nice=5, note="n")
    assert ChildLimits.from_dict(json.loads(json.dumps(plan.as_dict()))) == plan
    cg = ChildLimits(CGROUP, cgroup="/sys/fs/cgroup/x/loop-a")
    assert ChildLimits.from_dict(json.loads(json.dumps(cg.as_dict()))) == cg


def test_detect_names_the_mechanism_and_why() -> None:
    limits = Limits.detect()
    assert limits.mechanism in (CGROUP, FALLBACK)
    assert limits.reason
    if limits.mechanism == FALLBACK:
        assert limits.describe().startswith("fallback")


# -- a real child applies them ---------------------------------------------------------------------

PROBE = """
import json, os, resource, sys
from pitstop.daemon.limits import ChildLimits, apply_in_child
apply_in_child(ChildLimits.from_dict(json.loads(sys.argv[1])))
print(json.dumps({"as": resource.getrlimit(resource.RLIMIT_AS)[0], "cpus": sorted(os.sched_getaffinity(0)),
                  "nice": os.nice(0), "cgroup": open("/proc/self/cgroup").read()}))
"""


def probe(limits: ChildLimits) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(limits.as_dict())], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_a_child_applies_the_fallback_limits_to_itself() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1]
    base_nice = os.nice(0)
    got = probe(ChildLimits(FALLBACK, rlimit_as=3 << 30, cpus=(cpu,), nice=FALLBACK_NICE))
    assert got["as"] == 3 << 30
    assert got["cpus"] == [cpu]
    assert got["nice"] == min(19, base_nice + FALLBACK_NICE)


@pytest.fixture
def cgroup_tree() -> CgroupTree:
    tree, reason = CgroupTree.find()
    if tree is None:
        pytest.skip(f"no delegated cgroup v2 with cpu and memory here: {reason}")
    return tree


def test_a_child_joins_its_cgroup_with_the_limits_written(cgroup_tree: CgroupTree) -> None:
    path = cgroup_tree.create("limits-test", cpu_max=0.5, memory_max=256 << 20)
    try:
        assert (path / "cpu.max").read_text().split() == ["50000", "100000"]
        assert (path / "memory.max").read_text().strip() == str(256 << 20)
        got = probe(ChildLimits(CGROUP, cgroup=str(path)))
        assert str(got["cgroup"]).strip().endswith("/" + path.name)
        assert CgroupTree.oom_kills(path) == 0
    finally:
        CgroupTree.remove(path)
    assert not path.exists()


def test_cgroup_files_as_written(tmp_path: Path) -> None:
    """The files and values a loop cgroup gets, on a plain directory standing in for cgroupfs."""
    tree = CgroupTree(tmp_path)
    tree.prepare()
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory"
    path = tree.create("cam/1", cpu_max=2.0, memory_max=1 << 30)
    assert path.parent == tmp_path and path.name == cgroup_name("cam/1")
    assert (path / "cpu.max").read_text() == "200000 100000"
    assert (path / "memory.max").read_text() == str(1 << 30)
    assert (path / "memory.swap.max").read_text() == "0"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert CgroupTree.oom_kills(path) == 1
    assert not (tmp_path / cgroup_name("other")).exists()
    unlimited = tree.create("free", cpu_max=None, memory_max=None)
    assert sorted(p.name for p in unlimited.iterdir()) == []
