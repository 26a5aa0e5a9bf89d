"""`pitstop inference run|bench|build|providers` (inference/cli.py) on the real text-detection model, CPU only.

Most commands run as real processes (the installed `pitstop` script); the table of refusals also runs
in-process through `pitstop.cli.main` (faster, same code), checking that each is one line on stderr with its
own exit code and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitstop.cli import main
from pitstop.inference.ort_runtime import available_providers
from pitstop.inference.test_models import TEXT_DETECTION, locate

_SCRIPT = Path(sys.executable).with_name("pitstop")
PITSTOP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pitstop.cli"]
CPU = ["--threads", "2"]


@pytest.fixture(autouse=True)
def _restore_switch_interval() -> Iterator[None]:
    """In-process runs start loops, which set the process-wide GIL switch interval."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """det.onnx + det.toml side by side, and broken neighbours."""
    d = tmp_path_factory.mktemp("cli")
    found = locate(TEXT_DETECTION)
    shutil.copyfile(found.model, d / "det.onnx")
    text = found.description.read_text()
    (d / "det.toml").write_text(text)
    (d / "corrupt.onnx").write_bytes(found.model.read_bytes()[:4096])  # truncated
    (d / "corrupt.toml").write_text(text)
    os.symlink(d / "det.onnx", d / "nodesc.onnx")  # no nodesc.toml
    os.symlink(d / "det.onnx", d / "wrongdesc.onnx")
    (d / "wrongdesc.toml").write_text(text.replace('name = "sigmoid_0.tmp_0"', 'name = "probs"'))
    (d / "cache").mkdir()
    return d


def pitstop(work: Path, *args: str, timeout: float = 60, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run(
        [*PITSTOP, "inference", *args],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check is not None:
        assert res.returncode == check, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    return res


def in_process(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`pitstop inference ARGS` through main(): (exit code, stdout, stderr), file-descriptor level."""
    try:
        rc = main(["inference", *args])
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    out, err = capfd.readouterr()
    return rc, out, err


# --- providers, build ------------------------------------------------------------------------------------------


def test_providers_lists_cpu(work: Path) -> None:
    res = pitstop(work, "providers")
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["onnxruntime", *", ".join(available_providers()).split()]
    assert "cpu" in lines[0]
    assert lines[1].startswith("tensorrt")
    info = json.loads(pitstop(work, "providers", "--json").stdout)
    assert "cpu" in info["onnxruntime"]
    assert "version" in info["tensorrt"] or "unavailable" in info["tensorrt"]


def test_build_with_onnxruntime_names_the_runtime(work: Path) -> None:
    res = pitstop(work, "build", "det.onnx", "--runtime", "onnxruntime", "--providers", "cpu", "--json", *CPU)
    info = json.loads(res.stdout)
    assert info == {"model": "det.onnx", "runtime": info["runtime"]}  # no engine: ONNX Runtime's CPU EP
    assert info["runtime"].endswith(":CPUExecutionProvider")


# --- run -------------------------------------------------------------------------------------------------------


def test_run_writes_one_json_line_per_frame_and_prints_figures(work: Path) -> None:
    out = work / "run.jsonl"
    res = pitstop(
        work, "run", "det.onnx", "--source", "synthetic:", "--source-opt", "width=200", "--source-opt", "height=150",
        "--frames", "6", "--sink", f"jsonl:{out}", "--size", "96x96", "--cache-dir", "cache", *CPU,
    )  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    for r in records:
        assert r["kind"] == "text_detection" and r["origin"] == "synthetic:"
        assert set(r) == {"index", "captured_ns", "origin", "kind", "boxes", "truncated"}
    assert res.stdout == ""
    err = res.stderr
    assert re.search(r"^runtime +onnxruntime .*:CPUExecutionProvider$", err, re.M), err
    assert "frames       6 delivered, 6 read, 0 dropped" in err
    assert re.search(r"^throughput +[0-9.]+ frames/s", err, re.M)
    for stage in ("source", "preprocess", "infer", "postprocess", "sink", "end_to_end"):
        assert re.search(rf"^{stage} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$", err, re.M), stage
    assert "queue frames depth mean" in err


def test_run_stdout_sink_and_json_figures(work: Path) -> None:
    res = pitstop(work, "run", "det.onnx", "--frames", "3", "--sink", "-", "--size", "64x64", "--json", *CPU)
    assert [json.loads(line)["index"] for line in res.stdout.splitlines()] == [0, 1, 2]
    figures = json.loads(res.stderr)
    assert (figures["frames_in"], figures["frames_out"], figures["drops"], figures["error"]) == (3, 3, 0, None)
    assert figures["stages"]["infer"]["count"] == 3


def test_run_live_source_for_seconds_drops_and_counts(work: Path) -> None:
    out = work / "live.jsonl"
    res = pitstop(
        work, "run", "det.onnx", "--source-opt", "fps=400", "--source-opt", "width=160", "--source-opt", "height=120",
        "--seconds", "1", "--sink", f"jsonl:{out}", "--size", "320x320", "--json", *CPU,
    )  # fmt: skip
    figures = json.loads(res.stderr)
    assert figures["drops"] > 0
    assert figures["frames_out"] == len(out.read_text().splitlines()) > 0
    assert figures["frames_out"] + figures["drops"] <= figures["frames_in"]


def test_run_stops_on_sigterm_and_prints_figures(work: Path) -> None:
    out = work / "term.jsonl"
    proc = subprocess.Popen(
        [*PITSTOP, "inference", "run", "det.onnx", "--source-opt", "fps=50", "--sink", f"jsonl:{out}",
         "--size", "64x64", *CPU],
        cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and len(out.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    m = re.search(r"^frames +(\d+) delivered", err, re.M)
    assert m and int(m.group(1)) >= 3, err


def test_run_loop_failure_reports_the_stage_and_exits_48(work: Path, tmp_path: Path) -> None:
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (64, 48), "white").save(frames / "00.png")
    (frames / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    res = pitstop(work, "run", "det.onnx", "--source", str(frames), "--size", "64x64", "--sink", "-", *CPU, check=48)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pitstop: error: det: source stage failed: {frames / '01.png'}: cannot decode image"), last
    assert re.search(r"^error +det: source stage failed", res.stderr, re.M)  # in the figures too


# --- bench -----------------------------------------------------------------------------------------------------


def test_bench_prints_raw_loop_and_ratio(work: Path) -> None:
    res = pitstop(work, "bench", "det.onnx", "--frames", "20", "--warmup", "2", "--size", "96x96", *CPU)
    out = res.stdout
    raw = re.search(r"^raw +([0-9.]+) inferences/s \(p50 ([0-9.]+) ms, p99 ([0-9.]+) ms\)$", out, re.M)
    loop = re.search(r"^loop +([0-9.]+) frames/s$", out, re.M)
    ratio = re.search(r"^loop / raw +([0-9.]+)$", out, re.M)
    assert raw and loop and ratio, out
    assert float(raw.group(1)) > 0 and float(loop.group(1)) > 0
    assert float(ratio.group(1)) == pytest.approx(float(loop.group(1)) / float(raw.group(1)), abs=2e-3)
    assert "model        det.onnx  input [1, 3, 96, 96]" in out
    assert "22 delivered, 22 read, 0 dropped" in out  # the loop runs the warm-up frames too


def test_bench_json(work: Path) -> None:
    res = pitstop(work, "bench", "det.onnx", "--frames", "20", "--warmup", "2", "--size", "96x96", "--json", *CPU)
    report = json.loads(res.stdout)
    assert report["input_shape"] == [1, 3, 96, 96] and report["frames"] == 20
    assert report["raw_fps"] > 0 and report["loop_fps"] > 0
    assert report["ratio"] == pytest.approx(report["loop_fps"] / report["raw_fps"])
    assert report["raw_latency"]["count"] == 20
    assert report["loop"]["frames_out"] == 22 and report["loop"]["throughput_fps"] == report["loop_fps"]
    assert report["runtime"].endswith(":CPUExecutionProvider")


# --- refusals --------------------------------------------------------------------------------------------------

_HAS_TENSORRT = False
try:
    import tensorrt  # noqa: F401

    _HAS_TENSORRT = True
except ImportError:
    pass

REFUSALS = [
    # (id, args, exit code, stderr pattern)
    ("missing-model", ["run", "missing.onnx"], 2, r"^pitstop: error: missing.onnx: no such model file$"),
    ("missing-model-bench", ["bench", "missing.onnx"], 2, r"no such model file$"),
    ("missing-model-build", ["build", "missing.onnx"], 2, r"no such model file$"),
    (
        "corrupt-model",
        ["run", "corrupt.onnx"],
        41,
        r"^pitstop: error: corrupt.onnx: onnxruntime cannot load the model: .*protobuf parsing failed\.$",
    ),
    (
        "missing-description",
        ["run", "nodesc.onnx"],
        42,
        r"^pitstop: error: nodesc.toml: no model description \(expected beside nodesc.onnx\)$",
    ),
    (
        "wrong-description",
        ["run", "wrongdesc.onnx"],
        42,
        r"^pitstop: error: wrongdesc.toml: output 'probs' is not an output of the model \(sigmoid_0.tmp_0\)$",
    ),
    ("size-not-hxw", ["run", "det.onnx", "--size", "320"], 2, r"argument --size: '320': use HEIGHTxWIDTH"),
    ("size-zero", ["bench", "det.onnx", "--size", "0x320"], 2, r"argument --size: '0x320': use HEIGHTxWIDTH"),
    ("size-off-multiple", ["run", "det.onnx", "--size", "33x320"], 42, r"height 33 must be a positive multiple of 32$"),
    (
        "providers-unknown",
        ["run", "det.onnx", "--providers", "gpu"],
        2,
        r"^pitstop: error: --providers: gpu: use some of tensorrt, cuda, cpu$",
    ),
    ("providers-empty", ["bench", "det.onnx", "--providers", ","], 2, r"--providers: empty"),
    ("runtime-unknown", ["run", "det.onnx", "--runtime", "openvino"], 2, r"argument --runtime: invalid choice"),
    ("bench-one-frame", ["bench", "det.onnx", "--frames", "1"], 2, r"^pitstop: error: --frames: at least 2$"),
    ("source-unknown", ["run", "det.onnx", "--source", "nowhere"], 46, r"^pitstop: error: nowhere: no such file"),
    ("source-option", ["run", "det.onnx", "--source-opt", "width=wide"], 46, r"option 'width' wants int"),
    ("source-option-form", ["run", "det.onnx", "--source-opt", "width"], 2, r"--source-opt 'width': use KEY=VALUE"),
    ("sink-unknown", ["run", "det.onnx", "--sink", "ftp://x/y"], 47, r"^pitstop: error: ftp://x/y: unknown sink"),
]
GPU_REFUSALS = [
    ("cuda-only", ["run", "det.onnx", "--providers", "cuda"], 44, r"none of the execution providers cuda is available"),
    (
        "tensorrt-runtime",
        ["run", "det.onnx", "--runtime", "tensorrt"],
        44,
        r"^pitstop: error: TensorRT is not installed",
    ),
]


def _skip_if_gpu_capable(case: str) -> None:
    if case == "cuda-only" and "cuda" in available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    if case == "tensorrt-runtime" and _HAS_TENSORRT:
        pytest.skip("TensorRT is installed")


ALL_REFUSALS = [pytest.param(*r, id=r[0]) for r in REFUSALS + GPU_REFUSALS]


@pytest.mark.parametrize(("case", "args", "code", "pattern"), ALL_REFUSALS)
def test_refusal_is_one_line_with_its_exit_code(
    work: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    case: str, args: list[str], code: int, pattern: str,
) -> None:  # fmt: skip
    _skip_if_gpu_capable(case)
    monkeypatch.chdir(work)
    rc, out, err = in_process(capfd, *args, *CPU, "--cache-dir", "cache")
    lines = err.strip().splitlines()
    assert rc == code, f"{case}: exit {rc}, stderr {err!r}"
    assert len(lines) == 1, f"{case}: {err!r}"
    assert re.search(pattern, lines[0]), f"{case}: {lines[0]!r}"
    assert out == ""


@pytest.mark.parametrize("case", ["missing-model", "corrupt-model", "missing-description", "tensorrt-runtime"])
def test_refusal_from_the_installed_script(work: Path, case: str) -> None:
    """The same refusals from a real process: one line, the exit code, no traceback, nothing on stdout."""
    _skip_if_gpu_capable(case)
    _, args, code, pattern = next(r for r in REFUSALS + GPU_REFUSALS if r[0] == case)
    res = pitstop(work, *args, *CPU, "--cache-dir", "cache", check=code)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), res.stderr
    assert res.stdout == ""
