"""Build a TensorRT engine from an ONNX model: optimization profile, precision, timing cache.

Works with TensorRT 10.x (JetPack 6) and 11.x (dGPU, JetPack 7): the network is created without the
removed EXPLICIT_BATCH flag, and reduced precision is offered only where the installed TensorRT has
the builder flag for it (TensorRT 11 dropped weak typing: its FP16/INT8 flags are gone).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pitstop.atomic import atomic_write
from pitstop.inference.errors import DescriptionError, EngineError, ModelError, RuntimeUnavailableError
from pitstop.inference.runtime import Shape

log = logging.getLogger(__name__)

Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@functools.cache
def trt_module() -> Any:
    try:
        import tensorrt  # noqa: PLC0415 - optional, GPU machines only
    except ImportError as e:
        raise RuntimeUnavailableError(f"TensorRT is not installed ({e})") from None
    return tensorrt


@functools.cache
def trt_logger() -> Any:
    trt = trt_module()
    return trt.Logger(trt.Logger.WARNING)


def supported_precisions() -> tuple[str, ...]:
    """Precisions this TensorRT can build by flag: fp32 always, the rest where the flag exists."""
    flags = trt_module().BuilderFlag
    found = ["fp32"]
    for name, flag in (("tf32", "TF32"), ("fp16", "FP16"), ("bf16", "BF16")):
        if hasattr(flags, flag):
            found.append(name)
    return tuple(found)


def _progress_monitor(trt: Any) -> Any | None:
    """A builder progress monitor that logs phases (TensorRT ≥ 10 has IProgressMonitor)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            log.info("engine build: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            if now - self._last > 5:
                self._last = now
                log.info("engine build: %s step %d", phase_name, step)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def build_engine(
    model: Path,
    *,
    profile: Profile,
    precision: str = "fp32",
    workspace_mib: int = 1024,
    timing_cache: Path | None = None,
) -> bytes:
    """Parse `model`, build a serialized engine for `profile`, and update `timing_cache` if given.

    Raises ModelError when the parser refuses the model, EngineError when the build fails or the
    precision is not supported by this TensorRT.
    """
    trt = trt_module()
    if precision not in supported_precisions():
        raise EngineError(
            f"precision {precision} is not available in TensorRT {trt.__version__} "
            f"(available: {', '.join(supported_precisions())}; TensorRT 11 needs a strongly typed model instead)"
        )
    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ModelError(f"{model}: TensorRT's ONNX parser refused the model: {'; '.join(errors) or 'no detail'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 is its own option
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor

    names = {network.get_input(i).name for i in range(network.num_inputs)}
    unknown = sorted(set(profile) - names)
    if unknown:
        raise DescriptionError(f"{model}: {unknown[0]!r} is not an input of the model ({', '.join(sorted(names))})")
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in profile:
            if any(d < 0 for d in tensor.shape):
                raise EngineError(f"input {tensor.name!r} has dynamic axes {tuple(tensor.shape)} and no profile")
            continue
        lo, opt, hi = profile[tensor.name]
        opt_profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)

    cache_bytes = b""
    if timing_cache is not None and timing_cache.exists():
        cache_bytes = timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU/TensorRT: starting a new one", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{model}: TensorRT failed to build an engine (see the TensorRT messages above)")
    log.info("engine for %s built in %.1f s", model.name, time.perf_counter() - t0)
    if timing_cache is not None:
        atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))
