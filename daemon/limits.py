"""CPU and memory limits for a loop's child process, and its GPU.

Two mechanisms, chosen once per daemon (`Limits.detect`):

- **cgroup v2**, when the daemon's own cgroup is delegated to it (the unit has `Delegate=yes`) and offers the
  cpu and memory controllers: the daemon moves itself into a leaf `supervisor/` (cgroup v2 lets only leaves hold
  processes once controllers are enabled for the children), and each loop gets `loop-<name>/` with `cpu.max`
  and `memory.max`. Going over memory.max gets the child OOM-killed, which `memory.events` tells apart from any
  other SIGKILL.
- **fallback** otherwise: RLIMIT_AS for memory (address space, not resident memory: allocations beyond it fail,
  so the child reports a MemoryError), CPU affinity to ceil(cpu_max) CPUs plus a lower priority (nice).
  RLIMIT_AS is applied only to loops that cannot touch CUDA (ONNX Runtime, CPU provider only): CUDA reserves
  far more address space than it uses, and would fail to start under any useful limit.

The child applies its `ChildLimits` to itself first thing, before it loads a model (joining its cgroup there
charges every allocation of the loop to it; no race with a move from outside).

GPU selection: a loop with `gpu = N` runs with CUDA_VISIBLE_DEVICES=N (and CUDA_DEVICE_ORDER=PCI_BUS_ID, so N
is the index nvidia-smi shows) and the runtime's device_id 0: the child sees exactly one GPU.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import resource
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pitstop.daemon.config import LoopConfig
from pitstop.daemon.errors import LoopSupervisionError

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000  # cpu.max period: the kernel's default
MIN_QUOTA_US = 1_000  # the kernel refuses quotas below 1 ms
FALLBACK_NICE = 5  # under the fallback a CPU-limited loop yields to the daemon on the CPUs they share
MALLOC_ARENAS = "2"  # glibc reserves 64 MiB of address space per thread arena; RLIMIT_AS counts it
SUPERVISOR_LEAF = "supervisor"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one directory per GPU (dGPU driver; absent on Jetson)

CGROUP = "cgroup"
FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """What one child applies to itself at start (travels to it as JSON)."""

    mechanism: str  # CGROUP or FALLBACK
    cgroup: str | None = None  # the loop's cgroup directory, to join
    rlimit_as: int | None = None  # bytes
    cpus: tuple[int, ...] | None = None  # affinity
    nice: int = 0
    note: str = ""  # a limit asked for and not enforced, and why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChildLimits:
        cpus = raw.get("cpus")
        return cls(
            mechanism=str(raw["mechanism"]),
            cgroup=raw.get("cgroup"),
            rlimit_as=raw.get("rlimit_as"),
            cpus=tuple(int(c) for c in cpus) if cpus is not None else None,
            nice=int(raw.get("nice", 0)),
            note=str(raw.get("note", "")),
        )

    def describe(self) -> str:
        parts = [f"cgroup {self.cgroup}" if self.cgroup else self.mechanism]
        if self.rlimit_as is not None:
            parts.append(f"RLIMIT_AS {mib(self.rlimit_as)}")
        if self.cpus is not None:
            parts.append(f"CPUs {','.join(map(str, self.cpus))}")
        if self.nice:
            parts.append(f"nice {self.nice}")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


# -- pure helpers ----------------------------------------------------------------------------------


def cpu_max_line(cores: float, period_us: int = CPU_PERIOD_US) -> str:
    """cpu.max for `cores` CPUs' worth of time: "QUOTA PERIOD" in microseconds."""
    if cores <= 0:
        raise LoopSupervisionError(f"cpu_max {cores}: must be more than 0 cores")
    return f"{max(MIN_QUOTA_US, round(cores * period_us))} {period_us}"


def pick_cpus(allowed: Sequence[int], cores: float, name: str) -> tuple[int, ...]:
    """ceil(cores) CPUs out of `allowed`, starting at a place fixed by the loop's name so that several loops
    spread over the CPUs instead of all taking the first ones, and a restarted loop gets the same ones."""
    pool = sorted(allowed)
    count = min(len(pool), max(1, math.ceil(cores)))
    start = zlib.crc32(name.encode()) % len(pool)
    return tuple(sorted(pool[(start + i) % len(pool)] for i in range(count)))


def cgroup_name(loop: str) -> str:
    """A directory name for the loop's cgroup: cgroup file names are safe, other names get a hash suffix."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", loop)[:64]
    if safe != loop:
        safe += f"-{zlib.crc32(loop.encode()):08x}"
    return f"loop-{safe}"


def cpu_only(cfg: LoopConfig) -> bool:
    """The loop cannot touch CUDA: RLIMIT_AS is safe for it."""
    return cfg.gpu is None and cfg.runtime == "onnxruntime" and tuple(cfg.providers) == ("cpu",)


def gpu_env(gpu: int | None) -> dict[str, str]:
    """The environment that gives a child exactly GPU `gpu` (then device 0 inside it); {} for no choice."""
    if gpu is None:
        return {}
    return {"CUDA_VISIBLE_DEVICES": str(gpu), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def check_gpu(cfg: LoopConfig, gpus_dir: Path = NVIDIA_GPUS) -> None:
    """Refuse a GPU index that cannot exist. Where the driver lists its GPUs the index is checked against them;
    elsewhere (Jetson) the runtime in the child finds out."""
    if cfg.gpu is None:
        return
    if cfg.gpu < 0:
        raise LoopSupervisionError(f"loop {cfg.name!r}: gpu {cfg.gpu}: not a GPU index")
    try:
        count = sum(1 for _ in gpus_dir.iterdir())
    except OSError:
        return
    if cfg.gpu >= count:
        raise LoopSupervisionError(f"loop {cfg.name!r}: gpu {cfg.gpu}: no such GPU ({count} found)")


# -- cgroup v2 -------------------------------------------------------------------------------------


def own_cgroup(proc_cgroup: str, mountinfo: str) -> Path | None:
    """The directory of this process's cgroup v2 from the texts of /proc/self/cgroup and /proc/self/mountinfo."""
    rel = next((line[3:] for line in proc_cgroup.splitlines() if line.startswith("0::")), None)
    if rel is None:
        return None
    for line in mountinfo.splitlines():
        # "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("cgroup2 "):
            continue
        fields = left.split()
        root, mountpoint = fields[3], fields[4]
        if rel == root or rel.startswith(root.rstrip("/") + "/"):
            return Path(mountpoint) / rel[len(root) :].lstrip("/")
    return None


class CgroupTree:
    """The daemon's delegated cgroup v2 directory: a leaf for the daemon, one child cgroup per loop."""

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def find(cls) -> tuple[CgroupTree | None, str]:
        """The usable tree, or None and why not."""
        try:
            base = own_cgroup(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
        except OSError as e:
            return None, f"cannot read /proc/self/cgroup: {e.strerror}"
        if base is None:
            return None, "no cgroup v2 hierarchy (cgroup v1 only)"
        try:
            controllers = (base / "cgroup.controllers").read_text().split()
        except OSError as e:
            return None, f"{base}: not readable: {e.strerror}"
        missing = [c for c in ("cpu", "memory") if c not in controllers]
        if missing:
            return None, f"{base}: the {' and '.join(missing)} controller(s) are not available here (hybrid cgroup v1?)"
        for f in ("cgroup.procs", "cgroup.subtree_control"):
            if not os.access(base / f, os.W_OK):
                return None, f"{base}: not delegated to this process ({f} is not writable; the unit needs Delegate=yes)"
        tree = cls(base)
        try:
            tree.prepare()
        except OSError as e:
            return None, f"{base}: cannot enable the cpu and memory controllers for children: {e.strerror or e}"
        return tree, f"cgroup v2 at {base}"

    def prepare(self) -> None:
        """Enable cpu and memory for the loops' cgroups. cgroup v2 forbids that while the directory holds
        processes (except at the root), so the daemon first moves itself into the leaf `supervisor/`."""
        try:
            _write(self.base / "cgroup.subtree_control", "+cpu +memory")
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        # Only a cgroup of our own (a unit's) is ours to rearrange: with other processes in it (a shell's
        # session scope) moving ourselves would not help, and would leave us somewhere we were not put.
        others = set((self.base / "cgroup.procs").read_text().split()) - {str(os.getpid())}
        if others:
            raise OSError(errno.EBUSY, f"{len(others)} other process(es) share this cgroup")
        leaf = self.base / SUPERVISOR_LEAF
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(self.base / "cgroup.subtree_control", "+cpu +memory")

    def create(self, loop: str, cpu_max: float | None, memory_max: int | None) -> Path:
        """A fresh cgroup for one run of `loop` (fresh counters each run); limits written before anyone joins."""
        path = self.base / cgroup_name(loop)
        self.remove(path)
        path.mkdir()
        # memory.swap.max 0: a loop over its limit must fail, not crawl through swap.
        writes = [("cpu.max", cpu_max_line(cpu_max))] if cpu_max is not None else []
        if memory_max is not None:
            writes += [("memory.max", str(memory_max)), ("memory.swap.max", "0")]
        for name, value in writes:
            try:
                _write(path / name, value)
            except FileNotFoundError:
                if name != "memory.swap.max":  # absent without swap accounting: nothing to turn off
                    raise
        return path

    @staticmethod
    def oom_kills(path: Path) -> int:
        """How many times the kernel OOM-killed a process of this cgroup (0 when unknown)."""
        try:
            for line in (path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    @staticmethod
    def remove(path: Path) -> None:
        """Kill whatever is left in the cgroup, then remove it."""
        if not path.is_dir():
            return
        with contextlib.suppress(OSError):
            _write(path / "cgroup.kill", "1")  # Linux 5.14+
        for _ in range(100):
            try:
                path.rmdir()
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
            # Killed processes leave the cgroup a moment later; this runs in a worker thread, not the event loop.
            time.sleep(0.01)
        log.warning("%s: still busy after 1 s, left in place", path)


def _write(path: Path, value: str) -> None:
    with path.open("w") as f:
        f.write(value)


# -- choosing and applying -------------------------------------------------------------------------


class Limits:
    """The mechanism in effect for this daemon, and each loop's limits under it."""

    def __init__(self, tree: CgroupTree | None, reason: str, allowed_cpus: Sequence[int] | None = None) -> None:
        self.tree = tree
        self.reason = reason  # why this mechanism: shown in status and logs
        self.allowed_cpus = tuple(sorted(allowed_cpus if allowed_cpus is not None else os.sched_getaffinity(0)))

    @classmethod
    def detect(cls) -> Limits:
        """cgroup v2 when delegated and usable, else the fallback. Writes to cgroupfs: run it off the event loop."""
        tree, reason = CgroupTree.find()
        limits = cls(tree, reason)
        log.info("loop limits: %s", limits.describe())
        return limits

    @classmethod
    def fallback(cls, reason: str = "fallback asked for") -> Limits:
        return cls(None, reason)

    @property
    def mechanism(self) -> str:
        return CGROUP if self.tree is not None else FALLBACK

    def describe(self) -> str:
        return self.reason if self.tree is not None else f"fallback (RLIMIT_AS, CPU affinity, nice): {self.reason}"

    def prepare(self, cfg: LoopConfig) -> ChildLimits:
        """The limits of one run of `cfg`; under cgroup v2 its cgroup is created. Raises LoopSupervisionError."""
        if cfg.cpu_max is not None and cfg.cpu_max <= 0:
            raise LoopSupervisionError(f"loop {cfg.name!r}: cpu_max {cfg.cpu_max}: must be more than 0 cores")
        if cfg.memory_max is not None and cfg.memory_max <= 0:
            raise LoopSupervisionError(f"loop {cfg.name!r}: memory_max {cfg.memory_max}: must be more than 0 bytes")
        check_gpu(cfg)
        if self.tree is not None:
            try:
                path = self.tree.create(cfg.name, cfg.cpu_max, cfg.memory_max)
            except OSError as e:
                raise LoopSupervisionError(f"loop {cfg.name!r}: cannot set up its cgroup: {e}") from e
            return ChildLimits(CGROUP, cgroup=str(path))
        note = ""
        rlimit = None
        if cfg.memory_max is not None:
            if cpu_only(cfg):
                rlimit = cfg.memory_max
            else:
                note = "memory_max not enforced: RLIMIT_AS would break CUDA, and cgroup v2 is not available"
        cpus = pick_cpus(self.allowed_cpus, cfg.cpu_max, cfg.name) if cfg.cpu_max is not None else None
        nice = FALLBACK_NICE if cfg.cpu_max is not None else 0
        return ChildLimits(FALLBACK, rlimit_as=rlimit, cpus=cpus, nice=nice, note=note)

    def finish(self, limits: ChildLimits) -> bool:
        """After a run: True when the kernel OOM-killed in its cgroup; the cgroup is removed."""
        if limits.cgroup is None or self.tree is None:
            return False
        path = Path(limits.cgroup)
        oom = CgroupTree.oom_kills(path) > 0
        try:
            CgroupTree.remove(path)
        except OSError as e:
            log.warning("%s: cannot remove: %s", path, e)
        return oom


def child_env(cfg: LoopConfig, limits: ChildLimits) -> dict[str, str]:
    """Variables the child needs on top of the daemon's environment."""
    env = gpu_env(cfg.gpu)
    if limits.rlimit_as is not None:
        env["MALLOC_ARENA_MAX"] = MALLOC_ARENAS
    return env


def apply_in_child(limits: ChildLimits) -> None:
    """Run by the child on itself before it loads anything. Raises OSError when a limit cannot be applied."""
    if limits.cgroup is not None:
        _write(Path(limits.cgroup) / "cgroup.procs", "0")  # "0": the writing process itself
    if limits.rlimit_as is not None:
        resource.setrlimit(resource.RLIMIT_AS, (limits.rlimit_as, limits.rlimit_as))
    if limits.cpus is not None:
        os.sched_setaffinity(0, limits.cpus)
    if limits.nice:
        os.nice(limits.nice)
