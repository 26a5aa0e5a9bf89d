"""The hawkBit DDI subset pitstop's daemon uses, for every registered device: `/{tenant}/controller/v1/{id}…`.

- `GET {root}`: `config.polling.sleep`, and `_links`: `cancelAction` (an action to cancel), else
  `deploymentBase` (the action to run; its `?c=` changes with what the action says), `configData` (the
  attributes are wanted), `installedBase` (the last action that succeeded).
- `GET {root}/deploymentBase/{id}[?actionHistory=N]`: the action's download and update handling, its
  `maintenanceWindow` if it has one (update `skip` while it is closed), one chunk holding the bundle with its
  hashes and links. `POST …/feedback`: 200; 404 when it is not the device's action; 410 Gone once it is over.
- `GET {root}/cancelAction/{id}` → `{"id", "cancelAction": {"stopId"}}`, and its feedback as above.
- `PUT {root}/configData`: the attributes merged, replaced or removed.
- `GET {root}/installedBase/{id}`: the last successful action; `PUT {root}/installedBase`: a bundle installed
  without the server.
- `GET`/`HEAD {root}/softwaremodules/{id}/artifacts[/{file}[.MD5SUM]]`: the bundle with Range, If-Range, ETag
  (the quoted SHA-1) and If-None-Match; the module's artifact list; hawkBit's MD5SUM line.

Bodies are read as hawkBit reads them (unknown fields ignored; a wrong type or value is 400); JSON errors
carry hawkBit's `errorCode` and `message`. Authentication is auth.py's; an unknown device is 401 or 404.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pitstop.ota.server import artifacts, auth, deployments, devices, ranges
from pitstop.ota.server.deployments import Feedback, FeedbackResult
from pitstop.ota.server.errors import ConflictError, StoreError
from pitstop.ota.server.http import FilePart, Request, Response
from pitstop.ota.server.records import Action, ActionStatus, Distribution
from pitstop.ota.server.store import Store
from pitstop.ota.server.window import Window

log = logging.getLogger(__name__)

HAL = "application/hal+json;charset=UTF-8"
MAX_BODY = 1 << 20
EXECUTIONS = ("closed", "proceeding", "canceled", "scheduled", "rejected", "resumed", "downloaded", "download")
FINISHED = ("success", "failure", "none")
CONFIG_MODES = ("merge", "replace", "remove")
MAX_DETAILS = 50
MAX_DETAIL = 512
NOT_FOUND = "hawkbit.server.error.repo.entitiyNotFound"  # sic: hawkBit's own spelling
BAD_BODY = "hawkbit.server.error.rest.body.notReadable"
_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
_HISTORY_STATUS = {
    "running": "RUNNING",
    "canceling": "CANCELING",
    "success": "FINISHED",
    "failure": "ERROR",
    "canceled": "CANCELED",
    "scheduled": "SCHEDULED",
}


@dataclass(frozen=True)
class DdiSettings:
    tenant: str = "DEFAULT"
    poll_s: int = 300
    auto_register: bool = False
    public_url: str | None = None  # the base of links when devices reach the server through a proxy


def sleep_text(seconds: int) -> str:
    """hawkBit's polling sleep: HH:MM:SS (below a day; settings.py keeps it there)."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def error(status: int, message: str, code: str | None = None) -> Response:
    doc: dict[str, Any] = {"message": message}
    if code is not None:
        doc["errorCode"] = code
    return Response(status, [("Content-Type", HAL)], json.dumps(doc).encode())


def _ok(doc: Any = None, status: int = 200) -> Response:
    if doc is None:
        return Response(status)
    return Response(status, [("Content-Type", HAL)], json.dumps(doc, separators=(",", ":")).encode())


class BadBody(ValueError):
    pass


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadBody(f"the body is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise BadBody("the body is not a JSON object")
    return doc


def parse_feedback(body: bytes) -> Feedback:
    """A DdiActionFeedback: status.execution and status.result.finished required; details cut to hawkBit's
    limits (the last lines kept), code and progress optional."""
    doc = _parse_json(body)
    status = doc.get("status")
    if not isinstance(status, dict):
        raise BadBody("missing status")
    execution = status.get("execution")
    if execution not in EXECUTIONS:
        raise BadBody(f"status.execution must be one of {', '.join(EXECUTIONS)}")
    result = status.get("result")
    finished = result.get("finished") if isinstance(result, dict) else None
    if finished not in FINISHED:
        raise BadBody(f"status.result.finished must be one of {', '.join(FINISHED)}")
    progress = None
    raw = result.get("progress") if isinstance(result, dict) else None
    if raw is not None:
        cnt, of = (raw.get("cnt"), raw.get("of")) if isinstance(raw, dict) else (None, None)
        if not isinstance(cnt, int) or not isinstance(of, int) or not (_int(cnt) and _int(of)) or not 0 <= cnt <= of:
            raise BadBody("status.result.progress needs integers 0 <= cnt <= of")
        progress = (cnt, of)
    details = status.get("details") or []
    if not isinstance(details, list) or not all(isinstance(d, str) for d in details):
        raise BadBody("status.details must be a list of strings")
    code = status.get("code")
    if code is not None and not _int(code):
        raise BadBody("status.code must be an integer")
    lines = tuple(d[:MAX_DETAIL] for d in details[-MAX_DETAILS:])
    return Feedback(execution, finished, lines, code, progress)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def bundle_part(manifest: dict[str, Any]) -> str:
    """hawkBit's software module type: `os` for a bundle with a root filesystem, else `application`."""
    payloads = manifest.get("payloads") or []
    return "os" if any(isinstance(p, dict) and p.get("type") == "rootfs" for p in payloads) else "application"


class DdiApi:
    def __init__(
        self, store: Store, settings: DdiSettings, *, now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    ) -> None:
        self.store = store
        self.settings = settings
        self.now = now

    # -- entry ----------------------------------------------------------------------------------------------

    def handle(self, req: Request, device_id: str, rest: list[str]) -> Response:
        try:
            creds = auth.parse_authorization(req.header("Authorization"))
            known, token_hash, gateway = self.store.read(
                lambda c: (*devices.token_hash(c, device_id), devices.gateway_token_hash(c))
            )
            d = auth.decide(
                device_id,
                creds,
                known=known,
                device_token_hash=token_hash,
                gateway_token_hash=gateway,
                cert_cn=req.cert_cn,
                auto_register=self.settings.auto_register,
            )
            if d.outcome is auth.Outcome.UNAUTHORIZED:
                r = error(401, "not authorized for this device", "hawkbit.server.error.unauthorized")
                r.headers.append(("WWW-Authenticate", 'TargetToken realm="pitstop"'))
                return r
            if d.outcome is auth.Outcome.UNKNOWN:
                return error(404, f"no target {device_id!r}", NOT_FOUND)
            if d.outcome is auth.Outcome.REGISTER:
                self._register(device_id, d.adopt_token_hash)
            resp = self._route(req, device_id, rest)
        except StoreError as e:
            log.error("%s %s: %s", req.method, req.path, e.message)
            resp = error(503, "the update server cannot reach its database; try again later")
            resp.headers.append(("Retry-After", "30"))
        resp.note = device_id
        return resp

    def _register(self, device_id: str, adopt: str | None) -> None:
        def add(c: Any, now: float) -> None:
            if devices.get(c, device_id) is None:
                devices.add(c, now, device_id, group=None, token_hash=adopt, registered_by="auto")
                log.warning("device %r registered on its first request (auto-registration)", device_id)

        with contextlib.suppress(ConflictError):  # registered by a request of its own a moment ago
            self.store.write(add)

    def _route(self, req: Request, device_id: str, rest: list[str]) -> Response:
        m = req.method
        head = m == "HEAD"
        n = len(rest)
        if n == 0:
            return self._poll(req, device_id) if m == "GET" else _not_allowed("GET")
        kind = rest[0]
        if kind == "deploymentBase" and n == 2:
            return self._deployment(req, device_id, rest[1], installed=False) if m == "GET" else _not_allowed("GET")
        if kind == "deploymentBase" and n == 3 and rest[2] == "feedback":
            return self._feedback(req, device_id, rest[1], cancel=False) if m == "POST" else _not_allowed("POST")
        if kind == "cancelAction" and n == 2:
            return self._cancel(device_id, rest[1]) if m == "GET" else _not_allowed("GET")
        if kind == "cancelAction" and n == 3 and rest[2] == "feedback":
            return self._feedback(req, device_id, rest[1], cancel=True) if m == "POST" else _not_allowed("POST")
        if kind == "configData" and n == 1:
            return self._config_data(req, device_id) if m == "PUT" else _not_allowed("PUT")
        if kind == "installedBase" and n == 1:
            return self._installed_put(req, device_id) if m == "PUT" else _not_allowed("PUT")
        if kind == "installedBase" and n == 2:
            return self._deployment(req, device_id, rest[1], installed=True) if m == "GET" else _not_allowed("GET")
        if kind == "softwaremodules" and n in (3, 4) and rest[2] == "artifacts":
            if m not in ("GET", "HEAD"):
                return _not_allowed("GET, HEAD")
            return self._artifact(req, device_id, rest[1], rest[3] if n == 4 else None, head)
        return error(404, f"no such DDI resource: {req.path}", NOT_FOUND)

    # -- links ---------------------------------------------------------------------------------------------

    def _base(self, req: Request) -> str:
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        host = req.header("Host") or ""
        if not _HOST.fullmatch(host):
            host = "localhost"
        return f"{'https' if req.tls else 'http'}://{host}"

    def _root(self, req: Request, device_id: str) -> str:
        return (
            f"{self._base(req)}/{urllib.parse.quote(self.settings.tenant, safe='')}/controller/v1/"
            f"{urllib.parse.quote(device_id, safe='')}"
        )

    def _window(self, a: Action) -> tuple[str, str | None]:
        """(update handling as the device should see it now, maintenanceWindow or None)."""
        if a.window is None:
            return a.update, None
        if Window.parse(a.window).is_open(self.now()):
            return a.update, "available"
        return "skip", "unavailable"

    # -- resources ---------------------------------------------------------------------------------------------

    def _poll(self, req: Request, device_id: str) -> Response:
        def read(c: Any) -> tuple[Action | None, bool, int | None]:
            row = c.execute(
                "SELECT want_attributes, installed_action FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            return deployments.current_action(c, device_id), bool(row[0]), row[1]

        action, want, installed = self.store.read(read)
        self.store.touch(device_id, req.client)
        root = self._root(req, device_id)
        links: dict[str, Any] = {}
        if action is not None and action.status is ActionStatus.CANCELING:
            links["cancelAction"] = {"href": f"{root}/cancelAction/{action.id}"}
        elif action is not None:
            update, window = self._window(action)
            c = zlib.crc32(f"{action.id}:{action.download}:{update}:{window}".encode()) - (1 << 31)
            links["deploymentBase"] = {"href": f"{root}/deploymentBase/{action.id}?c={c}"}
        if installed is not None:
            links["installedBase"] = {"href": f"{root}/installedBase/{installed}"}
        if want:
            links["configData"] = {"href": f"{root}/configData"}
        return _ok({"config": {"polling": {"sleep": sleep_text(self.settings.poll_s)}}, "_links": links})

    def _deployment(self, req: Request, device_id: str, action_text: str, *, installed: bool) -> Response:
        if not action_text.isdigit():
            return error(404, f"no action {action_text!r}", NOT_FOUND)
        action_id = int(action_text)

        def read(c: Any) -> tuple[Action, Distribution, dict[str, Any], list[Any]] | None:
            a = deployments.device_action(c, device_id, action_id)
            if a is None or (installed and a.status is not ActionStatus.SUCCESS):
                return None
            history = []
            count = req.query.get("actionHistory")
            if count is not None:
                limit = None if count.strip() == "-1" or not count.strip().isdigit() else int(count)
                history = deployments.history(c, action_id, limit) if limit != 0 else []
            return (
                a,
                deployments.get_distribution(c, a.distribution_id),
                deployments.manifest(c, a.distribution_id),
                history,
            )

        found = self.store.read(read)
        if found is None:
            return error(404, f"no {'installed ' if installed else ''}action {action_id} for {device_id!r}", NOT_FOUND)
        a, dist, manifest, history = found
        update, window = self._window(a) if not installed else (a.update, None)
        root = self._root(req, device_id)
        dep: dict[str, Any] = {"download": a.download, "update": update}
        if window is not None:
            dep["maintenanceWindow"] = window
        dep["chunks"] = [{
            "part": bundle_part(manifest),
            "version": dist.version,
            "name": dist.name,
            "artifacts": [self._artifact_doc(req, root, dist)],
            "metadata": [{"key": "compatible", "value": dist.compatible},
                         {"key": "security_version", "value": str(dist.security_version)}],
        }]  # fmt: skip
        doc: dict[str, Any] = {"id": str(a.id), "deployment": dep}
        if "actionHistory" in req.query:
            messages = []
            for e in history:
                when = dt.datetime.fromtimestamp(e.time, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                what = e.execution if e.channel == "deployment" else f"{e.channel} {e.execution}"
                messages += [f"{when} {what}: {line}" for line in e.details] or [f"{when} {what}"]
            doc["actionHistory"] = {"status": _HISTORY_STATUS[a.status.value], "messages": messages}
        return _ok(doc)

    def _artifact_doc(self, req: Request, root: str, dist: Distribution) -> dict[str, Any]:
        href = f"{root}/softwaremodules/{dist.id}/artifacts/{urllib.parse.quote(dist.filename, safe='')}"
        links: dict[str, Any] = {}
        if req.tls or href.startswith("https:"):
            links["download"] = {"href": href}
            links["md5sum"] = {"href": href + ".MD5SUM"}
        links["download-http"] = {"href": href}
        links["md5sum-http"] = {"href": href + ".MD5SUM"}
        return {
            "filename": dist.filename,
            "hashes": {"sha1": dist.sha1, "md5": dist.md5, "sha256": dist.sha256},
            "size": dist.size,
            "_links": links,
        }

    def _feedback(self, req: Request, device_id: str, action_text: str, *, cancel: bool) -> Response:
        if not action_text.isdigit():
            return error(404, f"no action {action_text!r}", NOT_FOUND)
        try:
            fb = parse_feedback(req.body)
        except BadBody as e:
            return error(400, str(e), BAD_BODY)
        action_id = int(action_text)
        fn = deployments.cancel_feedback if cancel else deployments.deployment_feedback
        result = self.store.write(lambda c, now: fn(c, now, device_id, action_id, fb))
        if result is FeedbackResult.NOT_FOUND:
            return error(404, f"no {'cancel ' if cancel else ''}action {action_id} for {device_id!r}", NOT_FOUND)
        if result is FeedbackResult.GONE:
            return error(410, f"action {action_id} is closed", "hawkbit.server.error.action.closed")
        return _ok()

    def _cancel(self, device_id: str, action_text: str) -> Response:
        a = (
            self.store.read(lambda c: deployments.device_action(c, device_id, int(action_text)))
            if action_text.isdigit()
            else None
        )
        if a is None or a.status is not ActionStatus.CANCELING:
            return error(404, f"no cancel action {action_text!r} for {device_id!r}", NOT_FOUND)
        return _ok({"id": str(a.id), "cancelAction": {"stopId": str(a.id)}})

    def _config_data(self, req: Request, device_id: str) -> Response:
        try:
            doc = _parse_json(req.body)
            mode = doc.get("mode") or "merge"
            if mode not in CONFIG_MODES:
                raise BadBody(f"mode must be one of {', '.join(CONFIG_MODES)}")
            data = devices.check_attributes(doc.get("data"), mode)
        except ValueError as e:
            return error(400, str(e), BAD_BODY)
        try:
            self.store.write(lambda c, _now: devices.put_attributes(c, device_id, data, mode))
        except ValueError as e:
            return error(400, str(e), BAD_BODY)
        return _ok()

    def _installed_put(self, req: Request, device_id: str) -> Response:
        try:
            doc = _parse_json(req.body)
        except BadBody as e:
            return error(400, str(e), BAD_BODY)
        name, version = doc.get("name"), doc.get("version")
        if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
            return error(400, "name and version must be non-empty strings", BAD_BODY)
        self.store.write(lambda c, now: deployments.installed_offline(c, now, device_id, name, version))
        return _ok()

    def _artifact(self, req: Request, device_id: str, module: str, filename: str | None, head: bool) -> Response:
        dist = None
        if module.isdigit():

            def read(c: Any) -> Distribution | None:
                if not deployments.device_has_distribution(c, device_id, int(module)):
                    return None
                return deployments.get_distribution(c, int(module))

            dist = self.store.read(read)
        if dist is None:
            return error(404, f"no software module {module!r} assigned to {device_id!r}", NOT_FOUND)
        if filename is None:
            return _ok([self._artifact_doc(req, self._root(req, device_id), dist)])
        name = urllib.parse.unquote(filename)
        if name == dist.filename + ".MD5SUM":
            body = f"{dist.md5}  {dist.filename}\n".encode()
            return Response(200, [("Content-Type", "text/plain; charset=us-ascii")], body, head=head)
        if name != dist.filename:
            return error(404, f"no artifact {name!r} in software module {dist.id}", NOT_FOUND)
        return serve_file(self.store, req, dist, head)


def serve_file(store: Store, req: Request, dist: Distribution, head: bool) -> Response:
    etag = f'"{dist.sha1}"'
    common = [
        ("ETag", etag),
        ("Last-Modified", ranges.http_date(dist.created)),
        ("Accept-Ranges", "bytes"),
        ("Content-Disposition", f'attachment;filename="{dist.filename}"'),
    ]
    if ranges.none_match(req.header("If-None-Match"), etag):
        return Response(304, common)
    size = dist.size
    plan = ranges.parse_range(req.header("Range"), size)
    if plan.kind is not ranges.Kind.FULL and not ranges.if_range_holds(req.header("If-Range"), etag, dist.created):
        plan = ranges.Plan(ranges.Kind.FULL)
    if plan.kind is ranges.Kind.UNSATISFIABLE:
        return Response(416, [*common, ("Content-Range", f"bytes */{size}")])
    f = artifacts.open_artifact(store, dist.sha256)
    if plan.kind is ranges.Kind.FULL:
        return Response(
            200,
            [*common, ("Content-Type", "application/octet-stream")],
            file=f,
            parts=(FilePart(b"", 0, size),),
            head=head,
        )
    if len(plan.ranges) == 1:
        first, last = plan.ranges[0]
        return Response(
            206,
            [*common, ("Content-Type", "application/octet-stream"), ("Content-Range", f"bytes {first}-{last}/{size}")],
            file=f,
            parts=(FilePart(b"", first, last - first + 1),),
            head=head,
        )
    boundary = f"pitstop-{dist.sha1[:16]}"
    parts = tuple(
        FilePart(
            (
                f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n"
            ).encode(),
            first,
            last - first + 1,
        )
        for first, last in plan.ranges
    )
    return Response(
        206,
        [*common, ("Content-Type", f"multipart/byteranges; boundary={boundary}")],
        file=f,
        parts=parts,
        trailer=f"\r\n--{boundary}--\r\n".encode(),
        head=head,
    )


def _not_allowed(allow: str) -> Response:
    r = error(405, f"method not allowed here (allowed: {allow})")
    r.headers.append(("Allow", allow))
    return r
