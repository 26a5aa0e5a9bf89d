"""The model description: a TOML file beside each model saying how to feed it and read its answer.

`model.onnx` is described by `model.toml` in the same directory. The daemon runs a model it has never
seen from these two files alone. Format: docs/model-description.md.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitstop.inference.errors import DescriptionError

DTYPES = ("float32", "float16", "uint8", "int32", "int64")
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR")
RESIZES = ("stretch", "short_side_crop")
POSTPROCESS_KINDS = ("raw", "text_detection", "orientation")

Dim = int | str  # a fixed size, or the name of a dynamic axis ("N", "H", "W")


@dataclass(frozen=True, slots=True)
class InputDesc:
    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    layout: str = "NCHW"
    color: str = "RGB"
    # pixel -> (pixel * scale - mean[c]) / std[c]
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: str = "stretch"
    resize_short: int = 0  # short_side_crop: the short side before the centre crop
    size: tuple[int, int] | None = None  # (H, W) for dynamic spatial axes; None: the shape's fixed H, W
    multiple_of: int = 1  # dynamic H and W must be multiples of this (32 for PP-OCR detection)
    # Optimization profile for dynamic axes (TensorRT): min/opt/max of (H, W) and of the batch.
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    max_batch: int = 1

    @property
    def channels_axis(self) -> int:
        return 1 if self.layout == "NCHW" else 3

    def spatial(self) -> tuple[Dim, Dim]:
        if self.layout == "NCHW":
            return self.shape[2], self.shape[3]
        return self.shape[1], self.shape[2]

    def concrete_shape(self, batch: int = 1, size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """The shape this input takes for `batch` frames at (H, W) `size` (default: the description's)."""
        h_dim, w_dim = self.spatial()
        want = size or self.size
        if isinstance(h_dim, int) and isinstance(w_dim, int):
            h, w = h_dim, w_dim
            if want is not None and want != (h, w):
                raise DescriptionError(f"input {self.name!r} is fixed at {h}x{w}; {want[0]}x{want[1]} was asked")
        else:
            if want is None:
                raise DescriptionError(f"input {self.name!r} has dynamic height/width: the description needs `size`")
            h, w = want
            for label, v in (("height", h), ("width", w)):
                if v <= 0 or v % self.multiple_of:
                    raise DescriptionError(
                        f"input {self.name!r}: {label} {v} must be a positive multiple of {self.multiple_of}"
                    )
        n_dim = self.shape[0]
        if isinstance(n_dim, int) and n_dim != batch:
            raise DescriptionError(f"input {self.name!r} has a fixed batch of {n_dim}; {batch} was asked")
        if self.layout == "NCHW":
            return (batch, 3, h, w)
        return (batch, h, w, 3)


@dataclass(frozen=True, slots=True)
class OutputDesc:
    name: str


@dataclass(frozen=True, slots=True)
class PostprocessDesc:
    kind: str = "raw"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelDescription:
    name: str
    inputs: tuple[InputDesc, ...]
    outputs: tuple[OutputDesc, ...]
    postprocess: PostprocessDesc
    source: str = ""  # the file it was read from, for messages

    @property
    def image_input(self) -> InputDesc:
        return self.inputs[0]


def description_path(model: Path) -> Path:
    return model.with_suffix(".toml")


# What `pitstop install` writes beside a model payload (ota/manifest.py MODEL_DESCRIPTION_FILE): the bundle's
# description of the model, as JSON, next to the model file.
PAYLOAD_DESCRIPTION = "model.json"


def load_description(model: Path, path: Path | None = None) -> ModelDescription:
    """Read and validate the description of `model`: `path`, else `model` with suffix `.toml`, else, for a
    model installed from a bundle's model payload, the description its `model.json` carries."""
    if path is None and not description_path(model).exists():
        from_payload = _payload_description(model)
        if from_payload is not None:
            return from_payload
    path = path or description_path(model)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DescriptionError(f"{path}: no model description (expected beside {model.name})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DescriptionError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise DescriptionError(f"{path}: not valid TOML: {e}") from None
    return parse_description(raw, source=str(path))


def _payload_description(model: Path) -> ModelDescription | None:
    path = model.with_name(PAYLOAD_DESCRIPTION)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DescriptionError(f"{path}: cannot read: {e}") from None
    if not isinstance(doc, dict) or doc.get("file") != model.name:
        return None  # it describes another file of the directory
    desc = doc.get("description")
    if not isinstance(desc, dict) or not desc:
        raise DescriptionError(
            f"{path}: the bundle gave model {model.name} no description (its payload's "
            "`description` or `description_file`)"
        )
    return parse_description(desc, source=f"{path} (description)")


def parse_description(raw: dict[str, Any], *, source: str = "<description>") -> ModelDescription:
    r = _Reader(source)
    r.only(raw, "", {"name", "inputs", "outputs", "postprocess"})
    name = r.get(raw, "name", str, default="model")
    inputs_raw = r.get(raw, "inputs", list)
    if len(inputs_raw) != 1:
        raise DescriptionError(f"{source}: inputs: exactly one image input is supported, found {len(inputs_raw)}")
    inputs = tuple(_input(r, f"inputs[{i}]", item) for i, item in enumerate(inputs_raw))
    outputs_raw = r.get(raw, "outputs", list)
    if not outputs_raw:
        raise DescriptionError(f"{source}: outputs: at least one output is required")
    outputs = []
    for i, item in enumerate(outputs_raw):
        where = f"outputs[{i}]"
        r.table(item, where)
        r.only(item, where, {"name"})
        outputs.append(OutputDesc(name=r.get(item, "name", str, where=where)))
    post_raw = r.get(raw, "postprocess", dict, default={"kind": "raw"})
    kind = r.choice(post_raw, "kind", POSTPROCESS_KINDS, where="postprocess", default="raw")
    params = {k: v for k, v in post_raw.items() if k != "kind"}
    _check_post_params(r, kind, params)
    return ModelDescription(
        name=name,
        inputs=inputs,
        outputs=tuple(outputs),
        postprocess=PostprocessDesc(kind=kind, params=params),
        source=source,
    )


# Allowed postprocess parameters per kind, with their types; defaults live in postprocess.py.
_POST_PARAMS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "raw": {},
    "text_detection": {
        "threshold": (int, float),
        "box_threshold": (int, float),
        "unclip_ratio": (int, float),
        "min_size": int,
        "max_boxes": int,
    },
    "orientation": {"labels": list},
}


def _check_post_params(r: _Reader, kind: str, params: dict[str, Any]) -> None:
    allowed = _POST_PARAMS[kind]
    r.only(params, "postprocess", set(allowed))
    for key, typ in allowed.items():
        if key in params:
            r.get(params, key, typ, where="postprocess")
    if kind == "orientation" and "labels" in params:
        labels = params["labels"]
        if not labels or not all(isinstance(x, (int, str)) for x in labels):
            raise DescriptionError(f"{r.source}: postprocess.labels: a non-empty list of strings or integers")


def _input(r: _Reader, where: str, item: Any) -> InputDesc:
    r.table(item, where)
    r.only(
        item,
        where,
        {
            "name", "shape", "dtype", "layout", "color", "scale", "mean", "std", "resize", "resize_short",
            "size", "multiple_of", "min_size", "max_size", "max_batch",
        },
    )  # fmt: skip
    shape_raw = r.get(item, "shape", list, where=where)
    shape: list[Dim] = []
    for d in shape_raw:
        if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d <= 0):
            raise DescriptionError(f"{r.source}: {where}.shape: {d!r} is neither a positive size nor an axis name")
        shape.append(d)
    if len(shape) != 4:
        raise DescriptionError(f"{r.source}: {where}.shape: an image input has 4 axes, found {len(shape)}")
    layout = r.choice(item, "layout", LAYOUTS, where=where, default="NCHW")
    channels = shape[1] if layout == "NCHW" else shape[3]
    if channels != 3:
        raise DescriptionError(f"{r.source}: {where}.shape: the channel axis of a {layout} image must be 3")
    desc = InputDesc(
        name=r.get(item, "name", str, where=where),
        shape=tuple(shape),
        dtype=r.choice(item, "dtype", DTYPES, where=where, default="float32"),
        layout=layout,
        color=r.choice(item, "color", COLORS, where=where, default="RGB"),
        scale=float(r.get(item, "scale", (int, float), where=where, default=1.0 / 255.0)),
        mean=r.triple(item, "mean", where, (0.0, 0.0, 0.0)),
        std=r.triple(item, "std", where, (1.0, 1.0, 1.0)),
        resize=r.choice(item, "resize", RESIZES, where=where, default="stretch"),
        resize_short=r.get(item, "resize_short", int, where=where, default=0),
        size=r.pair(item, "size", where),
        multiple_of=r.get(item, "multiple_of", int, where=where, default=1),
        min_size=r.pair(item, "min_size", where),
        max_size=r.pair(item, "max_size", where),
        max_batch=r.get(item, "max_batch", int, where=where, default=1),
    )
    if any(s == 0 or not math.isfinite(s) for s in desc.std):
        raise DescriptionError(f"{r.source}: {where}.std: every value must be finite and non-zero")
    if desc.multiple_of < 1 or desc.max_batch < 1:
        raise DescriptionError(f"{r.source}: {where}: multiple_of and max_batch must be at least 1")
    if desc.resize == "short_side_crop" and desc.resize_short <= 0:
        raise DescriptionError(f"{r.source}: {where}.resize_short: required (> 0) with resize = 'short_side_crop'")
    try:
        concrete = desc.concrete_shape(1)  # dynamic axes without a size, sizes off the multiple: refuse now
    except DescriptionError as e:
        raise DescriptionError(f"{r.source}: {where}.size: {e.message}") from None
    if not math.isfinite(desc.scale) or desc.scale == 0 or not all(math.isfinite(m) for m in desc.mean):
        raise DescriptionError(f"{r.source}: {where}: scale must be finite and non-zero, mean finite")
    h, w = (concrete[2], concrete[3]) if desc.layout == "NCHW" else (concrete[1], concrete[2])
    if desc.resize == "short_side_crop" and desc.resize_short < max(h, w):
        raise DescriptionError(
            f"{r.source}: {where}.resize_short: {desc.resize_short} is smaller than the {h}x{w} centre crop"
        )
    for key, bound, inside in (
        ("min_size", desc.min_size, desc.min_size is not None and desc.min_size[0] <= h and desc.min_size[1] <= w),
        ("max_size", desc.max_size, desc.max_size is not None and desc.max_size[0] >= h and desc.max_size[1] >= w),
    ):
        if bound is None:
            continue
        if bound[0] % desc.multiple_of or bound[1] % desc.multiple_of:
            raise DescriptionError(f"{r.source}: {where}.{key}: must be multiples of {desc.multiple_of}")
        if not inside:
            raise DescriptionError(f"{r.source}: {where}.{key}: {list(bound)} does not contain the size {h}x{w}")
    n_dim = desc.shape[0]
    if isinstance(n_dim, int) and desc.max_batch not in (1, n_dim):
        raise DescriptionError(f"{r.source}: {where}.max_batch: the batch axis is fixed at {n_dim}")
    return desc


class _Reader:
    """Typed access to a parsed TOML table; every error names the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def _key(self, where: str, key: str) -> str:
        return f"{where}.{key}" if where else key

    def table(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise DescriptionError(f"{self.source}: {where}: expected a table")

    def only(self, table: dict[str, Any], where: str, allowed: set[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise DescriptionError(
                f"{self.source}: {self._key(where, unknown[0])}: unknown key (allowed: {', '.join(sorted(allowed))})"
            )

    def get(
        self,
        table: dict[str, Any],
        key: str,
        typ: type | tuple[type, ...],
        *,
        where: str = "",
        default: Any = ...,
    ) -> Any:
        if key not in table:
            if default is ...:
                raise DescriptionError(f"{self.source}: {self._key(where, key)}: required")
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, typ):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise DescriptionError(f"{self.source}: {self._key(where, key)}: expected {names}, got {value!r}")
        return value

    def choice(self, table: dict[str, Any], key: str, allowed: tuple[str, ...], *, where: str, default: str) -> str:
        value = self.get(table, key, str, where=where, default=default)
        if value not in allowed:
            raise DescriptionError(
                f"{self.source}: {self._key(where, key)}: {value!r} is not one of {', '.join(allowed)}"
            )
        return str(value)

    def triple(
        self, table: dict[str, Any], key: str, where: str, default: tuple[float, float, float]
    ) -> tuple[float, float, float]:
        value = self.get(table, key, list, where=where, default=list(default))
        if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise DescriptionError(f"{self.source}: {self._key(where, key)}: expected three numbers")
        return (float(value[0]), float(value[1]), float(value[2]))

    def pair(self, table: dict[str, Any], key: str, where: str) -> tuple[int, int] | None:
        value = self.get(table, key, list, where=where, default=None)
        if value is None:
            return None
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise DescriptionError(f"{self.source}: {self._key(where, key)}: expected [height, width], positive")
        return (value[0], value[1])
