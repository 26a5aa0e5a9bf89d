"""The hawkBit DDI client the update agent uses: one requests.Session, TLS and mTLS, capped reads.

    client = DdiClient.from_config(cfg.update)
    base = client.poll()
    if base.deployment_href:
        dep = client.deployment(base.deployment_href)
        client.feedback(dep.action_id, Execution.DOWNLOAD, Finished.NONE, details=["downloading"])
        url, http = client.artifact_source(bundle_artifact(dep))
        install(url, http=http)

Every request goes to the configured server: a link the server returns is reduced to its part below
`/{tenant}/controller/v1/{controllerId}/` and sent there, so a reverse proxy that writes internal host
names or http:// into links does not send the device's token elsewhere. hawkBit's default artifact links
lie in that resource too and are treated alike; links elsewhere (a CDN) are used as they are, and the
token is added to a download only on the server's own origin.

Errors: the network (refused, timed out, TLS, cut) → UpstreamError, for the agent to retry with
back-off; an answer the client cannot use → DdiError (DdiStatusError when it is an HTTP status).
docs/ddi.md describes the exchange.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from pitstop import __version__
from pitstop.daemon.config import UpdateConfig
from pitstop.daemon.ddi_model import (
    Artifact,
    CancelAction,
    ConfigMode,
    ControllerBase,
    Deployment,
    Execution,
    Finished,
    config_data_body,
    feedback_body,
    installed_base_body,
    parse_cancel,
    parse_controller_base,
    parse_deployment,
    parse_json,
)
from pitstop.daemon.errors import DaemonConfigError, DdiError, UpstreamError
from pitstop.ota.http_source import HttpOptions, describe_error

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20        # DDI documents are a few KiB; a bigger answer is refused while it is read
ACCEPT = "application/hal+json, application/json;q=0.9"
USER_AGENT = f"pitstop/{__version__} (hawkBit DDI)"
_EXCERPT = 200


@dataclass(frozen=True)
class TargetToken:
    """The device's own security token (hawkBit: "Allow targets to authenticate via security token")."""

    token: str = field(repr=False)

    def header(self) -> str:
        return f"TargetToken {self.token}"


@dataclass(frozen=True)
class GatewayToken:
    """The tenant's gateway token, shared by devices behind a gateway ("… via gateway security token")."""

    token: str = field(repr=False)

    def header(self) -> str:
        return f"GatewayToken {self.token}"


Auth = TargetToken | GatewayToken


class DdiStatusError(DdiError):
    """The server answered an HTTP error status; `status` lets the agent tell 410 (action gone) or 429/5xx
    (try later) from a refusal."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status in (408, 425, 429) or self.status >= 500


class DdiClient:
    """One device's DDI resource: `{base_url}/{tenant}/controller/v1/{controller_id}`."""

    def __init__(self, base_url: str, tenant: str, controller_id: str, *, auth: Auth | None = None,
                 ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 30.0,
                 session: requests.Session | None = None, max_body: int = MAX_BODY) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise DaemonConfigError(f"update server {base_url!r}: expected http(s)://host[:port][/prefix]")
        if not tenant or not controller_id:
            raise DaemonConfigError("update server: tenant and controller id must not be empty")
        self.base_url = base_url.rstrip("/")
        self.tenant = tenant
        self.controller_id = controller_id
        self.root = (f"{self.base_url}/{urllib.parse.quote(tenant, safe='')}/controller/v1/"
                     f"{urllib.parse.quote(controller_id, safe='')}")
        self.auth = auth
        self.ca, self.client_cert, self.client_key = ca, client_cert, client_key
        self.timeouts = (connect_timeout, read_timeout)
        self.max_body = max_body
        self.session = session or requests.Session()
        # Per request as well: a session-wide `verify` loses to $REQUESTS_CA_BUNDLE (see ota/http_source.py).
        self._verify: str | bool = str(ca) if ca else True
        self.session.verify = self._verify
        if client_cert:
            self.session.cert = (str(client_cert), str(client_key)) if client_key else str(client_cert)

    @classmethod
    def from_config(cls, cfg: UpdateConfig, *, session: requests.Session | None = None) -> DdiClient:
        """A client for the [update] section; the target token wins over a gateway token when both are set."""
        if not cfg.server:
            raise DaemonConfigError("update.server is not set (pitstop.toml [update] or identity/upstream.toml)")
        if not cfg.controller_id:
            raise DaemonConfigError("update.controller_id is not set and no device id was provisioned")
        auth: Auth | None = None
        if cfg.token:
            auth = TargetToken(cfg.token)
        elif cfg.gateway_token:
            auth = GatewayToken(cfg.gateway_token)
        return cls(cfg.server, cfg.tenant, cfg.controller_id, auth=auth, ca=cfg.ca_file,
                   client_cert=cfg.client_cert, client_key=cfg.client_key, session=session)

    # -- resources --------------------------------------------------------------------------------------

    def poll(self) -> ControllerBase:
        """GET the controller base: the server's sleep and links to what it wants done."""
        return parse_controller_base(self._get_json(self.root, unknown_device=True))

    def deployment(self, href: str) -> Deployment:
        """GET a deploymentBase link from poll()."""
        return parse_deployment(self._get_json(self._resolve(href)))

    def installed(self, href: str) -> Deployment:
        """GET an installedBase link from poll(): the last finished action, in the deployment format."""
        return parse_deployment(self._get_json(self._resolve(href)))

    def cancel(self, href: str) -> CancelAction:
        """GET a cancelAction link from poll()."""
        return parse_cancel(self._get_json(self._resolve(href)))

    def feedback(self, action_id: str, execution: Execution, finished: Finished, *,
                 progress: tuple[int, int] | None = None, details: Sequence[str] = (),
                 code: int | None = None) -> None:
        """POST feedback on a deployment action (DdiStatusError with status 410: the action is over)."""
        body = feedback_body(execution, finished, timestamp_ms=_now_ms(), progress=progress, details=details,
                             code=code)
        self._send("POST", f"{self.root}/deploymentBase/{_seg(action_id)}/feedback", body)

    def cancel_feedback(self, action_id: str, execution: Execution, finished: Finished, *,
                        details: Sequence[str] = (), code: int | None = None) -> None:
        """POST feedback on a cancel action: closed+success confirms the cancellation, rejected refuses it,
        closed+failure says it could not be done."""
        body = feedback_body(execution, finished, timestamp_ms=_now_ms(), details=details, code=code)
        self._send("POST", f"{self.root}/cancelAction/{_seg(action_id)}/feedback", body)

    def put_config_data(self, attributes: Mapping[str, str], mode: ConfigMode = ConfigMode.MERGE) -> None:
        """PUT the device's attributes (hardware revision, versions, …) as the server's configData asks."""
        self._send("PUT", f"{self.root}/configData", config_data_body(attributes, mode))

    def installed_base(self, name: str, version: str) -> None:
        """PUT /installedBase: tell the server which distribution set (name, version) now runs, after an
        offline install (hawkBit marks this call experimental; a server without it answers 404 or 405)."""
        self._send("PUT", f"{self.root}/installedBase", installed_base_body(name, version))

    def artifact_source(self, artifact: Artifact) -> tuple[str, HttpOptions]:
        """The URL and HttpOptions to download `artifact` with ota's HttpSource (Range resume, retries)."""
        url = self._inside(artifact.download_url) or artifact.download_url
        return url, self.artifact_http_options(url)

    def artifact_http_options(self, url: str) -> HttpOptions:
        """HttpOptions for downloading `url` with ota's HttpSource (Range resume, retries): the same TLS
        settings, and the auth header only when `url` is on the server's own origin."""
        headers: tuple[tuple[str, str], ...] = ()
        if self.auth is not None and _origin(url) == _origin(self.base_url):
            headers = (("Authorization", self.auth.header()),)
        return HttpOptions(ca=self.ca, client_cert=self.client_cert, client_key=self.client_key, headers=headers,
                           connect_timeout=self.timeouts[0], read_timeout=self.timeouts[1])

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DdiClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------------------------

    def _resolve(self, href: str) -> str:
        """The configured server's URL for a link the server returned (see the module docstring)."""
        url = self._inside(href)
        if url is None:
            raise DdiError(f"the update server sent a link outside this device's resource: {href[:200]!r}")
        return url

    def _inside(self, href: str) -> str | None:
        """`href` moved to the configured server when it lies below this device's controller resource."""
        parts = urllib.parse.urlsplit(href)
        segs = parts.path.split("/")
        for i in range(len(segs) - 2):
            if (segs[i] == "controller" and segs[i + 1] == "v1"
                    and urllib.parse.unquote(segs[i + 2]) == self.controller_id):
                rest = segs[i + 3:]
                if rest and all(s and s not in (".", "..") for s in rest):
                    query = f"?{parts.query}" if parts.query else ""
                    return f"{self.root}/{'/'.join(rest)}{query}"
                return None
        return None

    def _headers(self, body: bool) -> dict[str, str]:
        headers = {"Accept": ACCEPT, "User-Agent": USER_AGENT}
        if body:
            headers["Content-Type"] = "application/json"
        if self.auth is not None:
            headers["Authorization"] = self.auth.header()
        return headers

    def _get_json(self, url: str, *, unknown_device: bool = False) -> dict[str, Any]:
        status, body = self._request("GET", url, None)
        what = f"GET {_path(url)}"
        if status != 200:
            raise _status_error(what, status, body, unknown_device=unknown_device, device=self.controller_id)
        return parse_json(body, what)

    def _send(self, method: str, url: str, doc: dict[str, Any]) -> None:
        status, body = self._request(method, url, json.dumps(doc).encode())
        if not 200 <= status < 300:
            raise _status_error(f"{method} {_path(url)}", status, body, unknown_device=False,
                                device=self.controller_id)

    def _request(self, method: str, url: str, data: bytes | None) -> tuple[int, bytes]:
        """(status, body) with the body read up to max_body; UpstreamError when the network fails."""
        what = f"{method} {_path(url)}"
        log.debug("DDI %s", what)
        try:
            # No redirects: DDI resources do not move, and a redirect would carry the token to wherever it points.
            with self.session.request(method, url, data=data, headers=self._headers(data is not None), stream=True,
                                      verify=self._verify, timeout=self.timeouts, allow_redirects=False) as resp:
                if 300 <= resp.status_code < 400:
                    where = resp.headers.get("Location", "?")
                    raise DdiStatusError(f"{what}: the update server redirects to {where[:200]}; point update.server "
                                         f"at that address", status=resp.status_code)
                return resp.status_code, self._read_capped(resp, what)
        except requests.RequestException as e:
            raise UpstreamError(f"update server {_origin_text(url)}: {what}: {_describe(e)}") from None

    def _read_capped(self, resp: requests.Response, what: str) -> bytes:
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise DdiError(f"{what}: the answer is {int(length)} bytes, more than the {self.max_body} allowed")
        buf = bytearray()
        # iter_content decodes gzip, so the cap counts the bytes JSON parsing would see.
        for block in resp.iter_content(64 * 1024):
            buf += block
            if len(buf) > self.max_body:
                raise DdiError(f"{what}: the answer is more than the {self.max_body} bytes allowed")
        return bytes(buf)


def _status_error(what: str, status: int, body: bytes, *, unknown_device: bool, device: str) -> DdiStatusError:
    if status in (401, 403):
        return DdiStatusError(f"{what}: update server refused the device token (HTTP {status}); check the "
                              f"token (or client certificate) and that the tenant allows this authentication",
                              status=status)
    if status == 404 and unknown_device:
        return DdiStatusError(f"{what}: unknown device {device!r} on the update server (HTTP 404); check "
                              f"the controller id and tenant", status=status)
    excerpt = _excerpt(body)
    return DdiStatusError(f"{what}: update server answered HTTP {status}" + (f": {excerpt}" if excerpt else ""),
                          status=status)


def _excerpt(body: bytes) -> str:
    """A short, one-line account of an error body: hawkBit's ExceptionInfo message when it is one."""
    text = body[:4096].decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        code = doc.get("errorCode")
        text = f"{doc['message']} ({code})" if isinstance(code, str) else doc["message"]
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT else text[:_EXCERPT - 1] + "…"


def _describe(e: requests.RequestException) -> str:
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "connection broken during the answer"
    return describe_error(e)


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urllib.parse.urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return p.scheme, (p.hostname or "").lower(), port


def _origin_text(url: str) -> str:
    """scheme://host[:port], without any user:password@ a URL may carry."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.hostname or ''}" + (f":{p.port}" if p.port else "")


def _path(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    return p.path + (f"?{p.query}" if p.query else "")


def _seg(action_id: str) -> str:
    return urllib.parse.quote(action_id, safe="")


def _now_ms() -> int:
    return int(time.time() * 1000)
