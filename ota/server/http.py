"""The HTTP(S) transport: the standard library's threading server with what a device-facing server needs.

One thread per connection, HTTP/1.1 keep-alive (a device's requests.Session keeps its connection between polls;
an idle one is closed after `idle_timeout` s), at most `max_connections` at once (more are answered 503 and
closed), request bodies only with a Content-Length and at most the application's limit for the path (413
before a byte of it is read), the TLS handshake in the connection's own thread (a slow client never holds up
the others) with an optional client CA for mutual TLS, one `sendall` per small answer (no Nagle stalls) and
`sendfile` for artifacts. `shutdown` stops accepting, closes idle connections, lets requests under way finish
(up to a deadline) and returns. Every request is logged on the `pitstop.ota.server.access` logger at INFO.

The application sees a `Request` and returns a `Response` (app.py); it never touches a socket.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pitstop import __version__
from pitstop.ota.server.errors import ServerConfigError, ServerError

log = logging.getLogger(__name__)
access = logging.getLogger("pitstop.ota.server.access")

SERVER = f"pitstop/{__version__}"
HANDSHAKE_TIMEOUT_S = 10.0
_MAX_LINE = 65536
_local = threading.local()  # the connection the current thread serves
_SENDFILE_BLOCK = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-encoded, without the query
    query: dict[str, str]
    headers: Message
    body: bytes
    client: str  # the peer's address
    cert_cn: str | None  # the common name of a verified client certificate
    tls: bool

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else str(value)


@dataclass(frozen=True)
class FilePart:
    prefix: bytes  # sent before the slice (a multipart boundary and headers)
    offset: int
    length: int


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: BinaryIO | None = None  # closed by the transport once sent
    parts: tuple[FilePart, ...] = ()
    trailer: bytes = b""  # after the file parts (the closing multipart boundary)
    head: bool = False  # answer to HEAD: headers only
    note: str = ""  # for the access log: the device, what it was

    @property
    def length(self) -> int:
        if self.file is None:
            return len(self.body)
        return sum(len(p.prefix) + p.length for p in self.parts) + len(self.trailer)


class App(Protocol):
    def body_limit(self, method: str, path: str) -> int: ...

    def handle(self, req: Request) -> Response: ...


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT', ':PORT' (every interface) or 'PORT' → (host, port)."""
    host, port = "", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ServerConfigError(f"--listen {text!r}: expected [ADDRESS]:PORT")
        host, port = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ServerConfigError(f"--listen {text!r}: expected HOST:PORT with a port from 0 to 65535")
    return host or "0.0.0.0", int(port)  # noqa: S104 - ":PORT" asks for every interface


def tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context for `cert` (its chain) and `key`; with `client_ca`, clients must present a
    certificate issued under it (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise ServerConfigError(f"TLS: cannot read {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise ServerConfigError(
            f"TLS: cannot load the certificate {cert} with the key {key}: {getattr(e, 'reason', None) or e}"
        ) from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(client_ca)
        except (ssl.SSLError, OSError) as e:
            raise ServerConfigError(
                f"TLS: cannot load the client CA {client_ca}: {getattr(e, 'reason', None) or e}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _common_name(conn: socket.socket) -> str | None:
    if not isinstance(conn, ssl.SSLSocket):
        return None
    cert: Any = conn.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for attr in rdn:
            if attr[0] == "commonName":
                return str(attr[1])
    return None


class _Conn:
    """One connection as shutdown sees it: its socket, and whether it waits for a request."""

    __slots__ = ("idle", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle = False


class HttpServer:
    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        idle_timeout: float = 120.0,
        max_connections: int = 4096,
        workers: int = 16,
    ) -> None:
        self.app = app
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.stopping = False
        # At most `workers` requests are handled at once, the others wait in arrival order: with a thread per
        # connection and one GIL, a thousand runnable threads would otherwise be served in no order at all
        # (under saturation a few starved for over ten seconds while most were answered in milliseconds).
        self.workers = threading.BoundedSemaphore(workers)
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.httpd = _Server(self, (host, port), family)
        except OSError as e:
            raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        name = self.httpd.socket.getsockname()
        return str(name[0]), int(name[1])

    @property
    def url(self) -> str:
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="http-accept", daemon=True)
        self._thread.start()

    def shutdown(self, drain_s: float = 10.0) -> None:
        """Stop accepting, close idle connections, wait up to `drain_s` for requests under way."""
        self.stopping = True
        self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join()
        self.httpd.server_close()
        deadline = time.monotonic() + drain_s
        with self._lock:
            while self._conns:
                for c in list(self._conns):
                    if c.idle:
                        _cut(c.sock)
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d connections still busy at shutdown; closing them", len(self._conns))
                    for c in list(self._conns):
                        _cut(c.sock)
                    break
                self._drained.wait(min(left, 0.1))

    # -- connections, called by _Server -------------------------------------------------------------------

    def _admit(self, conn: _Conn) -> bool:
        with self._lock:
            if len(self._conns) >= self.max_connections or self.stopping:
                return False
            self._conns.add(conn)
            return True

    def _leave(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._drained.notify_all()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)


class _Server(HTTPServer):
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, owner: HttpServer, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.owner = owner
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would look the host name up (slow, and useless here).
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        conn = _Conn(request)
        if not self.owner._admit(conn):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                if self.owner.tls is None:
                    request.sendall(_plain(503, b"too many connections\n"))
            self.shutdown_request(request)
            return
        t = threading.Thread(
            target=self._serve_connection, args=(request, client_address, conn), name="http-conn", daemon=True
        )
        t.start()

    def _serve_connection(self, request: Any, client_address: Any, conn: _Conn) -> None:
        _local.conn = conn
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.owner._leave(conn)

    def finish_request(self, request: Any, client_address: Any) -> None:
        owner = self.owner
        conn: _Conn = _local.conn
        sock = request
        if owner.tls is not None:
            try:
                request.settimeout(HANDSHAKE_TIMEOUT_S)
                sock = owner.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.info("TLS handshake with %s failed: %s", client_address[0], getattr(e, "reason", None) or e)
                return
            conn.sock = sock
        try:
            _Handler(sock, client_address, self)
        except (ssl.SSLError, ConnectionError, TimeoutError):
            pass  # a client gone, a refused certificate reported at the first read (TLS 1.3): routine
        finally:
            if sock is not request:
                with contextlib.suppress(OSError):
                    sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("error on the connection from %s", client_address[0])


def _cut(sock: socket.socket) -> None:
    """Shut a connection down under the thread reading it (which then sees the end of its stream). The plain
    socket's shutdown even for TLS: SSLSocket.shutdown would also drop the TLS state that thread is using."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _plain(status: int, body: bytes) -> bytes:
    """A whole answer, for a connection refused before a handler exists (it is closed after)."""
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nServer: {SERVER}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER
    sys_version = ""
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.owner.idle_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.client_address[0], *args)

    def handle_one_request(self) -> None:
        # The standard library's, with the connection marked idle while it waits for a request line.
        state: _Conn = _local.conn
        try:
            state.idle = True
            try:
                self.raw_requestline = self.rfile.readline(_MAX_LINE + 1)
            finally:
                state.idle = False
            if len(self.raw_requestline) > _MAX_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self._dispatch()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True

    def _dispatch(self) -> None:
        start = time.perf_counter()
        owner = self.server.owner
        method = self.command
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path
        resp = self._read_and_handle(method, path, parts.query)
        if owner.stopping:
            self.close_connection = True
        sent = self._send(resp, method)
        if access.isEnabledFor(logging.INFO):
            access.info(
                "%s %s %s %d %d %.1fms%s",
                self.client_address[0],
                method,
                path,
                resp.status,
                sent,
                (time.perf_counter() - start) * 1000,
                f" {resp.note}" if resp.note else "",
            )

    def _read_and_handle(self, method: str, path: str, query: str) -> Response:
        app = self.server.owner.app
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return _error(411, "a request body needs a Content-Length (chunked bodies are not accepted)")
        length_text = self.headers.get("Content-Length") or "0"
        if not length_text.isdigit():
            self.close_connection = True
            return _error(400, "bad Content-Length")
        length = int(length_text)
        if length > app.body_limit(method, path):
            self.close_connection = True  # the body is not read: the connection cannot carry another request
            return _error(413, f"the request body is larger than the {app.body_limit(method, path)} bytes allowed")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            return _error(400, "the request body ended early")
        q = {k: v[0] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
        req = Request(
            method,
            path,
            q,
            self.headers,
            body,
            self.client_address[0],
            _common_name(self.connection),
            self.server.owner.tls is not None,
        )
        try:
            with self.server.owner.workers:
                return app.handle(req)
        except Exception:
            log.exception("%s %s failed", method, path)
            return _error(500, "internal error of the update server (see its log)")

    def _send(self, resp: Response, method: str) -> int:
        phrase = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
        lines = [
            f"HTTP/1.1 {resp.status} {phrase}",
            f"Server: {SERVER}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
        ]
        lines += [f"{k}: {v}" for k, v in resp.headers]
        if resp.status not in (204, 304):
            lines.append(f"Content-Length: {resp.length}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        body_wanted = method != "HEAD" and not resp.head and resp.status not in (204, 304)
        try:
            if resp.file is None:
                self.wfile.write(head + resp.body if body_wanted else head)
                return len(resp.body) if body_wanted else 0
            self.wfile.write(head)
            if not body_wanted:
                return 0
            sent = 0
            for part in resp.parts:
                if part.prefix:
                    self.wfile.write(part.prefix)
                    sent += len(part.prefix)
                sent += _send_slice(self.connection, resp.file, part.offset, part.length)
            if resp.trailer:
                self.wfile.write(resp.trailer)
                sent += len(resp.trailer)
            return sent
        except OSError:
            self.close_connection = True
            return 0
        finally:
            if resp.file is not None:
                resp.file.close()


def _send_slice(sock: socket.socket, f: BinaryIO, offset: int, length: int) -> int:
    """`length` bytes of `f` from `offset`: sendfile on a plain socket, reads and sends over TLS."""
    sent = 0
    while sent < length:
        n = sock.sendfile(f, offset + sent, min(_SENDFILE_BLOCK, length - sent))
        if n == 0:
            raise ConnectionError("the file ended before the range")
        sent += n
    return sent


def _error(status: int, message: str) -> Response:
    return Response(status, [("Content-Type", "application/json")], json.dumps({"message": message}).encode())
