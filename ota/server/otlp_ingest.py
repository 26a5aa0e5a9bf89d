"""OTLP/HTTP metrics ingest: `POST /v1/metrics`, the health reports the daemon pushes (daemon/reporter.py).

A request is an `ExportMetricsServiceRequest` (opentelemetry-proto): protobuf (`application/x-protobuf`) or
OTLP's JSON encoding (`application/json`), gzip-compressed or not. Each resource is one device, named by its
`device.id` attribute; the request must be authorised for every device in it by the same `Authorization`
header as DDI (`[health] otlp_headers = {Authorization = "TargetToken …"}` on the device; a gateway token
may speak for many, as a collector forwarding for a site would). An unknown or unauthorised device refuses the
whole request (401); a resource without `device.id` is counted as rejected in the answer's partial success.

Of each report the server keeps a summary (`summarize`): CPU, memory, filesystems, temperatures, uptime, GPU,
each inference loop's throughput, the update agent's state, the booted slot and its bundle version, the
report spool's backlog. The summary becomes the device's latest health and enters its bounded history. A
report seen before (same `pitstop.spool.id`, `pitstop.report.seq` not above the last) is acknowledged and
dropped, so the device's at-least-once delivery counts once here.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pitstop.ota.server import auth, devices
from pitstop.ota.server.errors import StoreError
from pitstop.ota.server.http import Request, Response
from pitstop.ota.server.store import Store

if TYPE_CHECKING:
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics

log = logging.getLogger(__name__)

PATH = "/v1/metrics"
MAX_BODY = 8 << 20  # decompressed too
PROTOBUF = ("application/x-protobuf", "application/protobuf")
SEQ_ATTR = "pitstop.report.seq"
SPOOL_ATTR = "pitstop.spool.id"

AttrValue = str | bool | int | float


def _attrs(kvs: Any) -> dict[str, AttrValue]:
    # The daemon's own decoder (daemon/otlp.py) is out of reach: ota imports nothing of the other areas.
    out: dict[str, AttrValue] = {}
    kv: KeyValue
    for kv in kvs:
        v = kv.value
        which = v.WhichOneof("value")
        if which == "string_value":
            out[kv.key] = v.string_value
        elif which == "bool_value":
            out[kv.key] = v.bool_value
        elif which == "int_value":
            out[kv.key] = v.int_value
        elif which == "double_value":
            out[kv.key] = v.double_value
    return out


@dataclass(frozen=True)
class Point:
    name: str
    value: float
    attributes: dict[str, AttrValue]


@dataclass(frozen=True)
class Report:
    device_id: str | None
    time_s: float  # of the newest point
    summary: dict[str, Any]
    spool: str | None
    seq: int | None
    points: int


def _latest_points(rm: ResourceMetrics) -> tuple[list[Point], int, int]:
    """Each metric's points at its newest timestamp; (points, that newest time in ns, points in all)."""
    out: list[Point] = []
    newest = 0
    total = 0
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            kind = m.WhichOneof("data")
            if kind not in ("gauge", "sum"):
                continue
            pts = m.sum.data_points if kind == "sum" else m.gauge.data_points
            total += len(pts)
            if not pts:
                continue
            t = max(p.time_unix_nano for p in pts)
            newest = max(newest, t)
            for p in pts:
                if p.time_unix_nano == t:
                    value = float(p.as_int) if p.WhichOneof("value") == "as_int" else p.as_double
                    out.append(Point(m.name, value, _attrs(p.attributes)))
    return out, newest, total


def summarize(rm: ResourceMetrics) -> Report:
    resource = _attrs(rm.resource.attributes)
    scope: dict[str, AttrValue] = {}
    for sm in rm.scope_metrics:
        scope.update(_attrs(sm.scope.attributes))
    points, newest, total = _latest_points(rm)
    s: dict[str, Any] = {}

    def first(name: str, **match: AttrValue) -> float | None:
        for p in points:
            if p.name == name and all(p.attributes.get(k) == v for k, v in match.items()):
                return p.value
        return None

    idle = first("system.cpu.utilization", **{"cpu.mode": "idle"})
    if idle is not None:
        s["cpu"] = round(1.0 - idle, 4)
    for key, name in (
        ("memory", "system.memory.utilization"),
        ("uptime_s", "system.uptime"),
        ("load_1m", "system.cpu.load_average.1m"),
        ("spool_queued", "pitstop.spool.queued"),
    ):
        v = first(name)
        if v is not None:
            s[key] = round(v, 4)
    # Writable filesystems apart: a read-only root (an A/B slot) is about as full as its image, and no alarm.
    for key, ro in (("disk", False), ("disk_readonly", True)):
        disks = {
            str(p.attributes.get("system.filesystem.mountpoint", "?")): round(p.value, 4)
            for p in points
            if p.name == "system.filesystem.utilization" and (p.attributes.get("system.filesystem.mode") == "ro") == ro
        }
        if disks:
            s[key] = disks
    temps = [p.value for p in points if p.name == "hw.temperature"]
    if temps:
        s["temperature_max"] = round(max(temps), 1)
    gpus = [
        p.value
        for p in points
        if p.name == "hw.gpu.utilization" and p.attributes.get("hw.gpu.task") in (None, "general")
    ]
    if gpus:
        s["gpu"] = round(max(gpus), 4)
    loops = {
        str(p.attributes.get("loop", "?")): round(p.value, 2)
        for p in points
        if p.name == "pitstop.inference.throughput"
    }
    if loops:
        s["loops"] = loops
    for p in points:
        if p.name == "pitstop.update.state" and isinstance(p.attributes.get("state"), str):
            s["update_state"] = p.attributes["state"]
        if p.name == "pitstop.slot.status" and p.attributes.get("booted") is True:
            s["slot"] = str(p.attributes.get("slot", ""))
            if isinstance(p.attributes.get("version"), str) and p.attributes["version"]:
                s["version"] = p.attributes["version"]
    booted = resource.get("pitstop.slot.booted")
    if isinstance(booted, str) and booted:
        s.setdefault("slot", booted)
    if isinstance(resource.get("service.version"), str):
        s["pitstop_version"] = resource["service.version"]
    device = resource.get("device.id")
    spool, seq = scope.get(SPOOL_ATTR), scope.get(SEQ_ATTR)
    return Report(
        device_id=device if isinstance(device, str) and device else None,
        time_s=newest / 1e9,
        summary=s,
        spool=spool if isinstance(spool, str) else None,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        points=total,
    )


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode(req: Request) -> tuple[Any, bool]:
    """The ExportMetricsServiceRequest of a POST, and whether it came as JSON; BadRequest otherwise."""
    from google.protobuf import json_format  # noqa: PLC0415 - protobuf loads with the first report
    from google.protobuf.message import DecodeError  # noqa: PLC0415
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: PLC0415
        ExportMetricsServiceRequest,
    )

    ctype = (req.header("Content-Type") or "").split(";")[0].strip().lower()
    body = req.body
    encoding = (req.header("Content-Encoding") or "identity").strip().lower()
    if encoding == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = d.decompress(body, MAX_BODY + 1)
        except zlib.error as e:
            raise BadRequest(400, f"the gzip body is corrupt: {e}") from None
        if len(body) > MAX_BODY or d.unconsumed_tail:
            raise BadRequest(413, f"the request is larger than {MAX_BODY} bytes uncompressed")
    elif encoding != "identity":
        raise BadRequest(415, f"Content-Encoding {encoding!r} is not supported (gzip is)")
    msg = ExportMetricsServiceRequest()
    if ctype in PROTOBUF:
        try:
            msg.ParseFromString(body)
        except DecodeError as e:
            raise BadRequest(400, f"not an ExportMetricsServiceRequest: {e}") from None
        return msg, False
    if ctype == "application/json":
        try:
            json_format.Parse(body.decode("utf-8"), msg, ignore_unknown_fields=True)
        except (UnicodeDecodeError, json_format.ParseError) as e:
            raise BadRequest(400, f"not an ExportMetricsServiceRequest in JSON: {e}") from None
        return msg, True
    raise BadRequest(415, f"Content-Type {ctype or 'none'!r}: expected application/x-protobuf or application/json")


def _answer(rejected: int, message: str, as_json: bool) -> Response:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: PLC0415
        ExportMetricsServiceResponse,
    )

    resp = ExportMetricsServiceResponse()
    if rejected:
        resp.partial_success.rejected_data_points = rejected
        resp.partial_success.error_message = message
    if as_json:
        from google.protobuf import json_format  # noqa: PLC0415

        return Response(200, [("Content-Type", "application/json")], json_format.MessageToJson(resp).encode())
    return Response(200, [("Content-Type", PROTOBUF[0])], resp.SerializeToString())


def _refuse(status: int, message: str) -> Response:
    return Response(status, [("Content-Type", "text/plain; charset=utf-8")], (message + "\n").encode())


class OtlpIngest:
    def __init__(self, store: Store, *, history: int = 240) -> None:
        self.store = store
        self.history = history

    def handle(self, req: Request) -> Response:
        if req.method != "POST":
            r = _refuse(405, "POST OTLP metrics here")
            r.headers.append(("Allow", "POST"))
            return r
        try:
            msg, as_json = decode(req)
        except BadRequest as e:
            return _refuse(e.status, str(e))
        reports = [summarize(rm) for rm in msg.resource_metrics]
        named = [r for r in reports if r.device_id is not None]
        rejected = sum(r.points for r in reports if r.device_id is None)
        if not named:
            return _refuse(400, "no resource carries a device.id attribute: nothing to store")
        creds = auth.parse_authorization(req.header("Authorization"))
        try:
            refusal = self._authorize(req, creds, {r.device_id for r in named if r.device_id})
            if refusal is not None:
                return refusal
            stored = self.store.write(
                lambda c, now: [
                    devices.record_health(
                        c,
                        now,
                        r.device_id,
                        r.summary,
                        sample_time=r.time_s or now,
                        spool=r.spool,
                        seq=r.seq,
                        keep=self.history,
                    )
                    for r in named
                    if r.device_id
                ]
            )
        except StoreError as e:
            log.error("OTLP: %s", e.message)
            r = _refuse(503, "the update server cannot reach its database; try again later")
            r.headers.append(("Retry-After", "30"))
            return r
        resp = _answer(rejected, "resources without a device.id attribute", as_json)
        resp.note = ",".join(sorted({r.device_id for r in named if r.device_id}))[:200]
        if not all(stored):
            resp.note += " (duplicate)"
        return resp

    def _authorize(self, req: Request, creds: auth.Credentials | None, ids: set[str]) -> Response | None:
        def read(c: Any) -> tuple[dict[str, tuple[bool, str | None]], str | None]:
            return {d: devices.token_hash(c, d) for d in ids}, devices.gateway_token_hash(c)

        known, gateway = self.store.read(read)
        for device_id in sorted(ids):
            is_known, token_hash = known[device_id]
            d = auth.decide(
                device_id,
                creds,
                known=is_known,
                device_token_hash=token_hash,
                gateway_token_hash=gateway,
                cert_cn=req.cert_cn,
                auto_register=False,
            )
            if d.outcome is not auth.Outcome.ALLOW:
                r = _refuse(401, f"not authorized for device {device_id!r}")
                r.headers.append(("WWW-Authenticate", 'TargetToken realm="pitstop"'))
                return r
        return None
