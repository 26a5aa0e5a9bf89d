"""A real loopback OTLP/HTTP metrics receiver for tests: decodes, counts, goes down and comes back.

    with OtlpReceiver() as rx:
        reporter = Reporter(HealthConfig(otlp_url=rx.url), ...)
        rx.stop()                      # connection refused from now on; open connections are cut
        rx.start()                     # back, on the same port
        rx.fail(503, count=2, retry_after="1")   # the next two requests get 503 with Retry-After: 1
        rx.seqs                        # pitstop.report.seq of every accepted report, in arrival order

One `ThreadingHTTPServer` on 127.0.0.1. POST /v1/metrics with `Content-Type: application/x-protobuf` is
decoded with the opentelemetry-proto classes (pitstop.daemon.otlp.decode); a request is accepted (200 with an
empty ExportMetricsServiceResponse) unless a canned failure is queued. Accepting a report (recording it and
writing the whole answer) and going down are atomic with respect to each other: a request the receiver counted
was also answered, so a report counted twice is the sender's fault, never the kit's.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from pitstop.daemon.otlp import SPOOL_ATTR, Report, decode

MAX_BODY = 16 << 20


@dataclass(frozen=True)
class Received:
    seq: int | None
    spool_id: str | None
    report: Report
    at: float  # time.monotonic()


@dataclass(frozen=True)
class Attempt:
    at: float
    status: int | None  # None: cut without an answer (the receiver went down meanwhile)
    seq: int | None


@dataclass(frozen=True)
class Canned:
    status: int
    retry_after: str | None = None
    body: bytes = b""


class OtlpReceiver:
    def __init__(self, port: int = 0, path: str = "/v1/metrics") -> None:
        self.path = path
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.attempts: list[Attempt] = []
        self.canned: list[Canned] = []
        self.delay_s = 0.0  # wait this long before answering (after reading the request)
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self.up = False
        self.start()

    # -- control ------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{self.path}"

    def start(self) -> None:
        """Listen (again) on the same port."""
        if self.up:
            return
        self._server = _Server(("127.0.0.1", self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.up = True

    def stop(self) -> None:
        """Go down: stop listening (connection refused) and cut every open connection."""
        if not self.up or self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self.lock:  # waits for an answer being written; no new one starts after this
            self.up = False
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def fail(self, status: int, count: int = 1, *, retry_after: str | None = None, body: bytes = b"") -> None:
        with self.lock:
            self.canned += [Canned(status, retry_after, body)] * count

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- what arrived -------------------------------------------------------------------------------------

    @property
    def seqs(self) -> list[int | None]:
        with self.lock:
            return [r.seq for r in self.received]

    def duplicates(self) -> dict[tuple[str | None, int | None], int]:
        with self.lock:
            counts = Counter((r.spool_id, r.seq) for r in self.received)
        return {k: n for k, n in counts.items() if n > 1}

    def wait_for(self, cond: Callable[[OtlpReceiver], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver: condition not met in {timeout} s; got seqs {self.seqs}")
            time.sleep(0.01)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: OtlpReceiver) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections cut by stop() end in errors on purpose


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10

    def setup(self) -> None:
        super().setup()
        with self.rx.lock:
            self.rx._conns.add(self.connection)

    def finish(self) -> None:
        with self.rx.lock:
            self.rx._conns.discard(self.connection)
        super().finish()

    @property
    def rx(self) -> OtlpReceiver:
        assert isinstance(self.server, _Server)
        return self.server.owner

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            self._send(413, b"too large")
            return
        body = self.rfile.read(length)
        if self.rx.delay_s:
            time.sleep(self.rx.delay_s)
        if self.path != self.rx.path:
            self._send(404, b"not found")
            return
        if self.headers.get("Content-Type") != "application/x-protobuf":
            self._send(415, b"unsupported media type")
            return
        try:
            reports = decode(body)
        except DecodeError:
            self._send(400, b"bad protobuf")
            return
        report = reports[0] if reports else None
        seq = report.seq if report else None
        with self.rx.lock:
            now = time.monotonic()
            if not self.rx.up:  # went down while this request was read: no answer at all
                self.rx.attempts.append(Attempt(now, None, seq))
                self.close_connection = True
                return
            if self.rx.canned:
                canned = self.rx.canned.pop(0)
                self.rx.attempts.append(Attempt(now, canned.status, seq))
                headers = {"Retry-After": canned.retry_after} if canned.retry_after else {}
                self._send(canned.status, canned.body, headers)
                return
            self.rx.attempts.append(Attempt(now, 200, seq))
            if report is not None:
                spool_id = report.scope.get(SPOOL_ATTR)
                self.rx.received.append(Received(seq, str(spool_id) if spool_id else None, report, now))
            self._send(200, ExportMetricsServiceResponse().SerializeToString(), ctype="application/x-protobuf")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
