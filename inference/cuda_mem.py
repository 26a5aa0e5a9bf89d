"""CUDA memory and streams through cuda-python, as NVIDIA's own TensorRT samples use them.

Every call goes through `check`, which turns a CUDA error code into a CudaError naming the call.
pycuda is avoided on purpose: it creates its own context and clashes with others in one process.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from pitstop.inference.errors import InferenceError, RuntimeUnavailableError
from pitstop.inference.runtime import Array, Shape


class CudaError(InferenceError):
    """A CUDA runtime call failed."""


@functools.cache
def cudart() -> Any:
    """The CUDA runtime bindings: `cuda.bindings.runtime` (cuda-python ≥ 12.6) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime  # noqa: PLC0415 - optional, GPU machines only

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # noqa: PLC0415

        return runtime
    except ImportError as e:
        raise RuntimeUnavailableError(f"cuda-python is not installed ({e}); it is needed for TensorRT") from None


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python result tuple `(err, *values)`; raise CudaError unless err is success."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise CudaError(f"{what} failed: {_decode(name)}: {_decode(text)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _decode(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int


def gpu_info(device: int = 0) -> GpuInfo:
    rt = cudart()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if device >= count:
        raise RuntimeUnavailableError(f"CUDA device {device} does not exist ({count} found)")
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return GpuInfo(device, _decode(prop.name).rstrip("\x00"), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))


def set_device(device: int) -> None:
    check(cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


class HostBuffer:
    """Page-locked host memory (cudaMallocHost): copies to and from it run asynchronously at full speed."""

    def __init__(self, shape: Shape, dtype: np.dtype[Any]) -> None:
        self.nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        used = int(np.prod(shape)) * dtype.itemsize
        self.array: Array = np.frombuffer(memoryview(raw), dtype=np.uint8)[:used].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class Stream:
    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def __int__(self) -> int:
        return int(self.handle)

    def h2d(self, dst: DeviceBuffer, src: Array) -> None:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(dst.ptr, src.ctypes.data, src.nbytes, kind, self.handle), "cudaMemcpyAsync H2D")

    def d2h(self, dst: Array, src: DeviceBuffer) -> None:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(dst.ctypes.data, src.ptr, dst.nbytes, kind, self.handle), "cudaMemcpyAsync D2H")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class Graph:
    """A captured CUDA graph of one inference (copies included), replayed with one launch.

    Capture happens after a warm-up enqueue (TensorRT allocates lazily on the first one) and must be
    redone whenever shapes or buffer addresses change.
    """

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._exec: Any = None
        self._graph: Any = None

    def begin(self) -> None:
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(self._stream.handle, mode), "cudaStreamBeginCapture")

    def end(self) -> None:
        rt = cudart()
        self._graph = check(rt.cudaStreamEndCapture(self._stream.handle), "cudaStreamEndCapture")
        self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")

    def launch(self) -> None:
        check(cudart().cudaGraphLaunch(self._exec, self._stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = cudart()
        if self._exec is not None:
            check(rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            check(rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None
