"""Typed errors of the inference area, each with its own exit code (40-49)."""

from __future__ import annotations

from pitstop.errors import PitstopError


class InferenceError(PitstopError):
    """Base of every expected inference failure."""

    exit_code = 40


class ModelError(InferenceError):
    """A model file is missing, unreadable, corrupt or not an ONNX model the runtime accepts."""

    exit_code = 41


class DescriptionError(InferenceError, ValueError):
    """A model description is malformed or does not match the model it describes."""

    exit_code = 42


class ShapeError(InferenceError, ValueError):
    """An input has the wrong shape or type for the model, or lies outside its optimization profile."""

    exit_code = 43


class RuntimeUnavailableError(InferenceError):
    """The requested runtime or execution provider is not installed or has no device to run on."""

    exit_code = 44


class EngineError(InferenceError):
    """A TensorRT engine could not be built, or a cached one is corrupt or built for something else."""

    exit_code = 45


class SourceError(InferenceError):
    """A frame source cannot be opened or read (missing file, undecodable video, camera gone)."""

    exit_code = 46


class SinkError(InferenceError):
    """A result sink cannot be opened or written (broker unreachable, disk full)."""

    exit_code = 47


class LoopError(InferenceError):
    """A loop stage failed; the message names the stage and the cause."""

    exit_code = 48
