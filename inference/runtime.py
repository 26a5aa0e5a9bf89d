"""The one small interface every inference runtime implements, and the options that choose one.

A runtime is opened for one model, configured once for the input shapes a loop will feed, and then
only copies and executes: `infer` reads the caller's input arrays and fills the caller's output arrays,
both allocated up front with `host_array` (page-locked memory where the runtime copies to a GPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pitstop.inference.choices import BACKENDS, PRECISIONS, PROVIDERS
from pitstop.inference.errors import ShapeError

__all__ = ["BACKENDS", "PRECISIONS", "PROVIDERS"]  # re-exported: they belong with the options

Array = npt.NDArray[Any]
Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as the runtime sees it; dynamic axes are None."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]

    def check(self, shape: Shape) -> None:
        """Refuse a concrete shape that this tensor cannot take."""
        if len(shape) != len(self.shape):
            raise ShapeError(f"input {self.name!r}: {len(shape)} axes given, the model has {len(self.shape)}")
        for axis, (want, got) in enumerate(zip(self.shape, shape, strict=True)):
            if got <= 0 or (want is not None and want != got):
                raise ShapeError(
                    f"input {self.name!r}: shape {list(shape)} does not fit the model's {self.describe()} (axis {axis})"
                )

    def describe(self) -> str:
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How to run a model. The same options key the engine cache, so keep them plain data."""

    backend: str = "auto"
    providers: tuple[str, ...] = PROVIDERS  # onnxruntime: tried in this order, the first that loads wins
    device_id: int = 0
    threads: int = 0  # CPU: intra-op threads, 0 = one per physical core (ONNX Runtime's default)
    spinning: bool = False  # CPU: idle worker threads spin; off by default so an idle daemon burns no CPU
    precision: str = "fp32"  # GPU: reduced precision where the installed runtime supports it
    cache_dir: Path | None = None  # engines, timing caches, ONNX Runtime's TensorRT EP caches
    cuda_graph: bool = False
    workspace_mib: int = 1024
    extra: Mapping[str, str] = field(default_factory=dict)  # raw ONNX Runtime session config entries

    def build_fields(self) -> dict[str, Any]:
        """The options that change a built engine (and nothing that doesn't)."""
        return {"precision": self.precision, "workspace_mib": self.workspace_mib}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        d["extra"] = dict(self.extra)
        return d


class Runtime(Protocol):
    """An opened model. Not thread-safe: one loop's inference stage owns it."""

    @property
    def name(self) -> str:
        """What actually runs, e.g. "onnxruntime:CUDAExecutionProvider" or "tensorrt 10.13.3"."""
        ...

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def configure(self, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        """Fix the input shapes the loop will feed; return the output shapes. Raises ShapeError."""
        ...

    def host_array(self, shape: Shape, dtype: np.dtype[Any]) -> Array:
        """Host memory this runtime copies from and to fastest (page-locked for CUDA)."""
        ...

    def infer(self, inputs: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        """Run once on `inputs` (configured shapes) and write every output into `outputs`."""
        ...

    def close(self) -> None: ...


def check_feed(specs: tuple[TensorSpec, ...], shapes: Mapping[str, Shape]) -> None:
    """Every model input is given, nothing else is, and each shape fits."""
    names = {s.name for s in specs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise ShapeError(f"the model has no input {unknown[0]!r} (inputs: {', '.join(sorted(names))})")
    for spec in specs:
        if spec.name not in shapes:
            raise ShapeError(f"input {spec.name!r} of the model was not given a shape")
        spec.check(shapes[spec.name])


def check_buffers(
    specs: tuple[TensorSpec, ...],
    shapes: Mapping[str, Shape],
    arrays: Mapping[str, Array],
    *,
    what: str,
) -> None:
    """Each array handed to `infer` has the configured shape and the model's dtype."""
    for spec in specs:
        arr = arrays[spec.name]
        if arr.shape != shapes[spec.name] or arr.dtype != spec.dtype:
            raise ShapeError(
                f"{what} {spec.name!r}: got {arr.dtype}{list(arr.shape)}, "
                f"configured {spec.dtype}{list(shapes[spec.name])}"
            )
