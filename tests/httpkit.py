"""A real loopback HTTP(S) file server for tests: Range, byte counting, fault injection, TLS.

    with FileServer() as srv:
        url = srv.add("b.pitb", bundle_path)
        srv.faults = Faults(drop_at=(100_000, 900_000))
        ...  # download url
        srv.stats.body_bytes, srv.stats.connections

One `ThreadingHTTPServer` on 127.0.0.1 (ephemeral port), HTTP/1.1 with keep-alive, serving files held in
memory. Each response's body is written in blocks and counted as it goes; a cut connection counts only
the bytes handed to the client (an abrupt cut first waits until the kernel has sent what was queued).

Faults (`Faults`, settable at any time between requests):
- `drop_at`: file offsets; the first response to reach each one is cut there (each fires once);
- `drop_after` + `drop_responses`: the first M responses with a body are cut after K body bytes;
- `stall_at`: every response is cut when it reaches this offset (no progress past it, ever);
- `ignore_range`: answer every GET with 200 and the whole file;
- `unavailable`: answer 503 to the first N requests;
- `corrupt`: flip the byte at these file offsets in everything served;
- `abrupt`: cut with a TCP reset (SO_LINGER 0) rather than a clean FIN.

TLS (`make_tls(dir)`): a throwaway CA (made with `cryptography`) signs a server certificate for 127.0.0.1
and localhost and a client certificate; `FileServer(tls=..., require_client_cert=True)` asks for mutual TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from fcntl import ioctl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_BLOCK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class Faults:
    drop_at: tuple[int, ...] = ()
    drop_after: int | None = None
    drop_responses: int = 0
    stall_at: int | None = None
    ignore_range: bool = False
    unavailable: int = 0
    corrupt: tuple[int, ...] = ()
    abrupt: bool = True


@dataclass
class Stats:
    """What the server did since the last `reset_stats()`."""

    connections: int = 0         # TCP connections accepted (TLS: handshakes attempted)
    requests: int = 0            # HTTP requests answered (any status)
    body_bytes: int = 0          # response body bytes handed to clients
    drops: int = 0               # responses cut mid-body
    tls_failures: int = 0        # handshakes that failed (untrusted peer, missing client certificate)
    statuses: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)   # first file offset of each response with a body


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path          # a client certificate from another CA: the server must refuse it
    stranger_key: Path


class FileServer:
    def __init__(self, *, tls: TlsFiles | None = None, require_client_cert: bool = False,
                 faults: Faults | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.faults = faults or Faults()
        self.stats = Stats()
        self.lock = threading.Lock()
        self._fired: set[int] = set()     # drop_at offsets already used
        self._cut_responses = 0           # responses cut by drop_after
        self._ctx: ssl.SSLContext | None = None
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.server_cert, tls.server_key)
            if require_client_cert:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(tls.ca_cert)
            self._ctx = ctx
        self._httpd = _Server(self)
        self._thread: threading.Thread | None = None

    # -- API ----------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self._ctx else 'http'}://{host!s}:{port}"

    def add(self, name: str, content: bytes | Path) -> str:
        """Serve `content` at /name; returns its URL."""
        self.files[name] = content if isinstance(content, bytes) else content.read_bytes()
        return self.url(name)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def reset_stats(self, faults: Faults | None = None) -> Stats:
        """Start counting afresh (and optionally change the faults); returns the previous counts."""
        with self.lock:
            old, self.stats = self.stats, Stats()
            self._fired, self._cut_responses = set(), 0
            if faults is not None:
                self.faults = faults
        return old

    def __enter__(self) -> FileServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="httpkit", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- per response -----------------------------------------------------------------------------------

    def _count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _plan(self, start: int, end: int) -> tuple[int | None, Faults]:
        """Where to cut a response covering file bytes [start, end), if at all (absolute offset)."""
        with self.lock:
            f = self.faults
            cuts: list[int] = []
            for off in f.drop_at:
                if off not in self._fired and start <= off < end:
                    cuts.append(off)
            if f.stall_at is not None and start <= f.stall_at < end:
                cuts.append(f.stall_at)
            if f.drop_after is not None and self._cut_responses < f.drop_responses and start + f.drop_after < end:
                cuts.append(start + f.drop_after)
            if not cuts:
                return None, f
            cut = min(cuts)
            if cut in f.drop_at:
                self._fired.add(cut)
            elif f.drop_after is not None and cut == start + f.drop_after:
                self._cut_responses += 1
            return cut, f


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: FileServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        owner = self.owner
        owner._count(connections=1)
        conn = request
        if owner._ctx is not None:
            try:
                request.settimeout(10)
                conn = owner._ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                owner._count(tls_failures=1)
                request.close()
                return
        try:
            handler = _Handler(conn, client_address, self)
            if handler.cut:
                _reset(conn)
        except (ssl.SSLError, ConnectionError):
            # TLS 1.3 reports a refused client certificate after the handshake, on the first read.
            if conn is not request:
                owner._count(tls_failures=1)
        finally:
            if conn is not request:
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client going away mid-response is routine here


def _reset(conn: socket.socket) -> None:
    """Cut the connection with a TCP reset, once the kernel has sent what was already queued (so the
    bytes counted as served did reach the client)."""
    deadline = time.monotonic() + 2
    try:
        while time.monotonic() < deadline:
            buf = ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            if struct.unpack("i", buf)[0] == 0:
                break
            time.sleep(0.001)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers: no delayed-ACK stall per small range response
    timeout = 10
    server: _Server
    cut = False

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _status(self, code: int, headers: dict[str, str]) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.stats.requests += 1
            owner.stats.statuses.append(code)
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _serve(self, *, body: bool) -> None:
        owner = self.server.owner
        with owner.lock:
            unavailable = owner.stats.requests < owner.faults.unavailable
            faults = owner.faults
        if unavailable:
            self._status(503, {"Content-Length": "0", "Retry-After": "0"})
            return
        data = owner.files.get(self.path.lstrip("/"))
        if data is None:
            self._status(404, {"Content-Length": "0"})
            return
        size = len(data)
        start, end, code = 0, size, 200
        m = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if m and not faults.ignore_range and (m[1] or m[2]):
            if m[1]:
                start = int(m[1])
                end = min(size, int(m[2]) + 1) if m[2] else size
            else:
                start = max(0, size - int(m[2]))
            if start >= size or start >= end:
                self._status(416, {"Content-Length": "0", "Content-Range": f"bytes */{size}"})
                return
            code = 206
        headers = {"Content-Length": str(end - start), "Accept-Ranges": "none" if faults.ignore_range else "bytes",
                   "Content-Type": "application/octet-stream"}
        if code == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._status(code, headers)
        if not body:
            return
        with owner.lock:
            owner.stats.starts.append(start)
        cut, faults = owner._plan(start, end)
        stop = end if cut is None else cut
        pos = start
        while pos < stop:
            n = min(_BLOCK, stop - pos)
            block = bytearray(data[pos:pos + n])
            for off in faults.corrupt:
                if pos <= off < pos + n:
                    block[off - pos] ^= 0xFF
            try:
                self.wfile.write(block)
            except OSError:
                self.close_connection = True
                return
            owner._count(body_bytes=n)
            pos += n
        if cut is not None:
            owner._count(drops=1)
            self.close_connection = True
            if faults.abrupt:
                self.cut = True
            else:
                self.connection.shutdown(socket.SHUT_WR)


# -- TLS material ----------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str, *,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_tls(out: Path) -> TlsFiles:
    """A throwaway CA with a server certificate (127.0.0.1, localhost) and a client certificate, plus a
    client certificate from an unrelated CA; PEM files under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("httpkit test CA")
    files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem", out / "client.key",
                     out / "stranger.pem", out / "stranger.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cert_path, key_path, (key, cert) in (
        (files.server_cert, files.server_key, _leaf(ca_key, ca, "127.0.0.1", server=True)),
        (files.client_cert, files.client_key, _leaf(ca_key, ca, "device-0001", server=False)),
    ):
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
    other_key, other = _ca("httpkit stranger CA")
    key, cert = _leaf(other_key, other, "device-0001", server=False)
    files.stranger_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, files.stranger_key)
    return files
