"""TensorRT behind the Runtime interface, with engines from the engine cache.

The name-based tensor API (TensorRT 10 and 11): buffers are allocated once per configured shape,
addresses set on the context once, and `infer` is H2D → execute_async_v3 → D2H → synchronize on
one stream, optionally replayed as one CUDA graph. One execution context per runtime (per loop).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pitstop.inference import cuda_mem
from pitstop.inference.engine_build import Profile, build_engine, trt_logger, trt_module
from pitstop.inference.engine_cache import CacheOutcome, EngineCache
from pitstop.inference.errors import EngineError, InferenceError, ModelError, RuntimeUnavailableError, ShapeError
from pitstop.inference.runtime import Array, RuntimeOptions, Shape, TensorSpec, check_buffers, check_feed

log = logging.getLogger(__name__)

_MAX_GRAPHS = 8  # one per buffer set; a loop cycles only a few


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def engine_fields(
    model_sha256: str, options: RuntimeOptions, profile: Profile, gpu: cuda_mem.GpuInfo, trt_version: str
) -> dict[str, Any]:
    """Everything a built engine depends on: the engine cache key."""
    return {
        "model_sha256": model_sha256,
        "tensorrt": trt_version,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())},
        **options.build_fields(),
    }


class TrtRuntime:
    """One TensorRT engine and execution context over one model."""

    def __init__(self, model: Path, options: RuntimeOptions, profile: Profile) -> None:
        trt = trt_module()
        self._trt = trt
        self._options = options
        self._model = Path(model)
        if options.cache_dir is None:
            raise EngineError("TensorRT needs an engine cache directory (RuntimeOptions.cache_dir)")
        try:
            model_bytes = self._model.read_bytes()
        except OSError as e:
            raise ModelError(f"{model}: cannot read the model: {e.strerror or e}") from None
        try:
            self.gpu = cuda_mem.gpu_info(options.device_id)
            cuda_mem.set_device(options.device_id)
        except cuda_mem.CudaError as e:  # no driver, no device: TensorRT cannot run here at all
            raise RuntimeUnavailableError(f"no usable CUDA device for TensorRT: {e.message}") from None
        fields = engine_fields(hashlib.sha256(model_bytes).hexdigest(), options, profile, self.gpu, trt.__version__)
        cache = EngineCache(Path(options.cache_dir) / "engines")
        timing = Path(options.cache_dir) / (
            f"timing-{_safe(trt.__version__)}-{_safe(self.gpu.name)}-sm{self.gpu.compute_capability}.cache"
        )
        self._runtime = trt.Runtime(trt_logger())

        def build() -> bytes:
            return build_engine(
                self._model,
                profile=profile,
                precision=options.precision,
                workspace_mib=options.workspace_mib,
                timing_cache=timing,
            )

        self._engine, self.cache_outcome = cache.get_or_build(fields, build, self._deserialize)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = cuda_mem.Stream()
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(name))
            spec = TensorSpec(name=name, shape=shape, dtype=dtype)
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(spec)
        self._profile = profile
        self._device: dict[str, cuda_mem.DeviceBuffer] = {}
        self._host: list[cuda_mem.HostBuffer] = []
        self._graphs: dict[tuple[int, ...], cuda_mem.Graph] = {}
        self._shapes: dict[str, Shape] = {}
        self._out_shapes: dict[str, Shape] = {}

    @property
    def cache(self) -> CacheOutcome:
        return self.cache_outcome

    def _deserialize(self, data: bytes) -> Any:
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError("TensorRT refused the serialized engine (other TensorRT version or GPU, or corrupt)")
        return engine

    @property
    def name(self) -> str:
        return f"tensorrt {self._trt.__version__} on {self.gpu.name} ({self._options.precision})"

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self._outputs)

    def configure(self, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        check_feed(self.inputs, input_shapes)
        for spec in self._inputs:
            shape = tuple(input_shapes[spec.name])
            lo, _opt, hi = self._engine.get_tensor_profile_shape(spec.name, 0)
            if any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
                raise ShapeError(
                    f"input {spec.name!r}: shape {list(shape)} is outside the engine's profile {list(lo)}..{list(hi)}"
                )
            if not self._context.set_input_shape(spec.name, shape):
                raise ShapeError(f"input {spec.name!r}: TensorRT refused shape {list(shape)}")
        missing = self._context.infer_shapes()
        if missing:
            raise ShapeError(f"TensorRT cannot infer shapes for {', '.join(missing)}")
        self._free_device()
        self._shapes = {s.name: tuple(input_shapes[s.name]) for s in self._inputs}
        self._out_shapes = {s.name: tuple(self._context.get_tensor_shape(s.name)) for s in self._outputs}
        for spec in self._inputs + self._outputs:
            shape = self._shapes.get(spec.name) or self._out_shapes[spec.name]
            buf = cuda_mem.DeviceBuffer(int(np.prod(shape)) * spec.dtype.itemsize)
            self._device[spec.name] = buf
            if not self._context.set_tensor_address(spec.name, buf.ptr):
                raise EngineError(f"TensorRT refused the address of {spec.name!r}")
        return dict(self._out_shapes)

    def host_array(self, shape: Shape, dtype: np.dtype[Any]) -> Array:
        buf = cuda_mem.HostBuffer(shape, dtype)
        self._host.append(buf)
        return buf.array

    def _enqueue(self, inputs: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        for spec in self._inputs:
            self._stream.h2d(self._device[spec.name], inputs[spec.name])
        if not self._context.execute_async_v3(int(self._stream)):
            raise InferenceError(f"{self._model.name}: TensorRT failed to enqueue the inference")
        for spec in self._outputs:
            self._stream.d2h(outputs[spec.name], self._device[spec.name])

    def infer(self, inputs: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        if not self._shapes:
            raise InferenceError("configure() the runtime before infer()")
        check_buffers(tuple(self._inputs), self._shapes, inputs, what="input")
        check_buffers(tuple(self._outputs), self._out_shapes, outputs, what="output")
        if not self._options.cuda_graph:
            self._enqueue(inputs, outputs)
            self._stream.synchronize()
            return
        # A graph bakes in host addresses: one per set of buffers (the loop cycles a few slots).
        key = tuple(int(a.ctypes.data) for a in (*inputs.values(), *outputs.values()))
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= _MAX_GRAPHS:
                self._free_graphs()
            self._enqueue(inputs, outputs)  # warm-up: TensorRT allocates on the first enqueue
            self._stream.synchronize()
            graph = cuda_mem.Graph(self._stream)
            graph.begin()
            self._enqueue(inputs, outputs)
            graph.end()
            self._graphs[key] = graph
        graph.launch()
        self._stream.synchronize()

    def _free_graphs(self) -> None:
        for graph in self._graphs.values():
            graph.destroy()
        self._graphs.clear()

    def _free_device(self) -> None:
        self._free_graphs()
        for buf in self._device.values():
            buf.free()
        self._device.clear()

    def close(self) -> None:
        self._free_device()
        for h in self._host:
            h.free()
        self._host.clear()
        self._stream.destroy()
        self._context = None
        self._engine = None
