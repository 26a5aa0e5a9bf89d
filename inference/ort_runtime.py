"""ONNX Runtime behind the Runtime interface: TensorRT EP, then CUDA EP, then CPU EP, with their caches.

Inputs and outputs go through IOBinding onto the caller's preallocated arrays, so a steady-state
call neither allocates result arrays nor copies them again (ONNX Runtime writes straight into ours).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pitstop.inference.errors import InferenceError, ModelError, RuntimeUnavailableError, ShapeError
from pitstop.inference.runtime import Array, RuntimeOptions, Shape, TensorSpec, check_buffers, check_feed

log = logging.getLogger(__name__)

_EP_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(np.bool_),
}

Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def _ort() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415 - costs ~0.3 s: only commands that infer pay it
    except ImportError as e:  # pragma: no cover - a dependency of pitstop
        raise RuntimeUnavailableError(f"onnxruntime is not installed: {e}") from None
    if hasattr(onnxruntime, "preload_dlls"):
        # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels only when asked to.
        try:
            onnxruntime.preload_dlls()
        except Exception as e:
            log.debug("onnxruntime.preload_dlls failed: %s", e)
    return onnxruntime


def available_providers() -> tuple[str, ...]:
    """The short names ("tensorrt", "cuda", "cpu") this onnxruntime build offers."""
    offered = set(_ort().get_available_providers())
    return tuple(short for short, full in _EP_NAMES.items() if full in offered)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


class OrtRuntime:
    """One ONNX Runtime session over one model file."""

    def __init__(self, model: Path, options: RuntimeOptions | None = None, profile: Profile | None = None) -> None:
        self._options = options or RuntimeOptions()
        ort = _ort()
        self._ort = ort
        model = Path(model)
        try:
            model_bytes = model.read_bytes()
        except OSError as e:
            raise ModelError(f"{model}: cannot read the model: {e.strerror or e}") from None
        self._model_sha = hashlib.sha256(model_bytes).hexdigest()

        wanted = self._options.providers
        unknown = [p for p in wanted if p not in _EP_NAMES]
        if unknown:
            raise RuntimeUnavailableError(f"unknown execution provider {unknown[0]!r} (known: tensorrt, cuda, cpu)")
        offered = available_providers()
        providers = [p for p in wanted if p in offered]
        if not providers:
            raise RuntimeUnavailableError(
                f"none of the execution providers {', '.join(wanted)} is available in onnxruntime "
                f"{ort.__version__} (available: {', '.join(offered)})"
            )

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self._options.threads
        so.inter_op_num_threads = 1
        spin = "1" if self._options.spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        for key, value in self._options.extra.items():
            so.add_session_config_entry(key, value)
        so.log_severity_level = 3  # errors only: warnings about unused initializers are noise in a daemon

        provider_args = [(_EP_NAMES[p], self._provider_options(p, profile)) for p in providers]
        try:
            self._session = ort.InferenceSession(model_bytes, sess_options=so, providers=provider_args)
        except Exception as e:
            raise ModelError(f"{model}: onnxruntime cannot load the model: {_one_line(e)}") from None
        active = self._session.get_providers()
        # onnxruntime falls back silently when a provider's libraries fail to load: say so, and refuse
        # when the caller named exactly one GPU provider.
        self._provider = next((s for s, full in _EP_NAMES.items() if full == active[0]), "cpu")
        if len(wanted) == 1 and wanted[0] != self._provider:
            raise RuntimeUnavailableError(
                f"execution provider {wanted[0]} failed to load (onnxruntime fell back to {active[0]}); "
                "check the CUDA/cuDNN/TensorRT libraries"
            )
        if self._provider != providers[0]:
            log.warning("%s did not load; running on %s", _EP_NAMES[providers[0]], active[0])

        self._inputs = tuple(self._spec(i) for i in self._session.get_inputs())
        self._outputs = tuple(self._spec(o) for o in self._session.get_outputs())
        self._binding = self._session.io_binding()
        self._bound: dict[str, int] = {}
        self._shapes: dict[str, Shape] = {}
        self._run_options = ort.RunOptions()
        self._model = model

    def _provider_options(self, provider: str, profile: Profile | None) -> dict[str, str]:
        o = self._options
        if provider == "cpu":
            return {}
        if provider == "cuda":
            return {
                "device_id": str(o.device_id),
                "cudnn_conv_algo_search": "HEURISTIC",  # EXHAUSTIVE costs seconds at start for a few %
                "do_copy_in_default_stream": "1",
                "enable_cuda_graph": "1" if o.cuda_graph else "0",
            }
        opts: dict[str, str] = {
            "device_id": str(o.device_id),
            "trt_fp16_enable": "1" if o.precision == "fp16" else "0",
            "trt_bf16_enable": "1" if o.precision == "bf16" else "0",
            "trt_max_workspace_size": str(o.workspace_mib << 20),
            "trt_cuda_graph_enable": "1" if o.cuda_graph else "0",
        }
        if o.cache_dir is not None:
            # The EP names its engines by graph and GPU, not by onnxruntime version: a directory per
            # model and onnxruntime version keeps stale engines from being picked up after an upgrade.
            where = Path(o.cache_dir) / f"ort-{self._ort.__version__}-{self._model_sha[:16]}"
            where.mkdir(parents=True, exist_ok=True)
            opts.update(
                trt_engine_cache_enable="1",
                trt_engine_cache_path=str(where),
                trt_timing_cache_enable="1",
                trt_timing_cache_path=str(where),
            )
        if profile:
            keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
            for idx, key in enumerate(keys):
                opts[key] = ",".join(f"{n}:{'x'.join(map(str, p[idx]))}" for n, p in profile.items())
        return opts

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        dtype = _DTYPES.get(arg.type)
        if dtype is None:
            raise ModelError(f"tensor {arg.name!r} has type {arg.type}, which pitstop does not feed")
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
        return TensorSpec(name=arg.name, shape=shape, dtype=dtype)

    @property
    def name(self) -> str:
        return f"onnxruntime {self._ort.__version__}:{_EP_NAMES[self._provider]}"

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def configure(self, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        check_feed(self._inputs, input_shapes)
        shapes = {k: tuple(v) for k, v in input_shapes.items()}
        # One run on zeros: learns the output shapes and pays the first-run cost (TensorRT EP builds
        # its engine, CUDA EP picks kernels) here rather than on the first frame.
        feeds = {s.name: np.zeros(shapes[s.name], dtype=s.dtype) for s in self._inputs}
        try:
            results = self._session.run(None, feeds)
        except Exception as e:
            raise ShapeError(f"{self._model.name}: the model refuses inputs {shapes}: {_one_line(e)}") from None
        out = {spec.name: tuple(int(d) for d in r.shape) for spec, r in zip(self._outputs, results, strict=True)}
        self._shapes, self._out_shapes = shapes, out  # only once the model accepted them
        self._bound.clear()
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        return out

    def host_array(self, shape: Shape, dtype: np.dtype[Any]) -> Array:
        return np.zeros(shape, dtype=dtype)

    def _bind(self, name: str, arr: Array, *, is_input: bool) -> None:
        ptr = int(arr.ctypes.data)
        key = ("i:" if is_input else "o:") + name
        if self._bound.get(key) == ptr:
            return
        if not arr.flags.c_contiguous:
            raise ShapeError(f"{name!r}: arrays handed to the runtime must be C-contiguous")
        if is_input:
            self._binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), ptr)
        else:
            self._binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), ptr)
        self._bound[key] = ptr

    def infer(self, inputs: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        if not self._shapes:
            raise InferenceError("configure() the runtime before infer()")
        check_buffers(self._inputs, self._shapes, inputs, what="input")
        check_buffers(self._outputs, self._out_shapes, outputs, what="output")
        for spec in self._inputs:
            self._bind(spec.name, inputs[spec.name], is_input=True)
        for spec in self._outputs:
            self._bind(spec.name, outputs[spec.name], is_input=False)
        try:
            self._session.run_with_iobinding(self._binding, self._run_options)
        except Exception as e:
            raise InferenceError(f"{self._model.name}: inference failed: {_one_line(e)}") from None

    def run_plain(self, feeds: Mapping[str, Array]) -> list[Array]:
        """A plain `session.run`, allocating its results: the reference the tests compare against."""
        result: list[Array] = self._session.run(None, dict(feeds))
        return result

    def close(self) -> None:
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._bound.clear()
