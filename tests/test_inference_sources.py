"""Frame sources (inference/sources.py) against real inputs: videos encoded here with PyAV, image files written
with Pillow, a real RTSP server (tests/rtspkit.py) that dies mid-stream, and V4L2 where a camera exists."""

from __future__ import annotations

import glob
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import av
import numpy as np
import pytest
import rtspkit
from av.video.stream import VideoStream
from conftest import in_ci
from PIL import Image
from rtspkit import RtspServer

from pitstop.inference.errors import SourceError
from pitstop.inference.frames import Frame, Source
from pitstop.inference.sources import (
    AVSource,
    ImageFolderSource,
    RtspSource,
    SyntheticSource,
    V4l2Source,
    VideoFileSource,
    classify,
    open_source,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def read_all(src: Source, limit: int = 1000) -> list[Frame]:
    frames = []
    while (frame := src.read()) is not None:
        frames.append(frame)
        assert len(frames) <= limit, "source did not end"
    return frames


def assert_colour(image: np.ndarray, colour: Sequence[int], tolerance: int = 24) -> None:
    mean = image.reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(mean - np.array(colour)) <= tolerance), f"mean colour {mean} is not {colour}"


def one_line(e: pytest.ExceptionInfo[SourceError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- synthetic ---------------------------------------------------------------------------------------------------


def test_synthetic_frames_are_made_once_and_cycled() -> None:
    src = open_source("synthetic:", width=64, height=48, count=10)
    frames = read_all(src)
    assert [f.index for f in frames] == list(range(10))
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.origin == "synthetic:" for f in frames)
    # The same few buffers come back in turn: nothing is allocated per frame.
    assert frames[0].image is frames[SyntheticSource.VARIANTS].image
    assert len({id(f.image) for f in frames}) == SyntheticSource.VARIANTS
    assert not frames[0].image.flags.writeable, "shared frames must be read-only"
    assert not src.live
    # Deterministic: the same seed gives the same pictures.
    again = SyntheticSource(width=64, height=48, count=1)
    first = again.read()
    assert first is not None
    assert np.array_equal(first.image, frames[0].image)


def test_synthetic_paces_at_fps_and_is_live() -> None:
    src = SyntheticSource(width=8, height=8, count=11, fps=100)
    assert src.live
    start = time.monotonic()
    frames = read_all(src)
    elapsed = time.monotonic() - start
    assert len(frames) == 11
    assert 0.09 <= elapsed < 1.0, elapsed
    stamps = [f.captured_ns for f in frames]
    assert stamps == sorted(stamps)


def test_synthetic_forever_until_closed() -> None:
    src = SyntheticSource(width=4, height=4)
    for _ in range(100):
        assert src.read() is not None
    src.close()
    assert src.read() is None


def test_options_from_strings_and_unknown_options() -> None:
    src = open_source("synthetic", width="32", height="16", count="2", fps="0")
    assert [f.image.shape for f in read_all(src)] == [(16, 32, 3)] * 2
    with pytest.raises(SourceError, match=r"unknown option 'colour' \(allowed: count, fps, height, seed, width\)"):
        open_source("synthetic:", colour="red")
    with pytest.raises(SourceError, match="option 'width' wants int, got 'wide'"):
        open_source("synthetic:", width="wide")
    with pytest.raises(SourceError, match="option 'count' wants int, got True"):
        open_source("synthetic:", count=True)
    with pytest.raises(SourceError, match="width and height must be positive"):
        open_source("synthetic:", width=0)


# --- URIs --------------------------------------------------------------------------------------------------------


def test_classify(tmp_path: Path) -> None:
    (tmp_path / "clip.bin").write_bytes(b"x")
    assert classify("synthetic:") == ("synthetic", "")
    assert classify(f"dir:{tmp_path}") == ("dir", str(tmp_path))
    assert classify(str(tmp_path)) == ("dir", str(tmp_path))
    assert classify("file:/data/a.bin") == ("file", "/data/a.bin")
    assert classify("file:///data/a.mp4") == ("file", "/data/a.mp4")
    assert classify("/data/missing.MKV") == ("file", "/data/missing.MKV")
    assert classify(str(tmp_path / "clip.bin")) == ("file", str(tmp_path / "clip.bin"))  # FFmpeg probes it
    assert classify("rtsp://cam.local:8554/live") == ("rtsp", "rtsp://cam.local:8554/live")
    assert classify("rtsps://cam.local/live") == ("rtsp", "rtsps://cam.local/live")
    assert classify("v4l2:/dev/video2") == ("v4l2", "/dev/video2")
    assert classify("/dev/video0") == ("v4l2", "/dev/video0")
    for bad in ("http://example.com/a.mp4", "dir:", "webcam:0", str(tmp_path / "nothing")):
        with pytest.raises(SourceError, match=r"unknown source|no such file or directory"):
            classify(bad)


def test_rtsp_password_is_not_shown() -> None:
    with pytest.raises(SourceError) as e:
        open_source("rtsp://admin:hunter2@127.0.0.1:1/live", transport="carrier-pigeon")
    assert "hunter2" not in str(e.value) and "admin:***@127.0.0.1:1" in str(e.value)


# --- image folders -----------------------------------------------------------------------------------------------


def test_image_folder_order_and_rgb(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), RED).save(tmp_path / "b.jpg", quality=95)
    Image.new("L", (40, 30), 200).save(tmp_path / "a.png")  # grayscale becomes three equal channels
    Image.new("RGBA", (20, 10), (*BLUE, 128)).save(tmp_path / "c.png")  # alpha is dropped
    Image.new("P", (8, 8), 0).save(tmp_path / "d.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()
    src = open_source(f"dir:{tmp_path}")
    assert not src.live
    frames = read_all(src)
    assert [Path(f.origin).name for f in frames] == ["a.png", "b.jpg", "c.png", "d.bmp"]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.ndim == 3 and f.image.shape[2] == 3
        assert f.image.flags.c_contiguous
    assert frames[0].image.shape == (30, 40, 3)
    assert np.all(frames[0].image == 200)
    assert_colour(frames[1].image, RED)
    assert frames[2].image.shape == (10, 20, 3)
    assert_colour(frames[2].image, BLUE, tolerance=0)


def test_image_folder_loop(tmp_path: Path) -> None:
    for name, colour in (("1.png", RED), ("2.png", GREEN)):
        Image.new("RGB", (4, 4), colour).save(tmp_path / name)
    src = open_source(str(tmp_path), loop="true")
    frames = [src.read() for _ in range(5)]
    assert [Path(f.origin).name for f in frames if f] == ["1.png", "2.png", "1.png", "2.png", "1.png"]
    assert [f.index for f in frames if f] == [0, 1, 2, 3, 4]


def test_image_folder_corrupt_file(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), RED).save(tmp_path / "1.png")
    (tmp_path / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    good = tmp_path / "3.png"
    Image.new("RGB", (64, 64), GREEN).save(good)
    (tmp_path / "4.png").write_bytes(good.read_bytes()[:100])  # truncated
    src = open_source(f"dir:{tmp_path}")
    assert src.read() is not None
    with pytest.raises(SourceError) as e:
        src.read()
    assert one_line(e).startswith(f"{tmp_path / '2.jpg'}: cannot decode image:")

    skipping = ImageFolderSource(tmp_path, skip_bad=True)
    assert [Path(f.origin).name for f in read_all(skipping)] == ["1.png", "3.png"]


def test_image_folder_all_bad_while_looping(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"junk")
    src = ImageFolderSource(tmp_path, loop=True, skip_bad=True)
    with pytest.raises(SourceError, match="none of the 1 images can be decoded"):
        src.read()


def test_image_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a directory"):
        open_source(f"dir:{tmp_path / 'nope'}")
    with pytest.raises(SourceError, match=r"no images \(.jpg"):
        open_source(f"dir:{tmp_path}")


# --- video files -------------------------------------------------------------------------------------------------


def make_video(
    path: Path, colours: Sequence[tuple[int, int, int]], each: int = 10, fps: int = 25, codec: str = "libx264"
) -> Path:
    """Encode `each` frames of every solid colour (96 x 64) with the FFmpeg inside PyAV."""
    options = {"preset": "ultrafast"} if codec == "libx264" else {}
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        assert isinstance(stream, VideoStream)
        stream.width, stream.height = 96, 64
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for colour in colours:
            image = np.full((64, 96, 3), colour, np.uint8)
            for _ in range(each):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(("name", "codec"), [("clip.mp4", "libx264"), ("clip.avi", "mpeg4"), ("clip.mkv", "mjpeg")])
def test_video_file_decodes_every_frame(tmp_path: Path, name: str, codec: str) -> None:
    path = make_video(tmp_path / name, [RED, GREEN, BLUE], codec=codec)
    src = open_source(str(path))
    assert isinstance(src, VideoFileSource) and not src.live and src.name == str(path)
    before = time.monotonic_ns()
    frames = read_all(src)
    assert len(frames) == 30
    assert [f.index for f in frames] == list(range(30))
    assert all(f.image.shape == (64, 96, 3) and f.image.flags.c_contiguous for f in frames)
    assert all(f.origin == str(path) for f in frames)
    assert before <= frames[0].captured_ns <= frames[-1].captured_ns <= time.monotonic_ns()
    for i, colour in enumerate((RED, GREEN, BLUE)):
        assert_colour(frames[i * 10 + 5].image, colour)
    assert src.read() is None  # stays at the end
    src.close()


def test_video_file_uri_form_and_realtime(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.avi", [RED], each=6, fps=50, codec="mpeg4")
    path = path.rename(tmp_path / "clip.bin")  # no video suffix: the file: form says what it is
    src = open_source(f"file:{path}", realtime=True)
    assert src.live and src.name == f"file:{path}"
    start = time.monotonic()
    frames = read_all(src)
    elapsed = time.monotonic() - start
    assert len(frames) == 6
    assert frames[0].origin == f"file:{path}"
    assert 0.09 <= elapsed < 1.0, f"6 frames at 50 fps took {elapsed:.3f} s"


def test_video_file_missing(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as e:
        open_source(str(tmp_path / "missing.mp4"))
    assert one_line(e) == f"{tmp_path / 'missing.mp4'}: no such file"


def test_video_file_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("hello\n" * 100)
    with pytest.raises(SourceError) as e:
        open_source(str(path))
    assert one_line(e) == f"{path}: cannot open: Invalid data found when processing input"


def test_video_file_truncated(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4", [RED, GREEN])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the index (moov) is at the end: gone
    with pytest.raises(SourceError) as e:
        open_source(str(path))
    assert one_line(e).startswith(f"{path}: cannot open:")


def test_video_file_corrupt_mid_stream(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mkv", [RED, GREEN, BLUE], codec="mjpeg")
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third : 2 * third] = np.random.default_rng(1).integers(0, 256, third, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    src = open_source(str(path))
    good = 0
    with pytest.raises(SourceError) as e:
        while src.read() is not None:
            good += 1
    assert good >= 1
    assert one_line(e).startswith(f"{path}: cannot decode:")


def test_video_file_without_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(SourceError, match="no video stream"):
        open_source(f"file:{path}")


# --- RTSP --------------------------------------------------------------------------------------------------------


@pytest.fixture
def rtsp_server() -> Iterator[RtspServer]:
    reason = rtspkit.missing()
    if reason is not None:
        if in_ci():
            pytest.fail(f"{reason}. CI=true: CI must have every tool, so this is an error.", pytrace=False)
        pytest.skip(reason)
    with RtspServer(pattern="red") as srv:
        yield srv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_until(src: Source, done: Callable[[], bool], deadline_s: float = 15.0) -> list[Frame]:
    """Frames read until `done()` holds (checked after each frame); fails after `deadline_s`."""
    frames: list[Frame] = []
    end = time.monotonic() + deadline_s
    while not done():
        assert time.monotonic() < end, f"gave up after {len(frames)} frames"
        frame = src.read()
        assert frame is not None, "a live source must not end"
        frames.append(frame)
    return frames


def test_rtsp_reads_and_reconnects_after_server_dies(rtsp_server: RtspServer) -> None:
    src = open_source(rtsp_server.url, timeout=3, retries=20, backoff=0.2, backoff_max=0.5)
    assert isinstance(src, RtspSource) and src.live and src.name == rtsp_server.url
    first = [src.read() for _ in range(3)]
    assert all(f is not None and f.image.shape == (120, 160, 3) for f in first)
    assert first[0] is not None
    assert first[0].origin == rtsp_server.url
    assert_colour(first[0].image, RED, tolerance=30)

    rtsp_server.kill()
    restart = threading.Timer(1.0, rtsp_server.start)
    restart.start()
    try:
        # Frames FFmpeg buffered come first; then the loss, the back-off, the reconnect, and fresh frames.
        after = read_until(src, lambda: src.reconnects == 1)
        after += [f for f in (src.read() for _ in range(3)) if f is not None]
    finally:
        restart.join()
    indices = [f.index for f in first if f] + [f.index for f in after]
    assert indices == list(range(len(indices))), "indices continue across the reconnection"
    assert_colour(after[-1].image, RED, tolerance=30)
    src.close()
    assert src.read() is None


def test_rtsp_gives_up_after_its_retries(rtsp_server: RtspServer) -> None:
    src = open_source(rtsp_server.url, timeout=2, retries=2, backoff=0.1, backoff_max=0.2)
    assert src.read() is not None
    rtsp_server.kill()
    start = time.monotonic()
    with pytest.raises(SourceError) as e:
        read_until(src, lambda: False)
    assert one_line(e) == f"{rtsp_server.url}: stream lost after 2 reconnection attempts"
    assert time.monotonic() - start < 10


def test_rtsp_close_interrupts_the_back_off(rtsp_server: RtspServer) -> None:
    src = open_source(rtsp_server.url, retries=100, backoff=30, backoff_max=30)
    assert src.read() is not None
    rtsp_server.kill()
    results: list[Frame | None] = []
    reader = threading.Thread(target=lambda: results.extend(iter(src.read, None)))
    reader.start()
    time.sleep(0.5)  # the reader drains FFmpeg's buffer, sees the loss and waits 30 s to retry
    start = time.monotonic()
    src.close()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert time.monotonic() - start < 5


def test_rtsp_unknown_path(rtsp_server: RtspServer) -> None:
    url = rtsp_server.url.replace("/test", "/nothing")
    with pytest.raises(SourceError) as e:
        open_source(url, timeout=3)
    assert one_line(e).startswith(f"{url}: cannot open:")


def test_rtsp_nothing_listening() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/live"
    with pytest.raises(SourceError) as e:
        open_source(url, timeout=2)
    assert one_line(e) == f"{url}: cannot open: Connection refused"


# --- V4L2 --------------------------------------------------------------------------------------------------------


def test_v4l2_missing_device() -> None:
    with pytest.raises(SourceError) as e:
        open_source("v4l2:/dev/video99", video_size="640x480", framerate=30)
    assert one_line(e) == "v4l2:/dev/video99: no such device"
    with pytest.raises(SourceError, match="unknown option 'fps'"):
        open_source("/dev/video99", fps=30)


def test_v4l2_not_a_camera(tmp_path: Path) -> None:
    fake = tmp_path / "video0"
    fake.write_bytes(b"\0" * 64)
    with pytest.raises(SourceError) as e:
        V4l2Source(str(fake), timeout=2)
    assert one_line(e).startswith(f"v4l2:{fake}: cannot open:")


def test_v4l2_camera() -> None:
    devices = sorted(glob.glob("/dev/video*"))
    if not devices:
        pytest.skip("no /dev/video* camera here (v4l2loopback needs a kernel module this host cannot load)")
    try:
        src = open_source(f"v4l2:{devices[0]}")
    except SourceError as e:
        pytest.skip(f"{devices[0]} is not a capture device we can open: {e}")
    assert isinstance(src, AVSource) and src.live
    frame = src.read()
    src.close()
    assert frame is not None and frame.image.ndim == 3 and frame.image.shape[2] == 3
