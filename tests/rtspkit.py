"""A real RTSP server on loopback for tests: gst-rtsp-server streaming a GStreamer test pattern.

    with RtspServer(pattern="red") as srv:
        src = RtspSource(srv.url)
        srv.kill()      # the stream dies mid-read, as a camera losing power
        srv.start()     # back on the same port

The server is a small script run by the system Python (/usr/bin/python3), which has PyGObject; the project's
venv does not need GStreamer. It streams Motion JPEG over RTP (`rtpjpegpay`, gst-plugins-good), which every
FFmpeg decodes and which needs no H.264 encoder (x264 is in gst-plugins-ugly). Debian packages:
python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-base, gstreamer1.0-plugins-good.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import subprocess
import tempfile
from types import TracebackType

PYTHON = "/usr/bin/python3"
APT_PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good"

# argv: port (0: any), mount path, width, height, fps, videotestsrc pattern. Prints the bound port, then serves.
_SERVER = r"""
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
port, path, width, height, fps, pattern = sys.argv[1:7]
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    f"( videotestsrc is-live=true pattern={pattern} "
    f"! video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 "
    f"! jpegenc quality=90 ! rtpjpegpay name=pay0 pt=26 )"
)
factory.set_shared(True)
server.get_mount_points().add_factory(path, factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on 127.0.0.1:{port}")
print(server.get_bound_port(), flush=True)
GLib.MainLoop().run()
"""

_PROBE = r"""
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in ("videotestsrc", "jpegenc", "rtpjpegpay") if Gst.ElementFactory.find(e) is None]
print(" ".join(missing))
"""


@functools.cache
def missing() -> str | None:
    """Why no RTSP server can run here, or None when it can."""
    if not os.access(PYTHON, os.X_OK):
        return f"{PYTHON} not found (apt packages: {APT_PACKAGES})"
    res = subprocess.run([PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return f"gst-rtsp-server not usable from {PYTHON}: {last} (apt packages: {APT_PACKAGES})"
    if res.stdout.strip():
        return f"GStreamer elements missing: {res.stdout.strip()} (apt packages: {APT_PACKAGES})"
    return None


class RtspServer:
    """One gst-rtsp-server process on 127.0.0.1 serving `rtsp://127.0.0.1:PORT/test`."""

    def __init__(self, *, width: int = 160, height: int = 120, fps: int = 25, pattern: str = "red") -> None:
        self.port = 0
        self.path = "/test"
        self._args = [str(width), str(height), str(fps), pattern]
        self._proc: subprocess.Popen[bytes] | None = None
        # stderr to a file: a pipe nobody reads could fill and stall the server. Closed in __exit__.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def start(self, timeout: float = 10.0) -> None:
        """Start serving, on the previous port after a kill (the client reconnects to the same URL)."""
        assert self._proc is None, "already running"
        proc = subprocess.Popen([PYTHON, "-c", _SERVER, str(self.port), self.path, *self._args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                start_new_session=True)  # fmt: skip
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self._proc = proc
            self.kill()
            self._log.seek(0)
            raise RuntimeError(f"RTSP server did not start: {self._log.read().decode(errors='replace')[-2000:]}")
        self.port = int(line)
        self._proc = proc

    def kill(self) -> None:
        """SIGKILL: connections drop at once, with no RTSP TEARDOWN."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def __enter__(self) -> RtspServer:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()
        self._log.close()
