"""What the server answers, by path: DDI under `/{tenant}/controller/v1/{controllerId}`, OTLP metrics at
`/v1/metrics`, and `/healthz` for whoever watches the server itself."""

from __future__ import annotations

import urllib.parse

from pitstop.ota.server import ddi_api, devices, otlp_ingest
from pitstop.ota.server.ddi_api import DdiApi, DdiSettings
from pitstop.ota.server.http import Request, Response
from pitstop.ota.server.otlp_ingest import OtlpIngest
from pitstop.ota.server.store import Store


class App:
    def __init__(self, store: Store, settings: DdiSettings, *, health_history: int = 240) -> None:
        self.store = store
        self.settings = settings
        self.ddi = DdiApi(store, settings)
        self.otlp = OtlpIngest(store, history=health_history)

    def body_limit(self, method: str, path: str) -> int:
        return otlp_ingest.MAX_BODY if path == otlp_ingest.PATH else ddi_api.MAX_BODY

    def handle(self, req: Request) -> Response:
        if req.path == otlp_ingest.PATH:
            return self.otlp.handle(req)
        if req.path == "/healthz":
            return Response(200, [("Content-Type", "text/plain; charset=utf-8")], b"ok\n", head=req.method == "HEAD")
        segs = req.path.split("/")
        # ["", tenant, "controller", "v1", controllerId, ...]
        if len(segs) >= 5 and segs[0] == "" and segs[2] == "controller" and segs[3] == "v1":
            tenant = urllib.parse.unquote(segs[1])
            device = urllib.parse.unquote(segs[4])
            rest = [urllib.parse.unquote(s) for s in segs[5:]]
            if rest and rest[-1] == "":
                rest.pop()  # a trailing slash
            if tenant.lower() != self.settings.tenant.lower():
                return ddi_api.error(404, f"no tenant {tenant!r}", ddi_api.NOT_FOUND)
            if not devices.DEVICE_ID.fullmatch(device) or any(not s or "/" in s for s in rest):
                return ddi_api.error(404, "no such DDI resource", ddi_api.NOT_FOUND)
            return self.ddi.handle(req, device, rest)
        return ddi_api.error(404, f"nothing at {req.path}", ddi_api.NOT_FOUND)
