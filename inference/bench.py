"""Raw runtime throughput against full-loop throughput, on the same inputs, in one run.

Raw is the runtime alone on a pre-made input tensor, called back to back (as trtexec measures,
host copies included). The loop is the real loop — synthetic frames already at the input size,
preprocess, infer, postprocess, a sink that only counts — over the SAME opened runtime, so thread
settings, engine and buffers are identical. The ratio loop/raw says what the loop's overhead costs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pitstop.inference.frames import Frame, Image, Result
from pitstop.inference.loop import Loop
from pitstop.inference.pipeline import ModelPipeline
from pitstop.inference.runtime import RuntimeOptions
from pitstop.inference.stats import LatencyRing, LoopFigures, StageFigure


@dataclass(frozen=True, slots=True)
class BenchReport:
    model: str
    runtime: str
    input_shape: tuple[int, ...]
    frames: int
    raw_fps: float
    raw_latency: StageFigure
    loop_fps: float
    loop: LoopFigures

    @property
    def ratio(self) -> float:
        return self.loop_fps / self.raw_fps if self.raw_fps else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    def table(self) -> str:
        return "\n".join(
            [
                f"model        {self.model}  input {list(self.input_shape)}",
                f"runtime      {self.runtime}",
                f"raw          {self.raw_fps:.1f} inferences/s "
                f"(p50 {self.raw_latency.p50_ms:.2f} ms, p99 {self.raw_latency.p99_ms:.2f} ms)",
                f"loop         {self.loop_fps:.1f} frames/s",
                f"loop / raw   {self.ratio:.3f}",
                "",
                self.loop.table(),
            ]
        )


class PremadeSource:
    """Hands out a few pre-made frames, round robin, `count` times: no decoding, no allocation."""

    live = False
    name = "premade"

    def __init__(self, images: list[Image], count: int) -> None:
        self._images = images
        self._count = count
        self._next = 0

    def read(self) -> Frame | None:
        if self._next >= self._count:
            return None
        i = self._next
        self._next += 1
        return Frame(self._images[i % len(self._images)], i, time.monotonic_ns(), self.name)

    def close(self) -> None:
        pass


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    def write(self, result: Result) -> None:
        self.count += 1

    def close(self) -> None:
        pass


def synthetic_images(height: int, width: int, n: int = 4, seed: int = 0) -> list[Image]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(n)]


def bench_pipeline(pipe: ModelPipeline, *, frames: int = 200, warmup: int = 10, slots: int = 3) -> BenchReport:
    """Measure raw then loop throughput over the already opened `pipe`."""
    inp = pipe.desc.image_input
    shape = pipe.input_shape
    h, w = (shape[2], shape[3]) if inp.layout == "NCHW" else (shape[1], shape[2])
    images = synthetic_images(h, w)

    slot = pipe.new_slot()
    pipe.preprocess(Frame(images[0], 0, time.monotonic_ns()), slot)
    for _ in range(warmup):
        pipe.infer(slot)
    ring = LatencyRing(max(frames, 1))
    t_start = time.perf_counter()
    for _ in range(frames):
        t0 = time.perf_counter()
        pipe.runtime.infer(slot.inputs, slot.outputs)
        ring.add(time.perf_counter() - t0)
    raw_s = time.perf_counter() - t_start
    raw_fps = frames / raw_s if raw_s > 0 else 0.0

    sink = CountingSink()
    loop = Loop(PremadeSource(images, frames + warmup), pipe, sink, slots=slots, name="bench", close_pipeline=False)
    figures = loop.run()
    return BenchReport(
        model=str(pipe.model),
        runtime=pipe.runtime_name,
        input_shape=tuple(shape),
        frames=frames,
        raw_fps=raw_fps,
        raw_latency=ring.figure(),
        loop_fps=figures.throughput_fps,
        loop=figures,
    )


def bench(
    model: Path,
    *,
    options: RuntimeOptions | None = None,
    size: tuple[int, int] | None = None,
    frames: int = 200,
    warmup: int = 10,
) -> BenchReport:
    pipe = ModelPipeline.open(model, options=options, size=size)
    try:
        return bench_pipeline(pipe, frames=frames, warmup=warmup)
    finally:
        pipe.close()
