"""Frame sources for inference loops: synthetic frames, image folders, video files, RTSP streams, V4L2 cameras.

`open_source(uri, **options)` picks the source from the URI (forms and options: docs/inference-sources-sinks.md).

Video, RTSP and V4L2 decode through PyAV rather than OpenCV or GStreamer:
- PyAV is maintained FFmpeg bindings whose binary wheels bundle FFmpeg, so the same decoder runs on x86 and
  on Jetson (aarch64) without a system FFmpeg, a GStreamer plugin set or a 100 MB OpenCV build;
- one API opens a file, an RTSP URL and a V4L2 device (`av.open` with a format and FFmpeg options), with
  open and read timeouts through FFmpeg's interrupt callback, so a dead camera cannot hang a loop;
- FFmpeg decodes with its own threads (slice/frame) outside the GIL and converts to RGB with swscale;
- GStreamer would add a second pipeline language and a GLib main loop, OpenCV a GUI-oriented dependency whose
  capture API hides errors (`read()` returns False) and gives no control over RTSP transport or timeouts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np
from av.container import InputContainer
from av.video.frame import VideoFrame
from PIL import Image as PILImage

from pitstop.inference.errors import SourceError
from pitstop.inference.frames import Frame, Image, Source

log = logging.getLogger("pitstop.inference.sources")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".mpg", ".mpeg", ".flv", ".h264", ".h265",
     ".hevc", ".mjpeg", ".mjpg", ".y4m", ".ivf"}
)  # fmt: skip


# --- synthetic ---------------------------------------------------------------------------------------------------


class SyntheticSource:
    """Pre-made pseudo-random frames handed out in turn: a source that costs nothing per frame.

    The frames are generated once from `seed` (deterministic) and are read-only, since every consumer sees the
    same buffers. `count` 0 means forever; `fps` 0 means as fast as the consumer reads (then not live).
    """

    VARIANTS = 4

    def __init__(
        self, width: int = 640, height: int = 480, count: int = 0, fps: float = 0.0, seed: int = 0, uri: str = ""
    ) -> None:
        if width <= 0 or height <= 0 or count < 0 or fps < 0:
            raise SourceError(f"synthetic: width and height must be positive, count and fps >= 0 "
                              f"(got width={width}, height={height}, count={count}, fps={fps})")  # fmt: skip
        rng = np.random.default_rng(seed)
        self._frames: list[Image] = []
        for _ in range(self.VARIANTS):
            image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            image.setflags(write=False)
            self._frames.append(image)
        self._count = count
        self._period_ns = round(1e9 / fps) if fps > 0 else 0
        self._next_ns = 0
        self._index = 0
        self._uri = uri or "synthetic:"
        self._closed = threading.Event()

    @property
    def live(self) -> bool:
        return self._period_ns > 0

    @property
    def name(self) -> str:
        return self._uri

    def read(self) -> Frame | None:
        if self._closed.is_set() or (self._count and self._index >= self._count):
            return None
        if self._period_ns:
            self._pace()
        image = self._frames[self._index % len(self._frames)]
        frame = Frame(image=image, index=self._index, captured_ns=time.monotonic_ns(), origin=self._uri)
        self._index += 1
        return frame

    def _pace(self) -> None:
        now = time.monotonic_ns()
        if self._next_ns == 0 or now - self._next_ns > self._period_ns:
            # First frame, or a slow consumer: a camera does not send a burst to catch up, so neither do we.
            self._next_ns = now
        elif self._next_ns > now:
            self._closed.wait((self._next_ns - now) / 1e9)
        self._next_ns += self._period_ns

    def close(self) -> None:
        self._closed.set()


# --- image folder ------------------------------------------------------------------------------------------------


class ImageFolderSource:
    """The JPEG, PNG and BMP files of a folder in name order, as RGB; `loop` starts over at the end.

    An undecodable image raises SourceError naming it, unless `skip_bad` (then a warning, and the next one).
    Each frame's origin is its file's path.
    """

    def __init__(self, path: str | Path, loop: bool = False, skip_bad: bool = False, uri: str = "") -> None:
        self._dir = Path(path)
        self._uri = uri or str(path)
        if not self._dir.is_dir():
            raise SourceError(f"{self._uri}: not a directory")
        try:
            self._files = sorted(p for p in self._dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError as e:
            raise SourceError(f"{self._uri}: cannot list: {e.strerror or e}") from e
        if not self._files:
            raise SourceError(f"{self._uri}: no images (.jpg, .jpeg, .png, .bmp) in the folder")
        self._loop = loop
        self._skip_bad = skip_bad
        self._pos = 0
        self._index = 0
        self._closed = False

    @property
    def live(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return self._uri

    def read(self) -> Frame | None:
        tried = 0  # files tried since the last good one: a loop over only bad files must end
        while not self._closed:
            if self._pos == len(self._files):
                if not self._loop:
                    return None
                self._pos = 0
            if tried == len(self._files):
                raise SourceError(f"{self._uri}: none of the {tried} images can be decoded")
            path = self._files[self._pos]
            self._pos += 1
            tried += 1
            try:
                image = load_rgb(path)
            except SourceError as e:
                if not self._skip_bad:
                    raise
                log.warning("skipping %s", e)
                continue
            frame = Frame(image=image, index=self._index, captured_ns=time.monotonic_ns(), origin=str(path))
            self._index += 1
            return frame
        return None

    def close(self) -> None:
        self._closed = True


def load_rgb(path: Path) -> Image:
    """Decode one image file to an H x W x 3 RGB uint8 array; SourceError naming the file if it cannot."""
    try:
        with PILImage.open(path) as im:
            # Pillow refuses absurd sizes itself (DecompressionBombError): the cap on outside input.
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
        raise SourceError(f"{path}: cannot decode image: {_one_line(e)}") from e
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


# --- PyAV: video files, RTSP, V4L2 -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """How a live source reconnects: `retries` failed attempts in a row (0: never), waits doubling to `maximum`."""

    retries: int = 10
    initial: float = 0.5
    maximum: float = 10.0

    def delay(self, attempt: int) -> float:
        return float(min(self.maximum, self.initial * 2 ** min(attempt, 30)))


class AVSource:
    """Frames decoded by PyAV from anything FFmpeg opens; the base of the file, RTSP and V4L2 sources.

    A live source whose stream ends or fails reconnects with `backoff`; a finite one returns None at the end
    and raises SourceError on a decoding error. `close()` may come from another thread: it interrupts a
    back-off wait, and waits for a read in progress (bounded by the read timeout) before closing.
    """

    def __init__(
        self,
        url: str,
        *,
        uri: str = "",
        format: str | None = None,
        options: Mapping[str, str] | None = None,
        live: bool = False,
        realtime: bool = False,
        backoff: Backoff | None = None,
        open_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self._url = url
        self._uri = uri or url
        self._format = format
        self._options = dict(options or {})
        self._live = live or realtime
        self._finite = not live  # ends (file) rather than reconnects (camera, stream)
        self._realtime = realtime
        self._backoff = backoff or Backoff(retries=0)
        self._timeout = (open_timeout, read_timeout)
        self._index = 0
        self.reconnects = 0  # successful reconnections of a live stream, for telemetry
        self._closed = threading.Event()
        self._lock = threading.Lock()  # held while FFmpeg works on the container
        self._container: InputContainer | None = None
        self._frames: Iterator[VideoFrame] | None = None
        self._pace_origin: tuple[int, float] | None = None  # (wall ns, stream seconds) of the first paced frame
        self._open()

    @property
    def live(self) -> bool:
        return self._live

    @property
    def name(self) -> str:
        return self._uri

    def read(self) -> Frame | None:
        with self._lock:
            while not self._closed.is_set():
                if self._frames is None:
                    if self._finite:
                        return None
                    self._reconnect()
                    continue
                try:
                    vf = next(self._frames)
                except StopIteration:
                    self._drop_container()
                    if not self._finite:
                        log.warning("%s: stream ended; reconnecting", self._uri)
                    continue
                except av.FFmpegError as e:
                    self._drop_container()
                    if self._finite:
                        raise SourceError(f"{self._uri}: cannot decode: {_av_message(e)}") from e
                    log.warning("%s: stream lost (%s); reconnecting", self._uri, _av_message(e))
                    continue
                if self._realtime:
                    self._pace(vf)
                captured = time.monotonic_ns()
                image = np.ascontiguousarray(vf.to_ndarray(format="rgb24"), dtype=np.uint8)
                frame = Frame(image=image, index=self._index, captured_ns=captured, origin=self._uri)
                self._index += 1
                return frame
        return None

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._drop_container()

    def _open(self) -> None:
        try:
            container = av.open(self._url, "r", format=self._format, options=self._options, timeout=self._timeout)
        except av.FFmpegError as e:
            raise SourceError(f"{self._uri}: cannot open: {_av_message(e)}") from e
        except OSError as e:  # PyAV raises some plain OS errors before FFmpeg runs
            raise SourceError(f"{self._uri}: cannot open: {e.strerror or e}") from e
        if not container.streams.video:
            container.close()
            raise SourceError(f"{self._uri}: no video stream")
        stream = container.streams.video[0]
        # Frame threading buffers several frames, which a live source pays for in latency.
        stream.thread_type = "SLICE" if self._live else "AUTO"
        self._container = container
        self._frames = container.decode(stream)

    def _reconnect(self) -> None:
        """Reopen a lost live stream, waiting between attempts; SourceError when the attempts run out."""
        attempt = 0
        while True:
            if attempt >= self._backoff.retries:
                tries = f"after {attempt} reconnection attempts" if attempt else "(reconnection disabled)"
                raise SourceError(f"{self._uri}: stream lost {tries}")
            if self._closed.wait(self._backoff.delay(attempt)):
                return
            attempt += 1
            try:
                self._open()
            except SourceError as e:
                log.warning("%s (attempt %d of %d)", e, attempt, self._backoff.retries)
                continue
            self.reconnects += 1
            log.info("%s: reconnected", self._uri)
            return

    def _drop_container(self) -> None:
        self._frames = None
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except av.FFmpegError as e:
                log.debug("%s: close: %s", self._uri, e)

    def _pace(self, vf: VideoFrame) -> None:
        """Hold a decoded frame until its presentation time, as a camera would deliver it."""
        stream_s = vf.time if vf.time is not None else 0.0
        now = time.monotonic_ns()
        if self._pace_origin is None:
            self._pace_origin = (now, stream_s)
            return
        wall0, stream0 = self._pace_origin
        due = wall0 + round((stream_s - stream0) * 1e9)
        if due > now:
            self._closed.wait((due - now) / 1e9)


class VideoFileSource(AVSource):
    """A video file, decoded as fast as read (not live), or paced at its own frame rate with `realtime`."""

    def __init__(self, path: str | Path, realtime: bool = False, uri: str = "") -> None:
        path = Path(path)
        if not path.is_file():
            # FFmpeg would say the same, but less clearly for a directory or a broken symlink.
            raise SourceError(f"{uri or path}: no such file")
        super().__init__(str(path), uri=uri or str(path), realtime=realtime)


class RtspSource(AVSource):
    """An RTSP stream (live): TCP transport by default, reconnecting with back-off when the stream is lost.

    `timeout` bounds the connection and every read in seconds, so a camera that stops sending is noticed.
    """

    TRANSPORTS = ("tcp", "udp", "udp_multicast", "http", "https")

    def __init__(
        self,
        url: str,
        transport: str = "tcp",
        timeout: float = 5.0,
        retries: int = 10,
        backoff: float = 0.5,
        backoff_max: float = 10.0,
    ) -> None:
        if transport not in self.TRANSPORTS:
            raise SourceError(f"{redact(url)}: transport {transport!r} is not one of {', '.join(self.TRANSPORTS)}")
        if timeout <= 0 or retries < 0 or backoff < 0 or backoff_max < backoff:
            raise SourceError(f"{redact(url)}: need timeout > 0, retries >= 0 and 0 <= backoff <= backoff_max")
        options = {"rtsp_transport": transport, "timeout": str(round(timeout * 1e6))}  # FFmpeg: microseconds
        super().__init__(
            url,
            uri=redact(url),
            options=options,
            live=True,
            backoff=Backoff(retries, backoff, backoff_max),
            open_timeout=timeout,
            read_timeout=timeout,
        )


class V4l2Source(AVSource):
    """A V4L2 camera (live). `video_size` ("1280x720"), `framerate` and `input_format` ("mjpeg", "yuyv422")
    ask the driver for a mode; unset, the driver's current one. A camera that goes away is reopened with
    back-off (USB cameras reappear under the same node)."""

    def __init__(
        self,
        device: str = "/dev/video0",
        video_size: str = "",
        framerate: str = "",
        input_format: str = "",
        timeout: float = 5.0,
        retries: int = 10,
        uri: str = "",
    ) -> None:
        options = {k: v for k, v in (("video_size", video_size), ("framerate", framerate),
                                     ("input_format", input_format)) if v}  # fmt: skip
        if not Path(device).exists():
            raise SourceError(f"{uri or device}: no such device")
        super().__init__(
            device,
            uri=uri or f"v4l2:{device}",
            format="v4l2",
            options=options,
            live=True,
            backoff=Backoff(retries),
            open_timeout=timeout,
            read_timeout=timeout,
        )


def redact(url: str) -> str:
    """`url` without its password, for names, logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _av_message(e: av.FFmpegError) -> str:
    """FFmpeg's reason on one line, with its last error log line when PyAV kept one."""
    msg = e.strerror or str(e)
    logged = e.log[1] if isinstance(e.log, tuple) and len(e.log) > 1 else None
    if logged and logged[2].strip():
        msg += f" ({logged[2].strip()})"
    return _one_line(msg)


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


# --- URIs --------------------------------------------------------------------------------------------------------

OptionTypes = Mapping[str, type]

_OPTIONS: dict[str, OptionTypes] = {
    "synthetic": {"width": int, "height": int, "count": int, "fps": float, "seed": int},
    "dir": {"loop": bool, "skip_bad": bool},
    "file": {"realtime": bool},
    "rtsp": {"transport": str, "timeout": float, "retries": int, "backoff": float, "backoff_max": float},
    "v4l2": {"video_size": str, "framerate": str, "input_format": str, "timeout": float, "retries": int},
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_options(
    where: str, options: Mapping[str, Any], types: OptionTypes, error: type[Exception] = SourceError
) -> dict[str, Any]:
    """Check `options` against `types`, converting strings ("640", "true") as given on a command line."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        want = types.get(key)
        if want is None:
            allowed = ", ".join(sorted(types)) or "none"
            raise error(f"{where}: unknown option {key!r} (allowed: {allowed})")
        try:
            out[key] = _convert(value, want)
        except ValueError:
            raise error(f"{where}: option {key!r} wants {want.__name__}, got {value!r}") from None
    return out


def _convert(value: Any, want: type) -> Any:
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if isinstance(value, bool):  # True is an int to Python, never a count or a size here
        raise ValueError(value)
    if want is str:
        if isinstance(value, str | int | float):
            return str(value)
        raise ValueError(value)
    if want is float and isinstance(value, int | float):
        return float(value)
    if want is int and isinstance(value, int):
        return value
    if isinstance(value, str):
        return want(value)
    raise ValueError(value)


def open_source(uri: str, **options: Any) -> Source:
    """The source `uri` names, built with `options`; SourceError for an unknown form or a bad option.

    Forms: `synthetic:`, `dir:PATH` or a directory, `file:PATH` or a video file path, `rtsp://…`,
    `v4l2:/dev/videoN` or `/dev/videoN`.
    """
    kind, target = classify(uri)
    opts = parse_options(redact(uri), options, _OPTIONS[kind])
    builders: dict[str, Callable[[], Source]] = {
        "synthetic": lambda: SyntheticSource(uri=uri, **opts),
        "dir": lambda: ImageFolderSource(target, uri=uri, **opts),
        "file": lambda: VideoFileSource(target, uri=uri, **opts),
        "rtsp": lambda: RtspSource(target, **opts),
        "v4l2": lambda: V4l2Source(target, uri=uri, **opts),
    }
    return builders[kind]()


def classify(uri: str) -> tuple[str, str]:
    """(kind, target) for a source URI: the kind keys `_OPTIONS`, the target is a path, URL or device."""
    if uri in ("synthetic", "synthetic:"):
        return "synthetic", ""
    scheme, sep, rest = uri.partition(":")
    if sep and scheme in ("dir", "file", "v4l2") and rest:
        if scheme == "file" and rest.startswith("//"):
            rest = rest[2:]  # file:///path
        return scheme, rest
    if uri.startswith(("rtsp://", "rtsps://")):
        return "rtsp", uri
    if uri.startswith("/dev/video"):
        return "v4l2", uri
    if "://" in uri or (sep and scheme in ("synthetic", "dir", "file", "v4l2")):
        raise SourceError(f"{uri}: unknown source (use synthetic:, dir:PATH, file:PATH, rtsp://, v4l2:/dev/videoN)")
    path = Path(uri)
    if path.is_dir():
        return "dir", uri
    if path.suffix.lower() in VIDEO_SUFFIXES or path.is_file():
        return "file", uri
    raise SourceError(f"{uri}: no such file or directory, and not a source URI "
                      f"(synthetic:, dir:PATH, file:PATH, rtsp://, v4l2:/dev/videoN)")  # fmt: skip
