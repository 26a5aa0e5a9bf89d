"""Inference loop throughput as a ratio to the raw runtime's, on the same inputs, in one run.

Issue target (CPU): for the text-detection model (PP-OCRv4 det) at 1x3x320x320 on ONNX Runtime's CPU
EP, loop throughput / raw runtime throughput >= 0.95 with the same thread settings. On a GPU
(--providers cuda, or --runtime tensorrt) the target is >= 0.9 at batch 1.

"Raw" is the runtime alone on a pre-made input tensor, called back to back with host copies included
(what trtexec measures). "Loop" is the full loop — synthetic frames at the input size, preprocess,
infer, postprocess, a counting sink — over the SAME opened runtime, so engine, threads and buffers
are identical. Each measurement runs --runs times, alternating raw and loop; medians are compared.
Per-stage p50/p99 latencies are those of the median loop run.

Usage:  .venv/bin/python benchmarks/inference_loop.py [--frames 200] [--threads 0] [--json]
        .venv/bin/python benchmarks/inference_loop.py --providers cuda --size 640x640
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from _common import bench_main, machine

from pitstop.inference.bench import BenchReport, bench_pipeline
from pitstop.inference.model_desc import load_description
from pitstop.inference.pipeline import ModelPipeline
from pitstop.inference.runtime import RuntimeOptions
from pitstop.inference.test_models import ORIENTATION, TEXT_DETECTION, locate

CPU_TARGET = 0.95
GPU_TARGET = 0.9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("det", "orientation"), default="det")
    p.add_argument("--size", default="320x320", help="input HxW for the detection model (default 320x320)")
    p.add_argument("--frames", type=int, default=200, help="frames per measurement (default 200)")
    p.add_argument("--runs", type=int, default=3, help="alternating raw/loop runs; medians compared (default 3)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads, same for both (0: per core)")
    p.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "tensorrt", "auto"))
    p.add_argument("--providers", default="cpu", help="ONNX Runtime providers, e.g. cpu or cuda (default cpu)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("out/bench"))
    return p.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    found = locate(TEXT_DETECTION if args.model == "det" else ORIENTATION)
    h, _, w = args.size.partition("x")
    size = (int(h), int(w)) if args.model == "det" else None
    providers = tuple(x.strip() for x in args.providers.split(",") if x.strip())
    options = RuntimeOptions(
        backend=args.runtime,
        providers=providers,
        threads=args.threads,
        precision=args.precision,
        cache_dir=work / "cache",
        cuda_graph=args.cuda_graph,
    )
    pipe = ModelPipeline.open(
        found.model, options=options, desc=load_description(found.model, found.description), size=size
    )
    reports: list[BenchReport] = []
    try:
        for _ in range(args.runs):
            reports.append(bench_pipeline(pipe, frames=args.frames, warmup=10))
    finally:
        pipe.close()
    raw = statistics.median(r.raw_fps for r in reports)
    loop = statistics.median(r.loop_fps for r in reports)
    median_run = sorted(reports, key=lambda r: r.loop_fps)[len(reports) // 2]
    gpu = args.runtime == "tensorrt" or "cpu" not in providers
    target = GPU_TARGET if gpu else CPU_TARGET
    return {
        "benchmark": "inference_loop",
        "machine": machine(),
        "model": found.model.name,
        "input_shape": list(median_run.input_shape),
        "runtime": median_run.runtime,
        "threads": args.threads,
        "frames": args.frames,
        "runs": [{"raw_fps": r.raw_fps, "loop_fps": r.loop_fps, "ratio": r.ratio} for r in reports],
        "raw_fps": raw,
        "loop_fps": loop,
        "ratio": loop / raw if raw else 0.0,
        "target": target,
        "meets_target": raw > 0 and loop / raw >= target,
        "raw_latency_ms": {"p50": median_run.raw_latency.p50_ms, "p99": median_run.raw_latency.p99_ms},
        "stages_ms": {
            name: {"p50": f.p50_ms, "p99": f.p99_ms, "mean": f.mean_ms} for name, f in median_run.loop.stages.items()
        },
        "drops": median_run.loop.drops,
        "queue_depth": {k: {"mean": m, "max": x} for k, (m, x) in median_run.loop.queue_depth.items()},
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"model      {r['model']} {r['input_shape']}",
        f"runtime    {r['runtime']} (threads {r['threads'] or 'default'})",
        f"raw        {r['raw_fps']:.1f} inferences/s (p50 {r['raw_latency_ms']['p50']:.2f} ms, "
        f"p99 {r['raw_latency_ms']['p99']:.2f} ms)",
        f"loop       {r['loop_fps']:.1f} frames/s",
        f"loop/raw   {r['ratio']:.3f}  (target >= {r['target']}: {'met' if r['meets_target'] else 'MISSED'})",
        "runs       " + ", ".join(f"{x['ratio']:.3f}" for x in r["runs"]),
        f"{'stage':<12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}",
    ]
    for name, s in r["stages_ms"].items():
        lines.append(f"{name:<12} {s['p50']:>8.2f} {s['p99']:>8.2f} {s['mean']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("inference_loop", parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
