"""`pitstop inference run|bench|build|providers`: loops, figures and engines from the command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pitstop.errors import UsageError
from pitstop.inference.choices import BACKENDS, PRECISIONS, PROVIDERS

if TYPE_CHECKING:
    from pitstop.inference.runtime import RuntimeOptions

DEFAULT_CACHE = Path("/var/lib/pitstop/engines")


def register(sub: Any) -> None:
    area = sub.add_parser("inference", help="run, benchmark and prepare inference loops")
    cmds = area.add_subparsers(dest="inference_cmd", metavar="COMMAND", parser_class=type(area))
    cmds.required = True

    p = cmds.add_parser("run", help="run a loop: SOURCE → model → SINK, and print its figures")
    p.add_argument("model", type=Path, help="ONNX model; its description is MODEL with suffix .toml")
    p.add_argument("--source", default="synthetic:", help="synthetic:, DIR, file:VIDEO, rtsp://…, v4l2:/dev/videoN")
    p.add_argument("--sink", default="-", help="- (JSON lines on stdout), jsonl:PATH, mqtt://host:port/topic")
    p.add_argument("--source-opt", action="append", default=[], metavar="KEY=VALUE", help="source option, repeatable")
    p.add_argument("--sink-opt", action="append", default=[], metavar="KEY=VALUE", help="sink option, repeatable")
    p.add_argument("--frames", type=int, help="stop after this many frames")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--stats-every", type=float, default=0.0, metavar="S", help="print figures every S seconds")
    p.add_argument("--json", action="store_true", help="final figures as JSON on stderr")
    _runtime_args(p)
    p.set_defaults(handler=cmd_run)

    p = cmds.add_parser("bench", help="raw runtime throughput against full-loop throughput, same inputs")
    p.add_argument("model", type=Path)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", action="store_true")
    _runtime_args(p)
    p.set_defaults(handler=cmd_bench)

    p = cmds.add_parser("build", help="build (or find in the cache) the engine for a model, and time it")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true")
    _runtime_args(p)
    p.set_defaults(handler=cmd_build)

    p = cmds.add_parser("providers", help="runtimes and execution providers available here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_providers)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=BACKENDS, default="auto", help="auto: TensorRT if installed, else ONNX Runtime")
    p.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help="ONNX Runtime execution providers in preference order (default: tensorrt,cuda,cpu)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: one per physical core)")
    p.add_argument("--spinning", action="store_true", help="let idle CPU worker threads spin (lower latency)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--size", type=_size, help="input HxW for models with dynamic height and width")
    p.add_argument("--cache-dir", type=Path, help=f"engines and runtime caches (default {DEFAULT_CACHE})")
    p.add_argument("--cuda-graph", action="store_true", help="replay each inference as one CUDA graph")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")


def _size(value: str) -> tuple[int, int]:
    h, sep, w = value.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) == 0 or int(w) == 0:
        raise argparse.ArgumentTypeError(f"{value!r}: use HEIGHTxWIDTH, e.g. 320x320")
    return int(h), int(w)


def _pairs(flag: str, values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {v!r}: use KEY=VALUE")
        out[key] = value
    return out


def options_from(args: argparse.Namespace) -> RuntimeOptions:
    from pitstop.inference.runtime import RuntimeOptions  # noqa: PLC0415 - numpy loads only when inferring

    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        raise UsageError(f"--providers: {', '.join(unknown) or 'empty'}: use some of {', '.join(PROVIDERS)}")
    return RuntimeOptions(
        backend=args.runtime,
        providers=providers,
        device_id=args.device,
        threads=args.threads,
        spinning=args.spinning,
        precision=args.precision,
        cache_dir=args.cache_dir or DEFAULT_CACHE,
        cuda_graph=args.cuda_graph,
    )


def _check_model(model: Path) -> None:
    if not model.is_file():
        raise UsageError(f"{model}: no such model file")


def cmd_run(args: argparse.Namespace) -> int:
    from pitstop.inference.loop import Loop  # noqa: PLC0415 - onnxruntime and PyAV load only when used
    from pitstop.inference.pipeline import ModelPipeline  # noqa: PLC0415
    from pitstop.inference.sinks import open_sink  # noqa: PLC0415
    from pitstop.inference.sources import open_source  # noqa: PLC0415

    _check_model(args.model)
    source_opts = _pairs("--source-opt", args.source_opt)
    sink_opts = _pairs("--sink-opt", args.sink_opt)
    pipe = ModelPipeline.open(args.model, options=options_from(args), size=args.size)
    try:
        source = open_source(args.source, **source_opts)
    except BaseException:
        pipe.close()
        raise
    try:
        sink = open_sink(args.sink, **sink_opts)
    except BaseException:
        pipe.close()
        source.close()
        raise
    loop = Loop(source, pipe, sink, max_frames=args.frames, name=args.model.stem)

    def on_signal(signum: int, frame: Any) -> None:
        loop.stop()

    previous = signal.signal(signal.SIGTERM, on_signal)
    loop.start()
    try:
        started = time.monotonic()
        next_stats = started + (args.stats_every or float("inf"))
        while True:
            now = time.monotonic()
            until = next_stats
            if args.seconds is not None:
                until = min(until, started + args.seconds)
            if loop.wait(timeout=max(0.0, min(until, now + 0.5) - now)):
                break
            now = time.monotonic()
            if now >= next_stats:
                sys.stderr.write(loop.figures().table() + "\n\n")
                next_stats += args.stats_every
            if args.seconds is not None and now - started >= args.seconds:
                loop.stop()
    except KeyboardInterrupt:
        loop.stop()
        loop.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    figures = loop.figures()
    sys.stderr.write((json.dumps(figures.as_dict(), indent=2) if args.json else figures.table()) + "\n")
    if loop.failure is not None:
        raise loop.failure
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pitstop.inference.bench import bench  # noqa: PLC0415

    _check_model(args.model)
    if args.frames < 2:
        raise UsageError("--frames: at least 2")
    report = bench(args.model, options=options_from(args), size=args.size, frames=args.frames, warmup=args.warmup)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from pitstop.inference.pipeline import ModelPipeline  # noqa: PLC0415

    _check_model(args.model)
    pipe = ModelPipeline.open(args.model, options=options_from(args), size=args.size)
    try:
        outcome = getattr(pipe.runtime, "cache_outcome", None)
        info: dict[str, Any] = {"model": str(args.model), "runtime": pipe.runtime_name}
        if outcome is not None:
            info.update(
                engine=str(outcome.path),
                cache=outcome.reason,
                build_seconds=round(outcome.build_s, 3),
                load_seconds=round(outcome.load_s, 4),
            )
    finally:
        pipe.close()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:<14} {v}")
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    from pitstop.inference.ort_runtime import available_providers  # noqa: PLC0415

    info: dict[str, Any] = {"onnxruntime": list(available_providers())}
    try:
        from pitstop.inference.engine_build import supported_precisions, trt_module  # noqa: PLC0415

        info["tensorrt"] = {"version": trt_module().__version__, "precisions": list(supported_precisions())}
    except Exception as e:
        info["tensorrt"] = {"unavailable": getattr(e, "message", str(e))}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"onnxruntime   {', '.join(info['onnxruntime'])}")
        trt = info["tensorrt"]
        print(f"tensorrt      {trt.get('version') or trt.get('unavailable')}")
    return 0
