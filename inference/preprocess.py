"""Pre-processing: an RGB uint8 frame into a model's input tensor, with nothing allocated per frame.

A `Preprocessor` is planned once for one frame size and one input size: the resampling taps (source
indices and weights), the scratch buffers and the normalisation constants are all made at construction.
`run()` then writes a frame into one batch slot of a caller-owned input array using only `out=`
operations on those buffers, so the steady state allocates no array data (a handful of small view objects
per call, about 1.5 KiB by tracemalloc, no pixels). The weighted sums are matmuls, so they run in BLAS
(and its threads: OPENBLAS_NUM_THREADS bounds them).

Resampling is Pillow's BILINEAR (a triangle filter with pixel centres at half-integers, widened by the
scale factor when shrinking, so a downscale is antialiased instead of dropping rows), computed in float32
rather than Pillow's 8-bit fixed point: results agree with `PIL.Image.resize(..., BILINEAR)` to within one
grey level (tests/test_inference_prepost.py).

Geometry: `Preprocessor.geometry` says how input-tensor coordinates map back to the frame, for
post-processing (boxes into frame pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pitstop.inference.errors import DescriptionError, ShapeError
from pitstop.inference.model_desc import InputDesc

F32 = npt.NDArray[np.float32]
IntpArray = npt.NDArray[np.intp]

_INT_RANGES = {"uint8": (0.0, 255.0), "int32": (-(2.0**31), 2.0**31 - 1), "int64": (-(2.0**63), 2.0**63 - 1)}


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the model's input came from in the frame.

    The frame (`frame_hw`) is resized to `resized_hw`, then the `input_hw` window at `crop_yx` (top-left,
    in resized pixels) is cut out. Coordinates are pixel indices (pixel centres at integers, x right,
    y down); an input pixel (x, y) sits at frame position ((x + 0.5 + crop_x) / scale_x - 0.5, ...).
    """

    frame_hw: tuple[int, int]
    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_yx: tuple[int, int] = (0, 0)

    @property
    def scale_y(self) -> float:
        """Input pixels per frame pixel, vertically."""
        return self.resized_hw[0] / self.frame_hw[0]

    @property
    def scale_x(self) -> float:
        """Input pixels per frame pixel, horizontally."""
        return self.resized_hw[1] / self.frame_hw[1]

    def to_frame(self, xy: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map points (..., 2) as (x, y) in input pixels to frame pixels (a new float64 array)."""
        pts = np.array(xy, dtype=np.float64)
        if pts.shape[-1:] != (2,):
            raise ShapeError(f"points must have shape (..., 2), got {pts.shape}")
        pts[..., 0] = (pts[..., 0] + 0.5 + self.crop_yx[1]) / self.scale_x - 0.5
        pts[..., 1] = (pts[..., 1] + 0.5 + self.crop_yx[0]) / self.scale_y - 0.5
        return pts


def plan_geometry(desc: InputDesc, frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> Geometry:
    """The resize/crop for a frame of `frame_hw` into an input of `input_hw` under `desc.resize`.

    Raises ShapeError for an empty frame, DescriptionError when a short-side resize is too small for the crop.
    """
    fh, fw = frame_hw
    if fh <= 0 or fw <= 0:
        raise ShapeError(f"frame size {fh}x{fw}: height and width must be positive")
    h, w = input_hw
    if desc.resize == "stretch":
        return Geometry(frame_hw=(fh, fw), input_hw=(h, w), resized_hw=(h, w))
    # short_side_crop (PaddleClas ResizeImage + CropImage): the short side becomes resize_short, the long
    # side keeps the aspect ratio (Python's round, as PaddleClas), then a centre crop of the input size.
    percent = desc.resize_short / min(fh, fw)
    rh, rw = round(fh * percent), round(fw * percent)
    if rh < h or rw < w:
        raise DescriptionError(
            f"input {desc.name!r}: resize_short {desc.resize_short} makes a {fh}x{fw} frame {rh}x{rw}, "
            f"smaller than the {h}x{w} crop"
        )
    return Geometry(frame_hw=(fh, fw), input_hw=(h, w), resized_hw=(rh, rw), crop_yx=((rh - h) // 2, (rw - w) // 2))


def bilinear_taps(in_size: int, out_size: int, start: int, count: int) -> tuple[IntpArray, F32]:
    """Pillow's BILINEAR resampling of one axis, `in_size` -> `out_size`, outputs `start`..`start+count`.

    Returns (index, weight), both (K, count): output j = sum over k of weight[k, j] * input[index[k, j]].
    Taps with a zero weight are packed to the end and K is trimmed to the widest output: an identity
    axis has K = 1, a 2x enlargement K = 2, a 3x shrink K = 5.
    """
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = fscale  # the triangle filter's support (1.0) widened when shrinking
    ksize = math.ceil(support) * 2 + 1
    centre = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    # Pillow truncates toward zero ((int) in C), then clamps to the image.
    lo = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.intp)
    hi = np.minimum(np.trunc(centre + support + 0.5), in_size).astype(np.intp)
    k = np.arange(ksize, dtype=np.intp)[:, None]
    index = lo[None, :] + k
    valid = k < (hi - lo)[None, :]
    weight = np.clip(1.0 - np.abs((index - centre[None, :] + 0.5) / fscale), 0.0, None)
    weight[~valid] = 0.0
    total = weight.sum(axis=0)
    weight /= np.where(total == 0.0, 1.0, total)[None, :]
    index = np.where(valid, index, lo[None, :])
    # Pack non-zero taps first (stable), then drop the taps no output uses.
    order = np.argsort(weight == 0.0, axis=0, kind="stable")
    index = np.take_along_axis(index, order, axis=0)
    weight = np.take_along_axis(weight, order, axis=0)
    used = max(int((weight != 0.0).sum(axis=0).max()), 1)
    index = np.clip(index[:used], 0, in_size - 1)
    return np.ascontiguousarray(index, dtype=np.intp), np.ascontiguousarray(weight[:used], dtype=np.float32)


class _RowPass:
    """Resample along axis 0 of a uint8 (n_in, X) array: output row j = sum over k of w[k, j] * row idx[k, j].

    Rows are gathered as bytes into a (block, K, X) buffer, widened to float32 and weighed by a batched
    matmul (1 x K) @ (K x X). A broadcast multiply would not do: numpy 2.x takes an iterator buffer on
    every call when the broadcast rows are shorter than 4096 values; matmul takes none. Blocks of output
    rows bound the buffers to about 2.5 MiB.
    """

    BLOCK_VALUES = 1 << 19  # gathered values per block

    def __init__(self, index: IntpArray, weight: F32, width: int) -> None:
        taps, count = index.shape
        self.out = np.empty((count, width), np.float32)
        block = max(1, min(count, self.BLOCK_VALUES // (taps * width)))
        gather = np.empty((block, taps, width), np.float32)
        gather_u8 = np.empty((block, taps, width), np.uint8)
        idx = np.ascontiguousarray(index.T)  # (count, K)
        wgt = np.ascontiguousarray(weight.T).reshape(count, 1, taps)
        # Every view the loop uses, made once.
        self.blocks: list[tuple[IntpArray, F32, F32, npt.NDArray[np.uint8], F32]] = []
        for j0 in range(0, count, block):
            n = min(block, count - j0)
            self.blocks.append(
                (
                    np.ascontiguousarray(idx[j0 : j0 + n]),
                    wgt[j0 : j0 + n],
                    gather[:n],
                    gather_u8[:n],
                    self.out[j0 : j0 + n].reshape(n, 1, width),
                )
            )

    def run(self, src: npt.NDArray[np.uint8]) -> None:
        for idx, wgt, gather, gather_u8, out in self.blocks:
            np.take(src, idx, axis=0, out=gather_u8, mode="clip")
            np.copyto(gather, gather_u8)
            np.matmul(wgt, gather, out=out)


class _ColumnPass:
    """Resample the pixels of each row of a float32 (H, W_in * 3) array with interleaved RGB.

    Output pixels are taken BLOCK at a time: each block is one matmul of the band of input columns it
    reads (H x 3n) with that band of the resampling matrix, expanded to interleaved channels (3n x 3B,
    a Kronecker product with the 3x3 identity). Two thirds of those products are zeros, yet one BLAS call
    per block beats gathering and weighing pixels one tap at a time by a wide margin.
    """

    BLOCK = 8  # output pixels per matmul

    def __init__(self, src: F32, index: IntpArray, weight: F32, in_width: int) -> None:
        taps, count = index.shape
        self.out = np.empty((src.shape[0], count * 3), np.float32)
        dense = np.zeros((in_width, count), np.float64)
        cols = np.arange(count)
        for k in range(taps):
            np.add.at(dense, (index[k], cols), weight[k])
        eye = np.eye(3)
        self.blocks: list[tuple[F32, F32, F32]] = []
        for j0 in range(0, count, self.BLOCK):
            j1 = min(count, j0 + self.BLOCK)
            used = np.nonzero(dense[:, j0:j1].any(axis=1))[0]
            lo, hi = int(used.min()), int(used.max()) + 1
            band = np.kron(dense[lo:hi, j0:j1], eye).astype(np.float32)
            self.blocks.append((src[:, lo * 3 : hi * 3], band, self.out[:, j0 * 3 : j1 * 3]))

    def run(self) -> None:
        for src, band, out in self.blocks:
            np.matmul(src, band, out=out)


class Preprocessor:
    """Frames of one size into one model input: resize, colour order, scale/mean/std, layout.

    `run(image, out, slot)` writes the frame into `out[slot]`; `out` is the whole input array, shape
    `input_shape` and dtype `desc.dtype`, owned by the caller (pinned host memory, an IOBinding buffer...).
    A frame of another size raises ShapeError: the plan (taps, buffers, geometry handed to post-processing)
    belongs to one frame size, and re-planning silently would allocate inside the loop and change the
    geometry under results already queued. Build a new one (`for_frame`) when a source changes size.

    One thread at a time per instance: the scratch buffers are shared between calls.
    """

    def __init__(
        self, desc: InputDesc, frame_hw: tuple[int, int], batch: int = 1, size: tuple[int, int] | None = None
    ) -> None:
        """`size`: the (H, W) of a dynamic input (default: the description's `size`).

        Raises DescriptionError (the description cannot give that shape) or ShapeError (empty frame).
        """
        self.desc = desc
        self.batch = batch
        self.input_shape = desc.concrete_shape(batch, size)
        self.dtype = np.dtype(desc.dtype)
        nchw = desc.layout == "NCHW"
        h, w = (self.input_shape[2], self.input_shape[3]) if nchw else (self.input_shape[1], self.input_shape[2])
        self.geometry = plan_geometry(desc, (int(frame_hw[0]), int(frame_hw[1])), (h, w))
        geo = self.geometry
        fh, fw = geo.frame_hw
        self._frame_shape = (fh, fw, 3)

        # The part of the frame that is read, and the passes that resample it.
        iy, wy = bilinear_taps(fh, geo.resized_hw[0], geo.crop_yx[0], h)
        ix, wx = bilinear_taps(fw, geo.resized_hw[1], geo.crop_yx[1], w)
        y0, y1 = int(iy.min()), int(iy.max()) + 1
        x0, x1 = int(ix.min()), int(ix.max()) + 1
        self._window = (slice(y0, y1), slice(x0, x1))
        sh, sw = y1 - y0, x1 - x0
        resample_rows = geo.resized_hw[0] != fh  # otherwise the window already is the crop
        resample_cols = geo.resized_hw[1] != fw
        self._rows = _RowPass(iy - y0, wy, sw * 3) if resample_rows else None
        # Rows only cropped but columns resampled: the column pass reads a float32 copy of the window.
        self._rows_f32: F32 | None = None
        if self._rows is None and resample_cols:
            self._rows_f32 = np.empty((sh, sw * 3), np.float32)
        rows_out = self._rows.out if self._rows is not None else self._rows_f32
        self._cols = _ColumnPass(rows_out, ix - x0, wx, sw) if resample_cols and rows_out is not None else None

        # The picture before normalisation, as an (h, w, 3) RGB view; None: the window itself (fast path).
        hwc: F32 | None = None
        if self._cols is not None:
            hwc = self._cols.out.reshape(h, w, 3)
        elif self._rows is not None:
            hwc = self._rows.out.reshape(h, w, 3)
        self._chw = None if hwc is None else self._channel_first(hwc)

        # Normalisation per model channel c: value = pixel * scale / std[c] - mean[c] / std[c], computed
        # channel-first (a (3, 1, 1) broadcast costs numpy no buffer; a (3,) one along the last axis does).
        self._a = np.array([desc.scale / s for s in desc.std], dtype=np.float32).reshape(3, 1, 1)
        self._b = np.array([-m / s for m, s in zip(desc.mean, desc.std, strict=True)], dtype=np.float32).reshape(
            3, 1, 1
        )
        # Channel-first float32 work area, unless the output itself is one (NCHW float32).
        direct = nchw and self.dtype == np.float32
        self._work: F32 | None = None if direct else np.empty((3, h, w), np.float32)
        self._int_range = _INT_RANGES.get(desc.dtype)
        # A window narrower than the frame is not contiguous: gather it into one buffer made now, so
        # the row pass's reshape never copies per frame.
        self._window_buf = np.empty((y1 - y0, x1 - x0, 3), np.uint8) if (x1 - x0) != fw else None

    def _channel_first(self, hwc: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """An (h, w, 3) RGB view as a (3, h, w) view in the model's colour order."""
        return (hwc if self.desc.color == "RGB" else hwc[:, :, ::-1]).transpose(2, 0, 1)

    def for_frame(self, frame_hw: tuple[int, int]) -> Preprocessor:
        """A new plan for frames of another size: same description, batch and input size."""
        return Preprocessor(self.desc, frame_hw, self.batch, self.geometry.input_hw)

    def new_input(self) -> npt.NDArray[Any]:
        """A zeroed input array of the right shape and dtype (allocate once, reuse for every frame)."""
        return np.zeros(self.input_shape, self.dtype)

    def run(self, image: npt.NDArray[np.uint8], out: npt.NDArray[Any], slot: int = 0) -> None:
        """Write `image` (H x W x 3 RGB uint8, the planned size) into `out[slot]`. Raises ShapeError."""
        if image.shape != self._frame_shape or image.dtype != np.uint8:
            raise ShapeError(
                f"frame is {'x'.join(map(str, image.shape))} {image.dtype}; this preprocessor was planned for "
                f"{self._frame_shape[0]}x{self._frame_shape[1]}x3 uint8 (build a new one for another size)"
            )
        if out.shape != self.input_shape or out.dtype != self.dtype:
            raise ShapeError(
                f"input array is {out.shape} {out.dtype}; expected {self.input_shape} {self.dtype} "
                f"for {self.desc.name!r}"
            )
        if not 0 <= slot < self.batch:
            raise ShapeError(f"slot {slot} is outside the batch of {self.batch}")
        dst = out[slot]
        work = dst if self._work is None else self._work
        window = image[self._window]
        if self._window_buf is not None:
            np.copyto(self._window_buf, window)
            window = self._window_buf
        if self._rows is not None:
            self._rows.run(window.reshape(window.shape[0], -1))
        elif self._rows_f32 is not None:
            np.copyto(self._rows_f32.reshape(window.shape), window)
        if self._cols is not None:
            self._cols.run()
        if self._chw is None:
            np.copyto(work, self._channel_first(window))  # uint8 -> float32 (a mixed-type multiply buffers)
            np.multiply(work, self._a, out=work)
        else:
            np.multiply(self._chw, self._a, out=work)
        np.add(work, self._b, out=work)
        if self._work is None:
            return
        if self._int_range is not None:
            np.rint(work, out=work)
            np.clip(work, self._int_range[0], self._int_range[1], out=work)
        np.copyto(dst, work if self.desc.layout == "NCHW" else work.transpose(1, 2, 0), casting="unsafe")
