"""The choices a runtime can be given, importable without numpy (the `pitstop` command builds its parser
from them on every start, also on a device that only runs `pitstop mark-good`)."""

from __future__ import annotations

BACKENDS = ("auto", "tensorrt", "onnxruntime")
# ONNX Runtime execution providers in preference order (DESIGN.md "Inference").
PROVIDERS = ("tensorrt", "cuda", "cpu")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
