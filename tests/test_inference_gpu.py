"""GPU runtimes on a real NVIDIA GPU: ONNX Runtime's CUDA and TensorRT EPs, and native TensorRT.

Marked `gpu` (skipped without `nvidia-smi`); each test also skips, saying why, when its runtime's
libraries are missing (onnxruntime-gpu, TensorRT, cuda-python). Every GPU result is compared with
ONNX Runtime's CPU EP on the same input.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from pitstop.inference.bench import PremadeSource, bench_pipeline, synthetic_images
from pitstop.inference.errors import RuntimeUnavailableError
from pitstop.inference.frames import Result
from pitstop.inference.loop import Loop
from pitstop.inference.model_desc import load_description
from pitstop.inference.pipeline import ModelPipeline
from pitstop.inference.runtime import RuntimeOptions
from pitstop.inference.test_models import TEXT_DETECTION, locate

pytestmark = pytest.mark.gpu

SIZE = (320, 320)
# GPU kernels (TF32 off, FP32 accumulate) against MLAS on the CPU: probabilities agree to ~1e-4.
FP32_TOL = 2e-3
FP16_TOL = 3e-2


def _det() -> tuple[Path, Path]:
    found = locate(TEXT_DETECTION)
    return found.model, found.description


def _open(options: RuntimeOptions) -> ModelPipeline:
    model, desc_path = _det()
    try:
        return ModelPipeline.open(model, options=options, desc=load_description(model, desc_path), size=SIZE)
    except RuntimeUnavailableError as e:
        pytest.skip(f"runtime not available here: {e.message}")


def _one_output(pipe: ModelPipeline, image: np.ndarray) -> np.ndarray:
    from pitstop.inference.frames import Frame

    slot = pipe.new_slot()
    pipe.preprocess(Frame(image, 0, 0), slot)
    pipe.infer(slot)
    (out,) = slot.outputs.values()
    return np.array(out, copy=True)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_images(*SIZE, n=1, seed=7)[0]


@pytest.fixture(scope="module")
def cpu_reference(image: np.ndarray) -> np.ndarray:
    pipe = _open(RuntimeOptions(backend="onnxruntime", providers=("cpu",), threads=4))
    try:
        return _one_output(pipe, image)
    finally:
        pipe.close()


def test_cuda_ep_matches_cpu(image: np.ndarray, cpu_reference: np.ndarray) -> None:
    pipe = _open(RuntimeOptions(backend="onnxruntime", providers=("cuda",)))
    try:
        assert "CUDAExecutionProvider" in pipe.runtime_name
        np.testing.assert_allclose(_one_output(pipe, image), cpu_reference, atol=FP32_TOL)
    finally:
        pipe.close()


def test_tensorrt_ep_matches_cpu_and_caches(tmp_path: Path, image: np.ndarray, cpu_reference: np.ndarray) -> None:
    options = RuntimeOptions(backend="onnxruntime", providers=("tensorrt",), cache_dir=tmp_path)
    pipe = _open(options)
    try:
        assert "TensorrtExecutionProvider" in pipe.runtime_name
        np.testing.assert_allclose(_one_output(pipe, image), cpu_reference, atol=FP32_TOL)
    finally:
        pipe.close()
    assert list(tmp_path.rglob("*.engine")), "the TensorRT EP wrote no engine cache"


def _trt_options(cache: Path, **kw: object) -> RuntimeOptions:
    return dataclasses.replace(RuntimeOptions(backend="tensorrt", cache_dir=cache), **kw)  # type: ignore[arg-type]


def test_tensorrt_build_hit_and_rebuild(tmp_path: Path, image: np.ndarray, cpu_reference: np.ndarray) -> None:
    first = _open(_trt_options(tmp_path))
    try:
        outcome = first.runtime.cache_outcome  # type: ignore[attr-defined]
        assert not outcome.hit and outcome.reason == "miss" and outcome.build_s > 0
        np.testing.assert_allclose(_one_output(first, image), cpu_reference, atol=FP32_TOL)
        engine_path = outcome.path
    finally:
        first.close()

    second = _open(_trt_options(tmp_path))
    try:
        assert second.runtime.cache_outcome.hit  # type: ignore[attr-defined]
        np.testing.assert_allclose(_one_output(second, image), cpu_reference, atol=FP32_TOL)
    finally:
        second.close()

    # A corrupt engine is detected by its hash and rebuilt, never handed to TensorRT.
    data = bytearray(engine_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine_path.write_bytes(bytes(data))
    third = _open(_trt_options(tmp_path))
    try:
        outcome = third.runtime.cache_outcome  # type: ignore[attr-defined]
        assert not outcome.hit and "do not match" in outcome.reason
        np.testing.assert_allclose(_one_output(third, image), cpu_reference, atol=FP32_TOL)
    finally:
        third.close()

    # Other build options are another engine (a miss), not a reuse of the fp32 one.
    engines_before = set((tmp_path / "engines").glob("*.engine"))
    other = _open(_trt_options(tmp_path, workspace_mib=512))
    try:
        assert other.runtime.cache_outcome.reason == "miss"  # type: ignore[attr-defined]
    finally:
        other.close()
    assert len(set((tmp_path / "engines").glob("*.engine")) - engines_before) == 1


def test_tensorrt_reduced_precision(tmp_path: Path, image: np.ndarray, cpu_reference: np.ndarray) -> None:
    from pitstop.inference.engine_build import supported_precisions

    try:
        precisions = supported_precisions()
    except RuntimeUnavailableError as e:
        pytest.skip(e.message)
    reduced = [p for p in ("fp16", "bf16") if p in precisions]
    if not reduced:
        pytest.skip("this TensorRT builds no reduced precision by flag (TensorRT 11: strongly typed only)")
    pipe = _open(_trt_options(tmp_path, precision=reduced[0]))
    try:
        np.testing.assert_allclose(_one_output(pipe, image), cpu_reference, atol=FP16_TOL)
    finally:
        pipe.close()


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_tensorrt_loop_equals_single_inference(tmp_path: Path, cuda_graph: bool) -> None:
    pipe = _open(_trt_options(tmp_path, cuda_graph=cuda_graph))
    images = synthetic_images(*SIZE, n=3, seed=1)
    try:
        expected = [_one_output(pipe, im) for im in images]
    finally:
        pipe.close()
    results: list[Result] = []

    class Keep:
        def write(self, r: Result) -> None:
            results.append(r)

        def close(self) -> None:
            pass

    pipe = _open(_trt_options(tmp_path, cuda_graph=cuda_graph))
    outputs: list[np.ndarray] = []
    original = pipe.postprocess

    def capture(slot):  # type: ignore[no-untyped-def]
        (out,) = slot.outputs.values()
        outputs.append(np.array(out, copy=True))
        return original(slot)

    pipe.postprocess = capture  # type: ignore[method-assign]
    figures = Loop(PremadeSource(images, 30), pipe, Keep(), slots=3).run()
    assert figures.frames_out == 30 and [r.index for r in results] == list(range(30))
    for i, out in enumerate(outputs):
        np.testing.assert_allclose(out, expected[i % 3], atol=1e-5)


def test_gpu_bench_runs(tmp_path: Path) -> None:
    pipe = _open(RuntimeOptions(backend="auto", providers=("cuda", "cpu"), cache_dir=tmp_path))
    try:
        report = bench_pipeline(pipe, frames=50, warmup=5)
    finally:
        pipe.close()
    assert report.raw_fps > 0 and report.loop_fps > 0 and report.loop.frames_out == 55


def test_engine_cache_dir_can_be_removed_and_rebuilt(tmp_path: Path) -> None:
    pipe = _open(_trt_options(tmp_path))
    pipe.close()
    shutil.rmtree(tmp_path / "engines")
    pipe = _open(_trt_options(tmp_path))
    try:
        assert pipe.runtime.cache_outcome.reason == "miss"  # type: ignore[attr-defined]
    finally:
        pipe.close()


def test_cuda_memory_round_trip_and_graph_replay() -> None:
    try:
        from pitstop.inference import cuda_mem

        info = cuda_mem.gpu_info(0)
    except RuntimeUnavailableError as e:
        pytest.skip(e.message)
    assert info.name and info.compute_capability[0].isdigit()
    shape = (2, 256, 256)
    host = cuda_mem.HostBuffer(shape, np.dtype(np.float32))
    back = cuda_mem.HostBuffer(shape, np.dtype(np.float32))
    dev = cuda_mem.DeviceBuffer(host.nbytes)
    stream = cuda_mem.Stream()
    graph = cuda_mem.Graph(stream)
    try:
        host.array[:] = np.arange(host.array.size, dtype=np.float32).reshape(shape)
        stream.h2d(dev, host.array)
        stream.d2h(back.array, dev)
        stream.synchronize()
        np.testing.assert_array_equal(back.array, host.array)
        graph.begin()
        stream.h2d(dev, host.array)
        stream.d2h(back.array, dev)
        graph.end()
        host.array *= -1  # the graph copies whatever the buffers hold at launch
        graph.launch()
        stream.synchronize()
        np.testing.assert_array_equal(back.array, host.array)
        with pytest.raises(cuda_mem.CudaError, match="cudaMalloc"):
            cuda_mem.DeviceBuffer(1 << 52)
    finally:
        graph.destroy()
        stream.destroy()
        for b in (host, back):
            b.free()
        dev.free()
