"""daemon/ddi.py against a real loopback server that replays hawkBit's recorded bodies (tests/data/hawkbit, links
rewritten to the loopback address) and records every request: paths, methods, headers and bodies checked
against the DDI spec; TLS and mutual TLS; refusals, broken answers and the network failing; and a bundle
downloaded with resume through ota's HttpSource carrying the device token."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from httpkit import TlsFiles, make_tls
from test_daemon_ddi_model import (
    CANCEL_FEEDBACK_PATH,
    CONFIG_PATH,
    FEEDBACK_PATH,
    INSTALLED_PATH,
    check_schema,
    request_schema,
)

from pitstop import __version__
from pitstop.daemon.config import UpdateConfig
from pitstop.daemon.ddi import ACCEPT, MAX_BODY, USER_AGENT, DdiClient, DdiStatusError, GatewayToken, TargetToken
from pitstop.daemon.ddi_model import CancelAction, ConfigMode, Execution, Finished, bundle_artifact, parse_deployment
from pitstop.daemon.errors import DaemonConfigError, DdiError, UpstreamError
from pitstop.ota.http_source import HttpOptions, HttpSource

DATA = Path(__file__).parent / "data" / "hawkbit"
TENANT = "DEFAULT"
DEVICE = "dev-0001"
TOKEN = "2f8b0c5c4d9e4b7e9a1f0c3d5e7f9a1b"
ROOT = f"/{TENANT}/controller/v1/{DEVICE}"


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str                    # raw, still percent-encoded, without the query
    query: str
    headers: dict[str, str]      # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/hal+json"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False        # no Content-Length: the client can only count while it reads
    delay: float = 0.0           # seconds before answering


class DdiServer:
    """A hawkBit stand-in on 127.0.0.1: answers from `routes` {(method, path): Reply}, else 404 with an
    ExceptionInfo body like hawkBit's; serves `artifacts` {path: bytes} with Range; records everything."""

    def __init__(self, *, tls: TlsFiles | None = None, require_client_cert: bool = False) -> None:
        self.routes: dict[tuple[str, str], Reply] = {}
        self.artifacts: dict[str, bytes] = {}
        self.cut_artifact_at: int | None = None   # the next artifact response stops after this many bytes
        self.seen: list[Seen] = []
        self.sent_bytes = 0
        self.lock = threading.Lock()
        self.ctx: ssl.SSLContext | None = None
        if tls is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(tls.server_cert, tls.server_key)
            if require_client_cert:
                self.ctx.verify_mode = ssl.CERT_REQUIRED
                self.ctx.load_verify_locations(tls.ca_cert)
        self.httpd = _Server(self)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{'https' if self.ctx else 'http'}://{host!s}:{port}"

    def fixture(self, name: str, *, device: str = DEVICE) -> bytes:
        """A recorded body with its links pointed at this server, for this tenant and device."""
        text = (DATA / name).read_text()
        for host in ("https://management-api.host.com", "http://management-api.host.com",
                     "https://link-to-cdn.com", "http://link-to-cdn.com"):
            text = text.replace(host, self.base_url)
        return text.replace("TENANT_ID", TENANT).replace("CONTROLLER_ID", urllib.parse.quote(device, safe="")).encode()

    def reply(self, method: str, path: str, reply: Reply) -> None:
        self.routes[(method, path)] = reply

    def __enter__(self) -> DdiServer:
        self.thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: DdiServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn = request
        if self.owner.ctx is not None:
            try:
                request.settimeout(10)
                conn = self.owner.ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
        try:
            _Handler(conn, client_address, self)
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            if conn is not request:
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        with owner.lock:
            owner.seen.append(Seen(method, path, query, {k.lower(): v for k, v in self.headers.items()}, body))
        if method == "GET" and path in owner.artifacts:
            self._artifact(owner, owner.artifacts[path])
            return
        reply = owner.routes.get((method, path))
        if reply is None:
            info = {"exceptionClass": "org.eclipse.hawkbit.repository.exception.EntityNotFoundException",
                    "errorCode": "hawkbit.server.error.repo.entitiyNotFound",
                    "message": f"No resource at {path}"}
            reply = Reply(404, json.dumps(info).encode(), "application/json")
        if reply.delay:
            time.sleep(reply.delay)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunked(owner, reply.body)
            return
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def _chunked(self, owner: DdiServer, body: bytes) -> None:
        try:
            for off in range(0, len(body), 16384):
                block = body[off:off + 16384]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                with owner.lock:
                    owner.sent_bytes += len(block)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _artifact(self, owner: DdiServer, data: bytes) -> None:
        start = 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        with owner.lock:
            cut, owner.cut_artifact_at = owner.cut_artifact_at, None
        end = len(data) if cut is None else min(len(data), start + cut)
        self.wfile.write(data[start:end])
        if cut is not None:
            self.close_connection = True


# -- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[DdiServer]:
    with DdiServer() as s:
        yield s


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("ddi-tls"))


def client(srv: DdiServer, *, controller_id: str = DEVICE, **kw: Any) -> DdiClient:
    kw.setdefault("auth", TargetToken(TOKEN))
    return DdiClient(srv.base_url, TENANT, controller_id, **kw)


def only(srv: DdiServer) -> Seen:
    assert len(srv.seen) == 1, [(s.method, s.path) for s in srv.seen]
    return srv.seen[0]


def assert_headers(seen: Seen, *, body: bool, auth: str | None = f"TargetToken {TOKEN}") -> None:
    assert seen.headers["accept"] == ACCEPT == "application/hal+json, application/json;q=0.9"
    assert seen.headers.get("authorization") == auth
    assert seen.headers["user-agent"] == USER_AGENT == f"pitstop/{__version__} (hawkBit DDI)"
    if body:
        assert seen.headers["content-type"] == "application/json"
        assert int(seen.headers["content-length"]) == len(seen.body)
    else:
        assert "content-type" not in seen.headers and seen.body == b""


# -- poll, deployment, cancel ------------------------------------------------------------------------------


def test_poll_replays_hawkbit_example(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(body=srv.fixture("controller_base.json")))
    with client(srv) as c:
        base = c.poll()
    seen = only(srv)
    assert (seen.method, seen.path, seen.query) == ("GET", ROOT, "")
    assert_headers(seen, body=False)
    assert base.sleep_s == 43200
    assert base.deployment_href == f"{srv.base_url}{ROOT}/deploymentBase/5?c=-2127183556"
    assert base.installed_href == f"{srv.base_url}{ROOT}/installedBase/4"
    assert base.config_data_href == f"{srv.base_url}{ROOT}/configData"


@pytest.mark.parametrize(("auth", "header"), [
    (TargetToken(TOKEN), f"TargetToken {TOKEN}"), (GatewayToken("gw-secret"), "GatewayToken gw-secret"), (None, None)])
def test_authorization_header_exact(srv: DdiServer, auth: TargetToken | GatewayToken | None,
                                    header: str | None) -> None:
    srv.reply("GET", ROOT, Reply(body=b"{}"))
    client(srv, auth=auth).poll()
    assert_headers(only(srv), body=False, auth=header)


def test_token_stays_out_of_repr() -> None:
    assert TOKEN not in repr(TargetToken(TOKEN)) and "secret" not in repr(GatewayToken("secret"))


def test_controller_id_and_tenant_quoted(srv: DdiServer) -> None:
    odd = "dev 01/ä:x"
    root = f"/{TENANT}/controller/v1/dev%2001%2F%C3%A4%3Ax"
    srv.reply("GET", root, Reply(body=srv.fixture("controller_base.json", device=odd)))
    srv.reply("GET", f"{root}/deploymentBase/5", Reply(body=srv.fixture("deployment_pitstop.json", device=odd)))
    c = client(srv, controller_id=odd)
    base = c.poll()
    assert base.deployment_href is not None
    c.deployment(base.deployment_href)
    assert [(s.path, s.query) for s in srv.seen] == [(root, ""), (f"{root}/deploymentBase/5", "c=-2127183556")]


def test_deployment_and_bundle_artifact(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(body=srv.fixture("controller_base.json")))
    srv.reply("GET", f"{ROOT}/deploymentBase/5", Reply(body=srv.fixture("deployment_pitstop.json")))
    c = client(srv)
    base = c.poll()
    assert base.deployment_href is not None
    dep = c.deployment(base.deployment_href)
    seen = srv.seen[1]
    assert (seen.method, seen.path, seen.query) == ("GET", f"{ROOT}/deploymentBase/5", "c=-2127183556")
    assert_headers(seen, body=False)
    art = bundle_artifact(dep)
    assert (dep.action_id, art.filename) == ("5", "reference-2.0.0.pitb")
    assert art.download_url == f"{srv.base_url}{ROOT}/softwaremodules/24/artifacts/reference-2.0.0.pitb"


def test_installed_base_get(srv: DdiServer) -> None:
    srv.reply("GET", f"{ROOT}/installedBase/4", Reply(body=srv.fixture("deployment_base.json")))
    dep = client(srv).installed(f"{srv.base_url}{ROOT}/installedBase/4")
    assert dep.action_id == "8" and len(dep.chunks) == 3
    assert only(srv).path == f"{ROOT}/installedBase/4"


def test_links_go_to_the_configured_server(srv: DdiServer) -> None:
    """A proxy that writes its internal name or http:// into links: the request still goes to the server
    configured, never to the host in the link."""
    srv.reply("GET", f"{ROOT}/deploymentBase/5", Reply(body=srv.fixture("deployment_pitstop.json")))
    srv.reply("GET", f"/prefix{ROOT}/deploymentBase/5", Reply(body=srv.fixture("deployment_pitstop.json")))
    c = client(srv)
    c.deployment(f"http://hawkbit-internal:8080{ROOT}/deploymentBase/5?c=1")
    c.deployment(f"https://elsewhere.example/some/prefix{ROOT}/deploymentBase/5")
    assert [(s.path, s.query) for s in srv.seen] == [(f"{ROOT}/deploymentBase/5", "c=1"),
                                                     (f"{ROOT}/deploymentBase/5", "")]
    # A server URL with a path prefix keeps it.
    DdiClient(f"{srv.base_url}/prefix/", TENANT, DEVICE).deployment(f"https://x{ROOT}/deploymentBase/5")
    assert srv.seen[-1].path == f"/prefix{ROOT}/deploymentBase/5"


@pytest.mark.parametrize("href", [
    f"https://x/{TENANT}/controller/v1/other-device/deploymentBase/5",
    f"https://x{ROOT}", f"https://x{ROOT}/", f"https://x{ROOT}/../other/deploymentBase/5",
    f"https://x{ROOT}/deploymentBase//5", "https://x/softwaremodules/1/artifacts/a.pitb", "not a url",
])
def test_links_outside_the_device_refused(srv: DdiServer, href: str) -> None:
    with pytest.raises(DdiError, match="link outside this device's resource"):
        client(srv).deployment(href)
    assert srv.seen == []


def test_cancel_flow(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(body=srv.fixture("controller_base_cancel.json")))
    srv.reply("GET", f"{ROOT}/cancelAction/1234", Reply(body=srv.fixture("cancel_action.json")))
    srv.reply("POST", f"{ROOT}/cancelAction/1234/feedback", Reply(body=b""))
    c = client(srv)
    base = c.poll()
    assert base.sleep_s == 300 and base.cancel_href == f"{srv.base_url}{ROOT}/cancelAction/1234"
    cancel = c.cancel(base.cancel_href)
    assert cancel == CancelAction(action_id="1234", stop_id="1234")
    before = int(time.time() * 1000)
    c.cancel_feedback(cancel.action_id, Execution.CLOSED, Finished.SUCCESS, details=["cancellation confirmed"])
    after = int(time.time() * 1000)
    seen = srv.seen[-1]
    assert (seen.method, seen.path) == ("POST", f"{ROOT}/cancelAction/1234/feedback")
    assert_headers(seen, body=True)
    body = seen.json()
    check_schema(body, request_schema("POST", CANCEL_FEEDBACK_PATH))
    assert before <= body["timestamp"] <= after
    assert body["status"] == {"execution": "closed", "result": {"finished": "success"},
                              "details": ["cancellation confirmed"]}


# -- feedback, configData, installedBase --------------------------------------------------------------------


def test_feedback_sequence_field_by_field(srv: DdiServer) -> None:
    fb = f"{ROOT}/deploymentBase/5/feedback"
    srv.reply("POST", fb, Reply(body=b""))
    c = client(srv)
    before = int(time.time() * 1000)
    c.feedback("5", Execution.DOWNLOAD, Finished.NONE, details=["downloading reference-2.0.0.pitb"])
    c.feedback("5", Execution.DOWNLOADED, Finished.NONE, details=["downloaded 13 bytes"])
    c.feedback("5", Execution.PROCEEDING, Finished.NONE, progress=(1, 3), details=["installing into slot b"])
    c.feedback("5", Execution.PROCEEDING, Finished.NONE, progress=(2, 3), details=["rebooting into slot b"])
    c.feedback("5", Execution.CLOSED, Finished.SUCCESS, progress=(3, 3), details=["2.0.0 running from slot b"])
    c.feedback("5", Execution.CLOSED, Finished.FAILURE, details=["health gate failed", "rolled back to a"], code=17)
    after = int(time.time() * 1000)
    assert [(s.method, s.path, s.query) for s in srv.seen] == [("POST", fb, "")] * 6
    bodies = [s.json() for s in srv.seen]
    for seen, body in zip(srv.seen, bodies, strict=True):
        assert_headers(seen, body=True)
        check_schema(body, request_schema("POST", FEEDBACK_PATH))
        assert set(body) == {"timestamp", "status"}
        assert isinstance(body["timestamp"], int) and before <= body["timestamp"] <= after
    stamps = [b["timestamp"] for b in bodies]
    assert stamps == sorted(stamps)
    assert [b["status"] for b in bodies] == [
        {"execution": "download", "result": {"finished": "none"}, "details": ["downloading reference-2.0.0.pitb"]},
        {"execution": "downloaded", "result": {"finished": "none"}, "details": ["downloaded 13 bytes"]},
        {"execution": "proceeding", "result": {"finished": "none", "progress": {"cnt": 1, "of": 3}},
         "details": ["installing into slot b"]},
        {"execution": "proceeding", "result": {"finished": "none", "progress": {"cnt": 2, "of": 3}},
         "details": ["rebooting into slot b"]},
        {"execution": "closed", "result": {"finished": "success", "progress": {"cnt": 3, "of": 3}},
         "details": ["2.0.0 running from slot b"]},
        {"execution": "closed", "result": {"finished": "failure"}, "code": 17,
         "details": ["health gate failed", "rolled back to a"]},
    ]


def test_feedback_on_finished_action_is_410(srv: DdiServer) -> None:
    srv.reply("POST", f"{ROOT}/deploymentBase/5/feedback", Reply(410, b""))
    with pytest.raises(DdiStatusError, match=r"/deploymentBase/5/feedback: update server answered HTTP 410$") as e:
        client(srv).feedback("5", Execution.PROCEEDING, Finished.NONE)
    assert e.value.status == 410 and not e.value.transient


def test_config_data(srv: DdiServer) -> None:
    srv.reply("PUT", f"{ROOT}/configData", Reply(body=b""))
    c = client(srv)
    c.put_config_data({"VIN": "JH4TB2H26CC000000", "hwRevision": "2"})
    c.put_config_data({"slot": "b"}, ConfigMode.REPLACE)
    first, second = srv.seen
    for s in (first, second):
        assert (s.method, s.path) == ("PUT", f"{ROOT}/configData")
        assert_headers(s, body=True)
        check_schema(s.json(), request_schema("PUT", CONFIG_PATH))
    assert first.json() == json.loads((DATA / "config_data.json").read_text())   # hawkBit's own example
    assert second.json() == {"mode": "replace", "data": {"slot": "b"}}


def test_installed_base_put(srv: DdiServer) -> None:
    srv.reply("PUT", f"{ROOT}/installedBase", Reply(201, b""))
    client(srv).installed_base("pitstop-reference", "2.0.0")
    seen = only(srv)
    assert (seen.method, seen.path) == ("PUT", f"{ROOT}/installedBase")
    assert_headers(seen, body=True)
    check_schema(seen.json(), request_schema("PUT", INSTALLED_PATH))
    assert seen.json() == {"name": "pitstop-reference", "version": "2.0.0"}


def test_installed_base_unsupported(srv: DdiServer) -> None:
    with pytest.raises(DdiStatusError, match="HTTP 404: No resource at") as e:
        client(srv).installed_base("x", "1")
    assert e.value.status == 404


# -- refusals and broken answers -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_token_refused(srv: DdiServer, status: int) -> None:
    srv.reply("GET", ROOT, Reply(status, b'{"message":"Unauthorized"}', "application/json"))
    with pytest.raises(DdiStatusError, match="update server refused the device token") as e:
        client(srv).poll()
    assert e.value.status == status and isinstance(e.value, UpstreamError)


def test_unknown_device(srv: DdiServer) -> None:
    with pytest.raises(DdiStatusError, match=f"unknown device '{DEVICE}' on the update server") as e:
        client(srv).poll()
    assert e.value.status == 404


def test_404_elsewhere_is_not_unknown_device(srv: DdiServer) -> None:
    with pytest.raises(DdiStatusError) as e:
        client(srv).cancel(f"{srv.base_url}{ROOT}/cancelAction/77")
    assert str(e.value) == (f"GET {ROOT}/cancelAction/77: update server answered HTTP 404: "
                            f"No resource at {ROOT}/cancelAction/77 (hawkbit.server.error.repo.entitiyNotFound)")


def test_server_error_with_excerpt(srv: DdiServer) -> None:
    page = b"<html><body>\n  <h1>Internal   Server Error</h1>\n" + b"x" * 5000 + b"</body></html>"
    srv.reply("GET", ROOT, Reply(500, page, "text/html"))
    with pytest.raises(DdiStatusError) as e:
        client(srv).poll()
    msg = str(e.value)
    assert msg.startswith(f"GET {ROOT}: update server answered HTTP 500: <html><body> <h1>Internal Server Error</h1>")
    assert len(msg) < 300 and msg.endswith("…")
    assert e.value.status == 500 and e.value.transient


def test_429_is_transient(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(429, b""))
    with pytest.raises(DdiStatusError) as e:
        client(srv).poll()
    assert e.value.transient


def test_redirect_not_followed(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(302, b"", headers={"Location": f"http://evil.example{ROOT}"}))
    with pytest.raises(DdiStatusError, match=f"redirects to http://evil.example{ROOT}; point update.server at") as e:
        client(srv).poll()
    assert e.value.status == 302
    assert len(srv.seen) == 1


@pytest.mark.parametrize("body", [b'{"config": ', b"[]", b"\xff\xfe", b""])
def test_malformed_json(srv: DdiServer, body: bytes) -> None:
    srv.reply("GET", ROOT, Reply(body=body))
    with pytest.raises(DdiError, match=f"GET {ROOT}: the update server sent (malformed )?JSON"):
        client(srv).poll()


def test_missing_field_from_server(srv: DdiServer) -> None:
    body = json.loads(srv.fixture("deployment_pitstop.json"))
    del body["deployment"]["chunks"][0]["artifacts"][0]["size"]
    srv.reply("GET", f"{ROOT}/deploymentBase/5", Reply(body=json.dumps(body).encode()))
    with pytest.raises(DdiError, match=r"missing field deployment\.chunks\[0\]\.artifacts\[0\]\.size"):
        client(srv).deployment(f"{srv.base_url}{ROOT}/deploymentBase/5")


def test_oversize_body_by_length(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(body=b'{"x":"' + b"a" * MAX_BODY + b'"}'))
    with pytest.raises(DdiError, match=f"the answer is {MAX_BODY + 8} bytes, more than the {MAX_BODY} allowed"):
        client(srv).poll()


def test_oversize_body_cut_while_reading(srv: DdiServer) -> None:
    """No Content-Length: the client stops reading past the cap, long before the server is done."""
    total = 64 << 20
    srv.reply("GET", ROOT, Reply(body=b'{"x":"' + b"a" * total + b'"}', chunked=True))
    with pytest.raises(DdiError, match=f"more than the {MAX_BODY} bytes allowed"):
        client(srv).poll()
    time.sleep(0.2)
    assert srv.sent_bytes < total // 4


def test_small_cap_is_configurable(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(body=srv.fixture("controller_base.json"), chunked=True))
    with pytest.raises(DdiError, match="more than the 100 bytes allowed"):
        client(srv, max_body=100).poll()
    assert client(srv).poll().sleep_s == 43200   # chunked and under the cap: fine


# -- the network failing ------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_connection_refused_is_upstream_error() -> None:
    c = DdiClient(f"http://127.0.0.1:{_closed_port()}", TENANT, DEVICE, auth=TargetToken(TOKEN))
    pattern = rf"^update server http://127\.0\.0\.1:[0-9]+: GET {ROOT}: connection failed$"
    with pytest.raises(UpstreamError, match=pattern) as e:
        c.poll()
    assert not isinstance(e.value, DdiError)
    assert TOKEN not in str(e.value)


def test_timeout_is_upstream_error(srv: DdiServer) -> None:
    srv.reply("GET", ROOT, Reply(body=b"{}", delay=1.0))
    with pytest.raises(UpstreamError, match="timed out") as e:
        client(srv, read_timeout=0.2).poll()
    assert not isinstance(e.value, DdiError)


def test_connection_cut_mid_answer_is_upstream_error() -> None:
    """The server promises more than it sends and closes."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    def serve() -> None:
        conn, _ = lsock.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"conf")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(UpstreamError) as e:
            DdiClient(f"http://127.0.0.1:{port}", TENANT, DEVICE).poll()
        assert not isinstance(e.value, DdiError)
    finally:
        t.join(5)
        lsock.close()


# -- TLS ---------------------------------------------------------------------------------------------------


def test_mutual_tls(tls: TlsFiles) -> None:
    with DdiServer(tls=tls, require_client_cert=True) as srv:
        srv.reply("GET", ROOT, Reply(body=srv.fixture("controller_base.json")))
        base = client(srv, ca=tls.ca_cert, client_cert=tls.client_cert, client_key=tls.client_key).poll()
        assert base.sleep_s == 43200
        assert srv.base_url.startswith("https://")
        assert_headers(only(srv), body=False)


def test_tls_untrusted_server(tls: TlsFiles) -> None:
    with DdiServer(tls=tls) as srv, pytest.raises(UpstreamError, match="TLS failed: certificate verify failed") as e:
        client(srv).poll()   # the system's CAs do not know the test CA
    assert not isinstance(e.value, DdiError)


@pytest.mark.parametrize("who", ["none", "stranger"])
def test_tls_client_certificate_refused(tls: TlsFiles, who: str) -> None:
    certs: dict[str, Any] = {} if who == "none" else {"client_cert": tls.stranger_cert,
                                                       "client_key": tls.stranger_key}
    with DdiServer(tls=tls, require_client_cert=True) as srv:
        with pytest.raises(UpstreamError) as e:
            client(srv, ca=tls.ca_cert, **certs).poll()
        assert not isinstance(e.value, DdiError)
        assert srv.seen == []


def test_ca_wins_over_environment(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$REQUESTS_CA_BUNDLE must not replace the configured CA."""
    other = make_tls(tmp_path / "other")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other.ca_cert))
    with DdiServer(tls=tls) as srv:
        srv.reply("GET", ROOT, Reply(body=b"{}"))
        assert client(srv, ca=tls.ca_cert).poll().sleep_s is None


# -- artifacts through ota's HttpSource ---------------------------------------------------------------------


def _download(url: str, c: DdiClient, opts: HttpOptions | None = None) -> bytes:
    opts = dataclasses.replace(opts or c.artifact_http_options(url), backoff=0.01)
    out = bytearray()
    with HttpSource(url, opts) as src:
        while block := src.read(1 << 20):
            out += block
    return bytes(out)


def test_artifact_download_with_token_and_resume(srv: DdiServer) -> None:
    payload = random.Random(7).randbytes(3 << 20)
    srv.reply("GET", f"{ROOT}/deploymentBase/5", Reply(body=srv.fixture("deployment_pitstop.json")))
    c = client(srv)
    art = bundle_artifact(c.deployment(f"{srv.base_url}{ROOT}/deploymentBase/5"))
    url, opts = c.artifact_source(art)
    assert url == art.download_url
    path = urllib.parse.urlsplit(url).path
    srv.artifacts[path] = payload
    srv.cut_artifact_at = 1 << 20
    assert _download(url, c, opts) == payload
    downloads = [s for s in srv.seen if s.path == path]
    assert len(downloads) == 2
    assert [d.headers.get("range") for d in downloads] == [None, f"bytes={1 << 20}-"]
    for d in downloads:
        assert d.headers["authorization"] == f"TargetToken {TOKEN}"


def test_artifact_link_from_behind_a_proxy(srv: DdiServer) -> None:
    """hawkBit's default artifact link follows the request's scheme and host: behind a proxy that does not
    forward them it names the internal address. A link into the device's resource goes to the server."""
    art = dataclasses.replace(
        bundle_artifact(parse_deployment(json.loads(srv.fixture("deployment_pitstop.json")))),
        download_url=f"http://hawkbit-internal:8080{ROOT}/softwaremodules/24/artifacts/reference-2.0.0.pitb")
    url, opts = client(srv).artifact_source(art)
    assert url == f"{srv.base_url}{ROOT}/softwaremodules/24/artifacts/reference-2.0.0.pitb"
    srv.artifacts[urllib.parse.urlsplit(url).path] = b"bundle"
    assert _download(url, client(srv), opts) == b"bundle"
    assert only(srv).headers["authorization"] == f"TargetToken {TOKEN}"
    # A link elsewhere (a CDN) is left as it is, without the token.
    cdn = dataclasses.replace(art, download_url="https://cdn.example/a/b.pitb")
    assert client(srv).artifact_source(cdn) == ("https://cdn.example/a/b.pitb",
                                                client(srv).artifact_http_options("https://cdn.example/a/b.pitb"))
    assert client(srv).artifact_source(cdn)[1].headers == ()


def test_artifact_on_another_origin_gets_no_token(srv: DdiServer) -> None:
    with DdiServer() as cdn:
        cdn.artifacts["/files/b.pitb"] = b"bundle bytes"
        c = client(srv)
        url = f"{cdn.base_url}/files/b.pitb"
        assert c.artifact_http_options(url).headers == ()
        assert _download(url, c) == b"bundle bytes"
        assert "authorization" not in only(cdn).headers
    # Same host, other port or scheme: another origin too.
    host, port = srv.httpd.server_address[:2]
    assert c.artifact_http_options(f"http://{host!s}:{int(port) + 1}/x").headers == ()
    assert c.artifact_http_options(f"https://{host!s}:{port}/x").headers == ()
    assert c.artifact_http_options(f"{srv.base_url}/x").headers == (("Authorization", f"TargetToken {TOKEN}"),)
    assert client(srv, auth=None).artifact_http_options(f"{srv.base_url}/x").headers == ()


def test_artifact_download_over_mutual_tls(tls: TlsFiles) -> None:
    with DdiServer(tls=tls, require_client_cert=True) as srv:
        c = client(srv, auth=GatewayToken("gw"), ca=tls.ca_cert, client_cert=tls.client_cert,
                   client_key=tls.client_key, connect_timeout=3.0, read_timeout=4.0)
        opts = c.artifact_http_options(f"{srv.base_url}/a.pitb")
        assert (opts.ca, opts.client_cert, opts.client_key) == (tls.ca_cert, tls.client_cert, tls.client_key)
        assert (opts.connect_timeout, opts.read_timeout) == (3.0, 4.0)
        srv.artifacts["/a.pitb"] = b"x" * 100_000
        assert _download(f"{srv.base_url}/a.pitb", c) == b"x" * 100_000
        assert only(srv).headers["authorization"] == "GatewayToken gw"


# -- configuration ------------------------------------------------------------------------------------------


def test_from_config(tls: TlsFiles) -> None:
    cfg = UpdateConfig(server="https://hawkbit.example/", tenant="acme", controller_id="dev-9", token="t",
                       gateway_token="g", ca_file=tls.ca_cert, client_cert=tls.client_cert,
                       client_key=tls.client_key)
    c = DdiClient.from_config(cfg)
    assert c.auth == TargetToken("t")                       # the device's own token wins
    assert c.root == "https://hawkbit.example/acme/controller/v1/dev-9"
    assert (c.ca, c.client_cert, c.client_key) == (tls.ca_cert, tls.client_cert, tls.client_key)
    assert DdiClient.from_config(dataclasses.replace(cfg, token=None)).auth == GatewayToken("g")
    assert DdiClient.from_config(dataclasses.replace(cfg, token=None, gateway_token=None)).auth is None
    with pytest.raises(DaemonConfigError, match=r"update\.server is not set"):
        DdiClient.from_config(dataclasses.replace(cfg, server=None))
    with pytest.raises(DaemonConfigError, match=r"update\.controller_id is not set"):
        DdiClient.from_config(dataclasses.replace(cfg, controller_id=None))


@pytest.mark.parametrize("url", ["hawkbit.example", "ftp://hawkbit.example", "https://", "https://h/?x=1"])
def test_bad_server_url(url: str) -> None:
    with pytest.raises(DaemonConfigError, match="expected http"):
        DdiClient(url, TENANT, DEVICE)
