"""A loop's figures, trtexec-style: per-stage p50/p99 latency, throughput, drops, queue depth.

Each stage records into its own fixed ring of the latest samples (no allocation per frame); the
figures are computed only when someone asks (`snapshot`), from whatever thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

STAGES = ("source", "preprocess", "infer", "postprocess", "sink", "end_to_end")
RING = 4096  # samples per stage kept for percentiles: about two minutes at 30 fps


class LatencyRing:
    def __init__(self, capacity: int = RING) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._count = 0
        self._total = 0.0

    def add(self, seconds: float) -> None:
        self._buf[self._count % len(self._buf)] = seconds
        self._count += 1
        self._total += seconds

    @property
    def count(self) -> int:
        return self._count

    def figure(self) -> StageFigure:
        n = min(self._count, len(self._buf))
        if n == 0:
            return StageFigure(count=0, p50_ms=0.0, p99_ms=0.0, mean_ms=0.0, max_ms=0.0)
        window = self._buf[:n]
        p50, p99 = np.percentile(window, [50, 99])
        return StageFigure(
            count=self._count,
            p50_ms=float(p50) * 1e3,
            p99_ms=float(p99) * 1e3,
            mean_ms=self._total / self._count * 1e3,
            max_ms=float(window.max()) * 1e3,
        )


class DepthGauge:
    """Queue depth seen at each hand-over: mean and max."""

    def __init__(self) -> None:
        self._sum = 0
        self._n = 0
        self.max = 0

    def sample(self, depth: int) -> None:
        self._sum += depth
        self._n += 1
        self.max = max(self.max, depth)

    @property
    def mean(self) -> float:
        return self._sum / self._n if self._n else 0.0


@dataclass(frozen=True, slots=True)
class StageFigure:
    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


@dataclass(frozen=True, slots=True)
class LoopFigures:
    runtime: str
    frames_in: int  # read from the source
    frames_out: int  # delivered to the sink
    drops: int  # frames replaced before preprocessing (live sources, latest wins)
    elapsed_s: float
    throughput_fps: float  # frames delivered per second between the first and the last delivery
    stages: dict[str, StageFigure] = field(default_factory=dict)
    queue_depth: dict[str, tuple[float, int]] = field(default_factory=dict)  # queue -> (mean, max)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"runtime      {self.runtime}",
            f"frames       {self.frames_out} delivered, {self.frames_in} read, {self.drops} dropped",
            f"throughput   {self.throughput_fps:.1f} frames/s over {self.elapsed_s:.1f} s",
            f"{'stage':<12} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'max ms':>9}",
        ]
        for name, f in self.stages.items():
            lines.append(f"{name:<12} {f.p50_ms:>9.2f} {f.p99_ms:>9.2f} {f.mean_ms:>9.2f} {f.max_ms:>9.2f}")
        for name, (mean, mx) in self.queue_depth.items():
            lines.append(f"queue {name:<6} depth mean {mean:.2f}, max {mx}")
        if self.error:
            lines.append(f"error        {self.error}")
        return "\n".join(lines)


class LoopStats:
    """The counters one loop updates; each field is written by one stage thread only."""

    def __init__(self, runtime: str = "") -> None:
        self.runtime = runtime
        self.stages = {name: LatencyRing() for name in STAGES}
        self.queues = {name: DepthGauge() for name in ("frames", "ready", "done")}
        self.frames_in = 0
        self.frames_out = 0
        self.drops = 0
        self.started = time.monotonic()
        self.first_out: float | None = None
        self.last_out = 0.0
        self.error: str | None = None
        self.ended: float | None = None
        self._lock = threading.Lock()

    def delivered(self, now: float) -> None:
        if self.first_out is None:
            self.first_out = now
        self.last_out = now
        self.frames_out += 1

    def snapshot(self) -> LoopFigures:
        with self._lock:
            span = (self.last_out - self.first_out) if self.first_out is not None else 0.0
            fps = (self.frames_out - 1) / span if span > 0 and self.frames_out > 1 else 0.0
            return LoopFigures(
                runtime=self.runtime,
                frames_in=self.frames_in,
                frames_out=self.frames_out,
                drops=self.drops,
                elapsed_s=(self.ended or time.monotonic()) - self.started,
                throughput_fps=fps,
                stages={name: ring.figure() for name, ring in self.stages.items()},
                queue_depth={name: (g.mean, g.max) for name, g in self.queues.items()},
                error=self.error,
            )
