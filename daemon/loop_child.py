"""One supervised inference loop in its own process: `python -m pitstop.daemon.loop_child --figures-fd N`.

The supervisor writes a `ChildSpec` as JSON on the config fd (stdin by default; not argv, where every user
would see sink credentials) and reads JSON lines from the figures fd:

    {"event": "started", "runtime": "...", "limits": "..."}       the loop is up
    {"event": "figures", "figures": {...}}                         every --every seconds
    {"event": "exit", "kind": "...", "error": ..., "figures": ...} last words, when the child can say them

The exit status says the same as "kind" for a supervisor that got no last line: 0 the source ended,
EXIT_CONFIG the model or configuration cannot work (a restart will not fix it soon), EXIT_CRASHED anything
else. Stopped by SIGTERM, the child ends its loop cleanly and then dies of SIGTERM, so that its parent
tells a stop apart from a finished source.

This module imports nothing heavy at the top: the daemon imports it for the spec, the child loads numpy and
the runtimes only after applying its limits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pitstop.daemon.config import LoopConfig
from pitstop.daemon.limits import ChildLimits, apply_in_child

if TYPE_CHECKING:
    from pitstop.inference.loop import Loop
    from pitstop.inference.stats import LoopFigures

log = logging.getLogger("pitstop.daemon.loop_child")

EXIT_FINISHED = 0
EXIT_CRASHED = 70  # sysexits EX_SOFTWARE
EXIT_CONFIG = 78  # sysexits EX_CONFIG
FIRST_POLL_S = 0.25  # how soon the first results are reported

KIND_FINISHED = "finished"
KIND_CONFIG = "config"
KIND_CRASHED = "crashed"

_PR_SET_PDEATHSIG = 1
_MEMORY = re.compile(r"MemoryError|bad[_ ]alloc|out of memory|cannot allocate memory|(unable|failed) to allocate", re.I)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """Everything a child needs: its loop, its limits, and who its parent is."""

    loop: LoopConfig
    limits: ChildLimits
    parent: int  # the supervisor's pid: the child ends when that process is gone
    cache_dir: str | None = None  # engines and runtime caches; None: no TensorRT under runtime "auto"

    def to_json(self) -> str:
        return json.dumps(
            {
                "loop": config_to_json(self.loop),
                "limits": self.limits.as_dict(),
                "parent": self.parent,
                "cache_dir": self.cache_dir,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ChildSpec:
        """Raises ValueError (json.JSONDecodeError included), KeyError or TypeError for a malformed spec."""
        raw = json.loads(text)
        return cls(
            loop=config_from_json(raw["loop"]),
            limits=ChildLimits.from_dict(raw["limits"]),
            parent=int(raw["parent"]),
            cache_dir=raw.get("cache_dir"),
        )


def config_to_json(cfg: LoopConfig) -> dict[str, Any]:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    d["model"] = str(cfg.model)
    d["providers"] = list(cfg.providers)
    d["size"] = list(cfg.size) if cfg.size is not None else None
    d["source_opts"] = dict(cfg.source_opts)
    d["sink_opts"] = dict(cfg.sink_opts)
    return d


def config_from_json(raw: dict[str, Any]) -> LoopConfig:
    unknown = sorted(set(raw) - {f.name for f in fields(LoopConfig)})
    if unknown:
        raise ValueError(f"unknown loop settings: {', '.join(unknown)}")
    kwargs = dict(raw)
    kwargs["model"] = Path(raw["model"])
    if "providers" in raw:
        kwargs["providers"] = tuple(raw["providers"])
    if raw.get("size") is not None:
        h, w = raw["size"]
        kwargs["size"] = (int(h), int(w))
    return LoopConfig(**kwargs)


class Reporter:
    """JSON lines to the supervisor. A supervisor gone (EPIPE) stops the loop: nobody is watching it."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self.broken = False

    def send(self, event: str, **fields: Any) -> None:
        if self.broken:
            return
        try:
            self._out.write(json.dumps({"event": event, **fields}) + "\n")
            self._out.flush()
        except (OSError, ValueError):
            self.broken = True

    def exit(self, kind: str, error: str | None, figures: LoopFigures | None) -> None:
        self.send("exit", kind=kind, error=error, figures=figures.as_dict() if figures is not None else None)


def memory_cause(message: str) -> str:
    """The message, with "out of memory" in front when it is about memory (MemoryError, bad_alloc)."""
    message = message.rstrip(": ")  # MemoryError often has no text: "stage failed: MemoryError: "
    return f"out of memory: {message}" if _MEMORY.search(message) else message


def classify(e: BaseException) -> tuple[str, str]:
    """(kind, message) of an exception raised while setting the loop up."""
    from pitstop.errors import PitstopError, UsageError  # noqa: PLC0415
    from pitstop.inference.errors import (  # noqa: PLC0415
        DescriptionError,
        EngineError,
        ModelError,
        RuntimeUnavailableError,
        ShapeError,
    )

    message = e.message if isinstance(e, PitstopError) else f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError):
        return KIND_CRASHED, memory_cause(message)
    # Source and sink errors are not here: a camera or a broker that is down now may be back soon.
    config = (ModelError, DescriptionError, ShapeError, RuntimeUnavailableError, EngineError, UsageError)
    if isinstance(e, config):
        return KIND_CONFIG, message
    return KIND_CRASHED, memory_cause(message)


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when the supervisor goes (even by SIGKILL): no loop outlives its daemon."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent went before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def build(spec: ChildSpec) -> Loop:
    """The loop of `spec`, put together as `pitstop inference run` does. Raises what opening the parts raises."""
    from pitstop.inference.choices import PROVIDERS  # noqa: PLC0415 - numpy and the runtimes load here
    from pitstop.inference.errors import ModelError  # noqa: PLC0415
    from pitstop.inference.loop import Loop  # noqa: PLC0415
    from pitstop.inference.pipeline import ModelPipeline  # noqa: PLC0415
    from pitstop.inference.runtime import RuntimeOptions  # noqa: PLC0415
    from pitstop.inference.sinks import open_sink  # noqa: PLC0415
    from pitstop.inference.sources import open_source  # noqa: PLC0415

    cfg = spec.loop
    if not cfg.model.is_file():
        raise ModelError(f"model {cfg.model} not found")
    options = RuntimeOptions(
        backend=cfg.runtime,
        providers=cfg.providers or PROVIDERS,
        device_id=0,  # the supervisor made the chosen GPU the only visible one
        # Unset threads follow the CPU limit: more threads than cores only get throttled.
        threads=cfg.threads or (math.ceil(cfg.cpu_max) if cfg.cpu_max is not None else 0),
        precision=cfg.precision,
        cache_dir=Path(spec.cache_dir) if spec.cache_dir else None,
    )
    pipe = ModelPipeline.open(cfg.model, options=options, size=cfg.size)
    try:
        source = open_source(cfg.source, **cfg.source_opts)
    except BaseException:
        pipe.close()
        raise
    try:
        sink = open_sink(cfg.sink, **cfg.sink_opts)
    except BaseException:
        pipe.close()
        source.close()
        raise
    return Loop(source, pipe, sink, name=cfg.name)


def run(spec: ChildSpec, reporter: Reporter, every_s: float) -> int:
    """Build, run and report one loop; the exit status."""
    try:
        apply_in_child(spec.limits)
    except OSError as e:
        reporter.exit(KIND_CONFIG, f"cannot apply limits ({spec.limits.describe()}): {e}", None)
        return EXIT_CONFIG
    try:
        loop = build(spec)
    except Exception as e:
        kind, message = classify(e)
        log.error("%s: %s", spec.loop.name, message)
        reporter.exit(kind, message, None)
        return EXIT_CONFIG if kind == KIND_CONFIG else EXIT_CRASHED

    stopped = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopped
        stopped = True
        loop.stop()

    signal.signal(signal.SIGTERM, on_signal)
    loop.start()
    reporter.send("started", runtime=loop.stats.runtime, limits=spec.limits.describe())
    # The first results are reported as soon as they exist (the daemon says when a loop serves), then every_s.
    serving = False
    due = time.monotonic() + every_s
    while not loop.wait(timeout=max(0.0, due - time.monotonic()) if serving else min(every_s, FIRST_POLL_S)):
        figures = loop.figures()
        if not serving:
            serving = figures.frames_out > 0
            if not serving and time.monotonic() < due:
                continue
        reporter.send("figures", figures=figures.as_dict())
        due = time.monotonic() + every_s
        if reporter.broken:
            loop.stop()
    figures = loop.figures()
    if loop.failure is not None:
        reporter.exit(KIND_CRASHED, memory_cause(loop.failure.message), figures)
        return EXIT_CRASHED
    reporter.exit(KIND_FINISHED, None, figures)
    if stopped:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    return EXIT_FINISHED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pitstop.daemon.loop_child", description=__doc__.splitlines()[0])
    p.add_argument("--figures-fd", type=int, required=True, help="write JSON lines here")
    p.add_argument("--config-fd", type=int, default=0, help="read the ChildSpec JSON from here (default stdin)")
    p.add_argument("--every", type=float, default=5.0, metavar="S", help="figures every S seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    with os.fdopen(args.figures_fd, "w", encoding="utf-8") as out:
        reporter = Reporter(out)
        try:
            with os.fdopen(args.config_fd, encoding="utf-8") as f:
                spec = ChildSpec.from_json(f.read())
        except (OSError, ValueError, KeyError, TypeError) as e:
            reporter.exit(KIND_CONFIG, f"bad loop spec: {type(e).__name__}: {e}", None)
            return EXIT_CONFIG
        die_with_parent(spec.parent)
        try:
            return run(spec, reporter, max(0.05, args.every))
        except Exception as e:  # a bug here still gets its cause to the supervisor
            log.exception("%s: unexpected failure", spec.loop.name)
            reporter.exit(KIND_CRASHED, memory_cause(f"{type(e).__name__}: {e}"), None)
            return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
