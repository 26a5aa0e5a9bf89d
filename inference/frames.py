"""What flows through a loop: frames from a source, results to a sink, and the two small interfaces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]  # H x W x 3, RGB, C-contiguous


@dataclass(slots=True)
class Frame:
    """One decoded picture. `image` may be a buffer the source reuses: consumers copy what they keep."""

    image: Image
    index: int  # 0, 1, 2 … in source order, also across drops
    captured_ns: int  # time.monotonic_ns() when the source produced it
    origin: str = ""  # file name, URL or device the frame came from


@dataclass(slots=True)
class Result:
    """The post-processed answer for one frame, ready for a sink."""

    index: int
    captured_ns: int
    origin: str
    kind: str  # the description's postprocess kind: "text_detection", "orientation", "raw"
    value: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


class Source(Protocol):
    """A producer of frames. `live` sources drop old frames when the loop is behind (latest wins)."""

    @property
    def live(self) -> bool: ...

    @property
    def name(self) -> str: ...

    def read(self) -> Frame | None:
        """The next frame, or None at the end of a finite source. Raises SourceError."""
        ...

    def close(self) -> None: ...


class Sink(Protocol):
    """A consumer of results. Raises SinkError when it cannot deliver."""

    def write(self, result: Result) -> None: ...

    def close(self) -> None: ...
