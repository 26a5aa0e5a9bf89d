"""ONNX Runtime behind the Runtime interface (inference/ort_runtime.py) and the description checks of
ModelPipeline (inference/pipeline.py), on the real test models with ONNX Runtime's CPU execution provider.

Every numeric comparison is against a plain `onnxruntime.InferenceSession(...).run` with the same thread
count. Tolerance ORT_TOL: measured 0.0 (bit-identical) with onnxruntime 1.32 on x86-64; the IOBinding path
runs the same kernels on the same data, so only a different thread split could move the last bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pitstop.inference.errors import (
    DescriptionError,
    InferenceError,
    ModelError,
    RuntimeUnavailableError,
    ShapeError,
)
from pitstop.inference.frames import Frame
from pitstop.inference.model_desc import load_description
from pitstop.inference.ort_runtime import OrtRuntime, available_providers
from pitstop.inference.pipeline import ModelPipeline
from pitstop.inference.runtime import RuntimeOptions, TensorSpec
from pitstop.inference.test_models import ORIENTATION, TEXT_DETECTION, ModelFiles, locate

THREADS = 2
OPTIONS = RuntimeOptions(backend="onnxruntime", providers=("cpu",), threads=THREADS)
DET_OUT = "sigmoid_0.tmp_0"
ORI_OUT = "fetch_name_0"
DET_SHAPE = (1, 3, 320, 320)
ORT_TOL = 1e-6  # measured 0.0: the runtime's output is bit-identical to session.run's
F32 = np.dtype(np.float32)


@pytest.fixture(scope="module")
def det() -> ModelFiles:
    return locate(TEXT_DETECTION)


@pytest.fixture(scope="module")
def orient() -> ModelFiles:
    return locate(ORIENTATION)


@pytest.fixture
def det_rt(det: ModelFiles):
    rt = OrtRuntime(det.model, OPTIONS)
    yield rt
    rt.close()


def plain_session(model: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])


def one_line(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    return message


def inputs_like(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values in the range a normalised image has ([-1, 1] for the detection model)."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape).astype(np.float32)


# --- specs and configure ---------------------------------------------------------------------------------------


def test_specs_name_shape_and_dtype_of_the_models(det: ModelFiles, orient: ModelFiles) -> None:
    rt = OrtRuntime(det.model, OPTIONS)
    assert rt.inputs == (TensorSpec("x", (None, 3, None, None), F32),)
    assert rt.outputs == (TensorSpec(DET_OUT, (None, 1, None, None), F32),)
    assert rt.provider == "cpu"
    assert rt.name == f"onnxruntime {ort.__version__}:CPUExecutionProvider"
    assert rt.inputs[0].describe() == "[?,3,?,?]"
    rt.close()
    rt = OrtRuntime(orient.model, OPTIONS)
    assert rt.inputs == (TensorSpec("x", (None, 3, 224, 224), F32),)
    assert rt.outputs == (TensorSpec(ORI_OUT, (None, 4), F32),)
    rt.close()


@pytest.mark.parametrize(
    ("shape", "out"),
    [(DET_SHAPE, (1, 1, 320, 320)), ((1, 3, 64, 96), (1, 1, 64, 96)), ((2, 3, 32, 32), (2, 1, 32, 32))],
)
def test_configure_returns_the_output_shapes(det_rt: OrtRuntime, shape: tuple[int, ...], out: tuple) -> None:
    assert det_rt.configure({"x": shape}) == {DET_OUT: out}


def test_configure_fixed_model(orient: ModelFiles) -> None:
    rt = OrtRuntime(orient.model, OPTIONS)
    assert rt.configure({"x": (1, 3, 224, 224)}) == {ORI_OUT: (1, 4)}
    assert rt.configure({"x": (3, 3, 224, 224)}) == {ORI_OUT: (3, 4)}
    with pytest.raises(ShapeError, match=r"axis 2"):
        rt.configure({"x": (1, 3, 256, 224)})
    rt.close()


# --- infer against a plain session.run -------------------------------------------------------------------------


def test_infer_equals_plain_session_run(det: ModelFiles, det_rt: OrtRuntime) -> None:
    out_shape = det_rt.configure({"x": DET_SHAPE})[DET_OUT]
    session = plain_session(det.model)
    x = det_rt.host_array(DET_SHAPE, F32)
    y = det_rt.host_array(out_shape, F32)
    for seed in range(3):
        x[...] = inputs_like(DET_SHAPE, seed)  # in place: the bound input buffer is read at every run
        det_rt.infer({"x": x}, {DET_OUT: y})
        (ref,) = session.run(None, {"x": x})
        diff = float(np.abs(y - ref).max())
        assert diff <= ORT_TOL, f"max |runtime - session.run| = {diff}"
        assert y.min() >= 0.0 and y.max() <= 1.0  # a probability map, not an untouched buffer
        (plain,) = det_rt.run_plain({"x": x})
        assert np.array_equal(plain, ref)


def test_infer_cycling_buffers_rebinds_each(det: ModelFiles, det_rt: OrtRuntime) -> None:
    """A loop cycles a few slots: each call binds that slot's arrays, and results land in that slot's output."""
    shape = (1, 3, 64, 64)
    out_shape = det_rt.configure({"x": shape})[DET_OUT]
    slots = [(inputs_like(shape, seed), np.full(out_shape, -1.0, np.float32)) for seed in range(3)]
    session = plain_session(det.model)
    for _ in range(2):
        for x, y in slots:
            det_rt.infer({"x": x}, {DET_OUT: y})
    for x, y in slots:
        (ref,) = session.run(None, {"x": x})
        assert float(np.abs(y - ref).max()) <= ORT_TOL


def test_orientation_infer_equals_plain_session_run(orient: ModelFiles) -> None:
    rt = OrtRuntime(orient.model, OPTIONS)
    shape = (1, 3, 224, 224)
    rt.configure({"x": shape})
    x = np.random.default_rng(5).normal(0.0, 1.0, size=shape).astype(np.float32)
    y = np.zeros((1, 4), np.float32)
    rt.infer({"x": x}, {ORI_OUT: y})
    (ref,) = plain_session(orient.model).run(None, {"x": x})
    assert float(np.abs(y - ref).max()) <= ORT_TOL
    assert abs(float(y.sum()) - 1.0) < 1e-4  # softmax inside the model
    rt.close()


@pytest.mark.parametrize("cycle", [1, 3], ids=["same-buffers", "three-slots"])
def test_steady_state_infer_allocates_no_arrays(det_rt: OrtRuntime, cycle: int) -> None:
    """50 calls after warm-up: the Python heap's peak grows by under 8 KiB, where one output map of
    1x1x320x320 float32 would be 400 KiB (measured: about 0.5 KiB with one buffer set, 1-2 KiB cycling three).
    tracemalloc sees numpy's and Python's allocations, not ONNX Runtime's own C++ arena."""
    out_shape = det_rt.configure({"x": DET_SHAPE})[DET_OUT]
    slots = [({"x": inputs_like(DET_SHAPE, i)}, {DET_OUT: np.zeros(out_shape, np.float32)}) for i in range(cycle)]
    for i in range(5):
        det_rt.infer(*slots[i % cycle])
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for i in range(50):
            det_rt.infer(*slots[i % cycle])
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"cycle {cycle}: peak +{peak - base} B, current +{current - base} B")
    assert peak - base < 8 * 1024, f"peak grew by {peak - base} bytes over 50 inferences"
    assert current - base < 8 * 1024


# --- shape errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({"x": (1, 3, 320)}, r"3 axes given, the model has 4"),
        ({"x": (1, 4, 320, 320)}, r"does not fit the model's \[\?,3,\?,\?\] \(axis 1\)"),
        ({"x": (1, 3, 0, 320)}, r"axis 2"),
        ({"y": (1, 3, 32, 32)}, r"the model has no input 'y' \(inputs: x\)"),
        ({}, r"input 'x' of the model was not given a shape"),
        ({"x": (1, 3, 320, 321)}, r"the model refuses inputs"),  # not a multiple of 32: ONNX Runtime refuses it
    ],
    ids=["rank", "channels", "zero", "unknown-name", "missing", "refused-by-model"],
)
def test_configure_wrong_shape_is_one_shape_error(det_rt: OrtRuntime, shapes: dict, match: str) -> None:
    with pytest.raises(ShapeError, match=match) as e:
        det_rt.configure(shapes)
    one_line(e.value.message)
    assert e.value.exit_code == 43


def test_infer_wrong_arrays_are_shape_errors(det_rt: OrtRuntime) -> None:
    det_rt.configure({"x": (1, 3, 64, 64)})
    good_x = np.zeros((1, 3, 64, 64), np.float32)
    good_y = np.zeros((1, 1, 64, 64), np.float32)
    cases = [
        ({"x": np.zeros((1, 3, 64, 96), np.float32)}, {DET_OUT: good_y}, r"got float32\[1, 3, 64, 96\], configured"),
        ({"x": np.zeros((1, 3, 64, 64), np.float64)}, {DET_OUT: good_y}, r"got float64"),
        (
            {"x": good_x},
            {DET_OUT: np.zeros((1, 1, 32, 32), np.float32)},
            r"output 'sigmoid_0.tmp_0': got float32\[1, 1, 32, 32\], configured",
        ),
        ({"x": np.zeros((1, 3, 64, 128), np.float32)[..., ::2]}, {DET_OUT: good_y}, r"must be C-contiguous"),
    ]
    for inputs, outputs, match in cases:
        with pytest.raises(ShapeError, match=match) as e:
            det_rt.infer(inputs, outputs)
        one_line(e.value.message)
    det_rt.infer({"x": good_x}, {DET_OUT: good_y})  # still usable after refusals


def test_infer_before_configure(det: ModelFiles) -> None:
    rt = OrtRuntime(det.model, OPTIONS)
    with pytest.raises(InferenceError, match=r"configure\(\) the runtime before infer\(\)"):
        rt.infer({"x": np.zeros(DET_SHAPE, np.float32)}, {DET_OUT: np.zeros((1, 1, 320, 320), np.float32)})


# --- model errors ----------------------------------------------------------------------------------------------


def _corrupt(kind: str, model: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.onnx"
    data = model.read_bytes()
    content = {
        "truncated-half": data[: len(data) // 2],
        "truncated-header": data[:100],
        "random-bytes": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "text": b"this is not an ONNX model\n",
    }.get(kind)
    if content is not None:
        path.write_bytes(content)
    elif kind == "directory":
        path.mkdir()
    return path  # "missing": never created


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("truncated-half", r"onnxruntime cannot load the model: .*protobuf parsing failed"),
        ("truncated-header", r"onnxruntime cannot load the model"),
        ("random-bytes", r"onnxruntime cannot load the model"),
        ("empty", r"onnxruntime cannot load the model: .*No graph was found"),
        ("text", r"onnxruntime cannot load the model"),
        ("missing", r"cannot read the model: No such file or directory"),
        ("directory", r"cannot read the model: Is a directory"),
    ],
)
def test_corrupt_or_missing_model_is_one_model_error(det: ModelFiles, tmp_path: Path, kind: str, match: str) -> None:
    path = _corrupt(kind, det.model, tmp_path)
    with pytest.raises(ModelError, match=match) as e:
        OrtRuntime(path, OPTIONS)
    message = one_line(e.value.message)
    assert message.startswith(f"{path}: "), message  # names the file
    assert e.value.exit_code == 41


# --- providers and options -------------------------------------------------------------------------------------

_GPU_EPS = {"cuda", "tensorrt"} & set(available_providers())


@pytest.mark.parametrize(
    ("providers", "match"),
    [
        (("gpu",), r"unknown execution provider 'gpu' \(known: tensorrt, cuda, cpu\)"),
        (("cuda",), r"none of the execution providers cuda is available in onnxruntime .* \(available: .*cpu"),
        (("tensorrt", "cuda"), r"none of the execution providers tensorrt, cuda is available"),
    ],
    ids=["unknown", "cuda-only", "gpu-only"],
)
def test_unavailable_provider_is_runtime_unavailable(det: ModelFiles, providers: tuple, match: str) -> None:
    if set(providers) & _GPU_EPS:
        pytest.skip(f"this onnxruntime offers {sorted(_GPU_EPS)}: the request can be met here")
    with pytest.raises(RuntimeUnavailableError, match=match) as e:
        OrtRuntime(det.model, RuntimeOptions(providers=providers, threads=THREADS))
    one_line(e.value.message)
    assert e.value.exit_code == 44


def test_providers_are_tried_in_order(det: ModelFiles) -> None:
    """The default list (tensorrt, cuda, cpu) runs on the first one this onnxruntime offers."""
    rt = OrtRuntime(det.model, RuntimeOptions(threads=THREADS))
    first = next(p for p in ("tensorrt", "cuda", "cpu") if p in available_providers())
    assert rt.provider == first
    rt.close()


@pytest.mark.parametrize("spinning", [False, True])
def test_threads_spinning_and_extra_reach_the_session(det: ModelFiles, spinning: bool) -> None:
    options = RuntimeOptions(
        providers=("cpu",), threads=THREADS, spinning=spinning, extra={"session.disable_prepacking": "1"}
    )
    rt = OrtRuntime(det.model, options)
    so = rt._session.get_session_options()  # the options the session was created with
    want = "1" if spinning else "0"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == want
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == want
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
    assert so.intra_op_num_threads == THREADS
    assert so.inter_op_num_threads == 1
    rt.close()


def test_runtime_options_plain_data() -> None:
    options = RuntimeOptions(precision="fp16", cache_dir=Path("/data/engines"), extra={"k": "v"})
    assert options.build_fields() == {"precision": "fp16", "workspace_mib": 1024}
    d = json.loads(json.dumps(options.as_dict()))
    assert d["cache_dir"] == "/data/engines" and d["extra"] == {"k": "v"}
    assert d["providers"] == ["tensorrt", "cuda", "cpu"]
    assert RuntimeOptions().spinning is False and RuntimeOptions().threads == 0


# --- ModelPipeline: description lookup and checks --------------------------------------------------------------


def test_open_finds_the_description_beside_the_model(det: ModelFiles, tmp_path: Path) -> None:
    model = tmp_path / "detector.onnx"
    shutil.copyfile(det.model, model)
    shutil.copyfile(det.description, tmp_path / "detector.toml")
    pipe = ModelPipeline.open(model, options=OPTIONS, size=(64, 96))
    try:
        assert pipe.desc.source == str(tmp_path / "detector.toml")
        assert pipe.desc.name == "ppocr_det_v4"
        assert pipe.input_shape == (1, 3, 64, 96)
        assert pipe.output_shapes == {DET_OUT: (1, 1, 64, 96)}
        assert pipe.runtime_name == f"onnxruntime {ort.__version__}:CPUExecutionProvider"
        slot = pipe.new_slot()
        image = np.full((48, 80, 3), 255, np.uint8)
        pipe.preprocess(Frame(image, 7, 123, "here"), slot)
        slot.frame_index, slot.captured_ns, slot.origin = 7, 123, "here"
        pipe.infer(slot)
        result = pipe.postprocess(slot)
        assert (result.index, result.captured_ns, result.origin, result.kind) == (7, 123, "here", "text_detection")
        assert result.value == {"boxes": [], "truncated": False}  # a blank page has no text
    finally:
        pipe.close()


def test_open_uses_the_description_size_by_default(det: ModelFiles, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    os.symlink(det.model, model)
    (tmp_path / "m.toml").write_text(det.description.read_text().replace("[640, 640]", "[96, 128]"))
    pipe = ModelPipeline.open(model, options=OPTIONS)
    assert pipe.input_shape == (1, 3, 96, 128)
    pipe.close()


def test_open_without_a_description(det: ModelFiles, tmp_path: Path) -> None:
    model = tmp_path / "lonely.onnx"
    os.symlink(det.model, model)
    with pytest.raises(DescriptionError) as e:
        ModelPipeline.open(model, options=OPTIONS)
    expected = f"{tmp_path / 'lonely.toml'}: no model description (expected beside lonely.onnx)"
    assert one_line(e.value.message) == expected
    assert e.value.exit_code == 42


@pytest.mark.parametrize(
    ("which", "old", "new", "match"),
    [
        ("det", 'name = "x"', 'name = "image"', r"input 'image' is not an input of the model \(x\)"),
        (
            "det",
            'name = "sigmoid_0.tmp_0"',
            'name = "probs"',
            r"output 'probs' is not an output of the model \(sigmoid_0.tmp_0\)",
        ),
        ("ori", '["N", 3, 224, 224]', '["N", 3, 256, 256]', r"input 'x' axis 2 is 224 in the model, 256 described"),
        ("ori", 'dtype = "float32"', 'dtype = "uint8"', r"input 'x' is float32 in the model, uint8 described"),
    ],
    ids=["input-name", "output-name", "fixed-dim", "dtype"],
)
def test_wrong_description_is_one_description_error(
    det: ModelFiles, orient: ModelFiles, tmp_path: Path, which: str, old: str, new: str, match: str
) -> None:
    files = det if which == "det" else orient
    text = files.description.read_text()
    assert old in text
    path = tmp_path / "wrong.toml"
    path.write_text(text.replace(old, new))
    desc = load_description(files.model, path)  # valid on its own: only the model disagrees
    with pytest.raises(DescriptionError, match=match) as e:
        ModelPipeline.open(files.model, options=OPTIONS, desc=desc, size=(64, 64) if which == "det" else None)
    assert one_line(e.value.message).startswith(f"{path}: "), e.value.message  # names the description file
