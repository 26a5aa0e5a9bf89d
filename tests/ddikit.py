"""A stateful hawkBit stand-in for one target on 127.0.0.1, for the update agent's tests.

It keeps what hawkBit keeps for a target: the assigned action (distribution set with artifacts, download and
update handling, maintenance window), the action's status from the device's feedback (a `closed` feedback
ends it; later feedback is answered 410 Gone, as hawkBit does), a cancel request, and whether the target's
attributes are wanted. The JSON it answers has the shape of the recorded hawkBit bodies in data/hawkbit/
(tests/test_daemon_ddi.py replays those byte for byte). Artifacts are served by httpkit.FileServer (Range,
faults), as a CDN would. `down = True` makes every request fail with 503, as an unreachable proxy would.

    with HawkbitTarget(token="t") as srv, FileServer() as cdn:
        srv.assign("7", cdn.add("v2.pitb", path), size=..., sha256=...)
        ...  # the agent polls srv.base_url
        srv.feedback("7")  # [(execution, finished, details), ...]
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

TENANT = "DEFAULT"


@dataclass
class Action:
    id: str
    url: str
    filename: str
    size: int
    sha256: str
    download: str = "forced"
    update: str = "forced"
    window: str | None = None  # "available" | "unavailable" | None (no maintenance schedule)
    closed: bool = False
    canceled: bool = False
    feedback: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (execution, finished, details)


class HawkbitTarget:
    def __init__(self, device: str = "dev-0001", *, token: str = "target-token", sleep: str = "00:00:30") -> None:
        self.device = device
        self.token = token
        self.sleep = sleep
        self.actions: dict[str, Action] = {}
        self.current: str | None = None  # the action the target is asked to run
        self.cancel_of: str | None = None  # the action the server asks the target to cancel
        self.cancel_feedback: list[tuple[str, str, list[str]]] = []
        self.want_attributes = True
        self.attributes: dict[str, str] = {}
        self.down = False
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization)
        self.lock = threading.Lock()
        self.httpd = _Server(self)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def root(self) -> str:
        return f"/{TENANT}/controller/v1/{urllib.parse.quote(self.device, safe='')}"

    def assign(
        self, action_id: str, url: str, *, size: int, sha256: str, filename: str = "update.pitb", **kw: Any
    ) -> Action:
        with self.lock:
            a = Action(action_id, url, filename, size, sha256, **kw)
            self.actions[action_id] = a
            self.current = action_id
            return a

    def cancel(self, action_id: str) -> None:
        with self.lock:
            self.cancel_of = action_id

    def feedback(self, action_id: str) -> list[tuple[str, str, list[str]]]:
        with self.lock:
            return list(self.actions[action_id].feedback)

    def executions(self, action_id: str) -> list[str]:
        return [e for e, _, _ in self.feedback(action_id)]

    def final(self, action_id: str) -> list[tuple[str, str, list[str]]]:
        return [f for f in self.feedback(action_id) if f[0] == "closed"]

    # -- what hawkBit answers ----------------------------------------------------------------------------------

    def _link(self, path: str) -> dict[str, str]:
        return {"href": f"{self.base_url}{self.root}{path}"}

    def controller_base(self) -> dict[str, Any]:
        links: dict[str, Any] = {}
        if self.cancel_of is not None:
            links["cancelAction"] = self._link(f"/cancelAction/{self.cancel_of}")
        elif self.current is not None:
            links["deploymentBase"] = self._link(f"/deploymentBase/{self.current}?c=-2129030598")
        if self.want_attributes:
            links["configData"] = self._link("/configData")
        return {"config": {"polling": {"sleep": self.sleep}}, "_links": links}

    def deployment(self, a: Action) -> dict[str, Any]:
        dep: dict[str, Any] = {
            "download": a.download,
            "update": a.update,
            "chunks": [{
                "part": "os",
                "version": a.id,
                "name": "pitstop test image",
                "artifacts": [{
                    "filename": a.filename,
                    "hashes": {"sha256": a.sha256},
                    "size": a.size,
                    "_links": {"download-http": {"href": a.url}},
                }],
            }],
        }  # fmt: skip
        if a.window is not None:
            dep["maintenanceWindow"] = a.window
        return {"id": a.id, "deployment": dep, "actionHistory": {"status": "RUNNING", "messages": []}}

    def handle(self, method: str, path: str, auth: str, body: bytes) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((method, path, auth))
            if self.down:
                return 503, {"message": "unavailable"}
            if auth != f"TargetToken {self.token}":
                return 401, {"message": "unauthorized"}
            if not path.startswith(self.root):
                return 404, {"errorCode": "hawkbit.server.error.repo.entitiyNotFound"}
            rest = path[len(self.root) :]
            parts = rest.strip("/").split("/") if rest.strip("/") else []
            if method == "GET" and not parts:
                return 200, self.controller_base()
            if method == "PUT" and parts == ["configData"]:
                doc = json.loads(body)
                self.attributes.update(doc["data"])
                self.want_attributes = False
                return 200, None
            if len(parts) >= 2 and parts[0] == "deploymentBase":
                a = self.actions.get(parts[1])
                if a is None:
                    return 404, {"errorCode": "hawkbit.server.error.repo.entitiyNotFound"}
                if method == "GET" and len(parts) == 2:
                    return 200, self.deployment(a)
                if method == "POST" and parts[2:] == ["feedback"]:
                    if a.closed or a.canceled:
                        return 410, {"errorCode": "hawkbit.server.error.action.closed"}
                    st = json.loads(body)["status"]
                    a.feedback.append((st["execution"], st["result"]["finished"], list(st.get("details", []))))
                    if st["execution"] == "closed":
                        a.closed = True
                        if self.current == a.id:
                            self.current = None
                    return 200, None
            if len(parts) >= 2 and parts[0] == "cancelAction" and parts[1] == self.cancel_of:
                if method == "GET" and len(parts) == 2:
                    return 200, {"id": parts[1], "cancelAction": {"stopId": parts[1]}}
                if method == "POST" and parts[2:] == ["feedback"]:
                    st = json.loads(body)["status"]
                    self.cancel_feedback.append((st["execution"], st["result"]["finished"], list(st["details"])))
                    a = self.actions[parts[1]]
                    if st["execution"] == "closed":
                        a.canceled = True
                        self.current = None if self.current == a.id else self.current
                        self.cancel_of = None
                    elif st["execution"] == "rejected":
                        self.cancel_of = None
                    return 200, None
            return 404, {"errorCode": "hawkbit.server.error.repo.entitiyNotFound"}

    def __enter__(self) -> HawkbitTarget:
        self.thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: HawkbitTarget) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.target = target


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self, method: str) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        path = urllib.parse.urlsplit(self.path).path
        status, doc = self.server.target.handle(method, path, self.headers.get("Authorization", ""), body)
        out = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/hal+json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        pass
