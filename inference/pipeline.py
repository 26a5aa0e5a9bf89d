"""One model made ready to run: description checked against the model, runtime opened and configured,
slots of buffers allocated by the runtime, pre- and post-processing planned per frame size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pitstop.inference.engine_build import Profile
from pitstop.inference.errors import DescriptionError, RuntimeUnavailableError
from pitstop.inference.frames import Frame, Result
from pitstop.inference.model_desc import ModelDescription, load_description
from pitstop.inference.ort_runtime import OrtRuntime
from pitstop.inference.postprocess import Postprocessor, make_postprocessor
from pitstop.inference.preprocess import Preprocessor
from pitstop.inference.runtime import Array, Runtime, RuntimeOptions, Shape

log = logging.getLogger(__name__)

_MAX_PLANS = 8  # distinct frame sizes planned for at once; more means a source that changes size per frame


def profile_for(desc: ModelDescription, size: tuple[int, int] | None = None) -> Profile:
    """The optimization profile (min, opt, max) of the image input, from the description."""
    inp = desc.image_input
    opt = inp.concrete_shape(1, size)
    h, w = (opt[2], opt[3]) if inp.layout == "NCHW" else (opt[1], opt[2])
    lo_hw = inp.min_size or (h, w)
    hi_hw = inp.max_size or (h, w)

    def shape(n: int, hw: tuple[int, int]) -> Shape:
        return (n, 3, hw[0], hw[1]) if inp.layout == "NCHW" else (n, hw[0], hw[1], 3)

    n_fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    return {inp.name: (shape(n_fixed or 1, lo_hw), opt, shape(n_fixed or inp.max_batch, hi_hw))}


def open_runtime(model: Path, options: RuntimeOptions, profile: Profile) -> Runtime:
    """The runtime the options ask for; "auto" prefers TensorRT and falls back to ONNX Runtime.

    "auto" tries TensorRT only with an engine cache directory: building an engine on every start
    is never what a device wants.
    """
    if options.backend == "tensorrt" or (options.backend == "auto" and options.cache_dir is not None):
        try:
            from pitstop.inference.trt_runtime import TrtRuntime  # noqa: PLC0415 - needs tensorrt

            return TrtRuntime(model, options, profile)
        except RuntimeUnavailableError as e:
            if options.backend == "tensorrt":
                raise
            log.info("TensorRT not used: %s", e.message)
    return OrtRuntime(model, options, profile)


def check_description(desc: ModelDescription, runtime: Runtime) -> None:
    """The description must name the model's real tensors, with a compatible rank and type."""
    where = desc.source or desc.name
    inputs = {s.name: s for s in runtime.inputs}
    outputs = {s.name for s in runtime.outputs}
    inp = desc.image_input
    if inp.name not in inputs:
        raise DescriptionError(f"{where}: input {inp.name!r} is not an input of the model ({', '.join(inputs)})")
    if len(inputs) != 1:
        raise DescriptionError(f"{where}: the model has {len(inputs)} inputs; pitstop feeds single-input models")
    spec = inputs[inp.name]
    if len(spec.shape) != len(inp.shape):
        raise DescriptionError(f"{where}: input {inp.name!r} has {len(spec.shape)} axes in the model")
    for axis, (m, d) in enumerate(zip(spec.shape, inp.shape, strict=True)):
        if m is not None and isinstance(d, int) and m != d:
            raise DescriptionError(f"{where}: input {inp.name!r} axis {axis} is {m} in the model, {d} described")
    if spec.dtype.name != inp.dtype:
        raise DescriptionError(f"{where}: input {inp.name!r} is {spec.dtype.name} in the model, {inp.dtype} described")
    for out in desc.outputs:
        if out.name not in outputs:
            raise DescriptionError(f"{where}: output {out.name!r} is not an output of the model ({', '.join(outputs)})")


@dataclass(slots=True)
class PipelineSlot:
    inputs: dict[str, Array]
    outputs: dict[str, Array]
    frame_index: int = -1
    captured_ns: int = 0
    origin: str = ""
    frame_hw: tuple[int, int] = (0, 0)
    post: Postprocessor | None = None


class ModelPipeline:
    """A model ready for a loop. Build it (engine included) before switching a loop to it."""

    def __init__(self, model: Path, desc: ModelDescription, runtime: Runtime, size: tuple[int, int] | None) -> None:
        check_description(desc, runtime)
        self.model = model
        self.desc = desc
        self.runtime = runtime
        inp = desc.image_input
        self.input_shape = inp.concrete_shape(1, size)
        self._size = (self.input_shape[2], self.input_shape[3]) if inp.layout == "NCHW" else self.input_shape[1:3]
        self.output_shapes = runtime.configure({inp.name: self.input_shape})
        self._input_dtype = next(s.dtype for s in runtime.inputs if s.name == inp.name)
        self._output_dtypes = {s.name: s.dtype for s in runtime.outputs}
        self._output_names = [o.name for o in desc.outputs]
        self._pre: dict[tuple[int, int], Preprocessor] = {}
        self._post: dict[tuple[int, int], Postprocessor] = {}

    @classmethod
    def open(
        cls,
        model: Path,
        *,
        options: RuntimeOptions | None = None,
        desc: ModelDescription | None = None,
        size: tuple[int, int] | None = None,
    ) -> ModelPipeline:
        model = Path(model)
        desc = desc or load_description(model)
        options = options or RuntimeOptions()
        runtime = open_runtime(model, options, profile_for(desc, size))
        try:
            return cls(model, desc, runtime, size)
        except BaseException:
            runtime.close()
            raise

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    def new_slot(self) -> PipelineSlot:
        name = self.desc.image_input.name
        return PipelineSlot(
            inputs={name: self.runtime.host_array(self.input_shape, self._input_dtype)},
            outputs={n: self.runtime.host_array(s, self._output_dtypes[n]) for n, s in self.output_shapes.items()},
        )

    def _plans(self, hw: tuple[int, int]) -> tuple[Preprocessor, Postprocessor]:
        pre = self._pre.get(hw)
        if pre is None:
            if len(self._pre) >= _MAX_PLANS:
                self._pre.clear()
                self._post.clear()
            pre = Preprocessor(self.desc.image_input, hw, batch=1, size=self._size)
            self._pre[hw] = pre
            self._post[hw] = make_postprocessor(
                self.desc.postprocess, pre.geometry, self._output_names, source=self.desc.source
            )
        return pre, self._post[hw]

    def preprocess(self, frame: Frame, slot: PipelineSlot) -> None:
        hw = (int(frame.image.shape[0]), int(frame.image.shape[1]))
        pre, post = self._plans(hw)
        pre.run(frame.image, slot.inputs[self.desc.image_input.name])
        slot.frame_hw = hw
        slot.post = post  # the plan travels with the frame: a later frame size cannot change it

    def infer(self, slot: PipelineSlot) -> None:
        self.runtime.infer(slot.inputs, slot.outputs)

    def postprocess(self, slot: PipelineSlot) -> Result:
        assert slot.post is not None, "postprocess before preprocess"
        value = slot.post.run([slot.outputs[n] for n in self._output_names])
        return Result(
            index=slot.frame_index,
            captured_ns=slot.captured_ns,
            origin=slot.origin,
            kind=self.desc.postprocess.kind,
            value=value,
        )

    def close(self) -> None:
        self.runtime.close()
