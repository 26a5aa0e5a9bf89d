"""Health samples as OTLP metrics: one `ExportMetricsServiceRequest` per report (opentelemetry-proto).

The resource says who reports (service.name=pitstop, service.version, host.name, device.id, the booted slot);
the instrumentation scope carries the report's identity, `pitstop.report.seq` under `pitstop.spool.id`, so a
receiver can check order and drop the duplicate a lost acknowledgement causes. Gauges become Gauge points;
counters become cumulative, monotonic Sum points with their start time.

protobuf and the generated OTLP modules load on the first encode or decode, not with this module: a daemon
without an OTLP URL never needs them (about 3 MiB of its memory; benchmarks/daemon_footprint.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pitstop.daemon.health import AttrValue, HealthSample, Metric

if TYPE_CHECKING:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb

CONTENT_TYPE = "application/x-protobuf"
SCOPE_NAME = "pitstop.daemon.health"
SEQ_ATTR = "pitstop.report.seq"
SPOOL_ATTR = "pitstop.spool.id"


def resource_attributes(
    *, host_name: str, device_id: str | None, version: str, booted_slot: str | None
) -> dict[str, AttrValue]:
    attrs: dict[str, AttrValue] = {"service.name": "pitstop", "service.version": version, "host.name": host_name}
    if device_id:
        attrs["device.id"] = device_id
    if booted_slot:
        attrs["pitstop.slot.booted"] = booted_slot
    return attrs


def encode(
    samples: Sequence[HealthSample],
    resource: Mapping[str, AttrValue],
    *,
    start_ns: int,
    scope_attributes: Mapping[str, AttrValue] | None = None,
    scope_version: str = "",
) -> ExportMetricsServiceRequest:
    """One request holding every sample; each metric name is one OTLP metric with a point per sample.
    `start_ns` is the start time of counters that do not carry their own (Metric.start_ns)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: PLC0415 - see the module doc
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope  # noqa: PLC0415
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb  # noqa: PLC0415
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource  # noqa: PLC0415

    metrics: dict[str, pb.Metric] = {}
    for sample in samples:
        for m in sample.metrics:
            out = metrics.get(m.name)
            if out is None:
                out = metrics[m.name] = pb.Metric(name=m.name, unit=m.unit, description=m.description)
                if m.kind == "sum":
                    out.sum.aggregation_temporality = pb.AGGREGATION_TEMPORALITY_CUMULATIVE
                    out.sum.is_monotonic = True
                else:
                    out.gauge.SetInParent()
            if (m.kind == "sum") != out.HasField("sum"):
                raise ValueError(f"metric {m.name} is both a gauge and a sum in one report")
            point = (out.sum if m.kind == "sum" else out.gauge).data_points.add()
            point.time_unix_nano = sample.timestamp_ns
            if m.kind == "sum":
                point.start_time_unix_nano = m.start_ns if m.start_ns is not None else start_ns
            _set_number(point, m.value)
            point.attributes.extend(_key_values(m.attributes))
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.CopyFrom(Resource(attributes=_key_values(resource)))
    sm = rm.scope_metrics.add()
    sm.scope.CopyFrom(
        InstrumentationScope(name=SCOPE_NAME, version=scope_version, attributes=_key_values(scope_attributes or {}))
    )
    sm.metrics.extend(metrics.values())
    return req


@dataclass(frozen=True)
class Report:
    """What a receiver gets back from one resource and scope of a request."""

    resource: dict[str, AttrValue]
    scope: dict[str, AttrValue]
    samples: list[HealthSample]

    @property
    def seq(self) -> int | None:
        v = self.scope.get(SEQ_ATTR)
        return v if isinstance(v, int) and not isinstance(v, bool) else None


def decode(payload: bytes) -> list[Report]:
    """Parse a request (raises google.protobuf.message.DecodeError on garbage). Points are grouped back into
    samples by timestamp; unit, kind, description and start time come back as sent."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: PLC0415 - see the module doc
        ExportMetricsServiceRequest,
    )

    req = ExportMetricsServiceRequest.FromString(payload)
    reports = []
    for rm in req.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            by_time: dict[int, list[Metric]] = {}
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind not in ("gauge", "sum"):
                    continue  # histograms and summaries: pitstop sends none
                data = m.sum if kind == "sum" else m.gauge
                for p in data.data_points:
                    value: float | int = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                    by_time.setdefault(p.time_unix_nano, []).append(
                        Metric(
                            m.name,
                            value,
                            m.unit,
                            attributes(p.attributes),
                            "sum" if kind == "sum" else "gauge",
                            m.description,
                            p.start_time_unix_nano if kind == "sum" else None,
                        )
                    )
            samples = [HealthSample(t, tuple(ms)) for t, ms in sorted(by_time.items())]
            reports.append(Report(resource, attributes(sm.scope.attributes), samples))
    return reports


def attributes(kvs: Sequence[KeyValue]) -> dict[str, AttrValue]:
    """OTLP attributes as a dict (array and map values, which pitstop never sends, become their text)."""
    out: dict[str, AttrValue] = {}
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
        else:
            out[kv.key] = str(v).strip()
    return out


def _key_values(attrs: Mapping[str, AttrValue]) -> list[KeyValue]:
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue  # noqa: PLC0415 - see the module doc

    return [KeyValue(key=k, value=_any_value(v)) for k, v in attrs.items()]


def _any_value(v: AttrValue) -> AnyValue:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue  # noqa: PLC0415 - see the module doc

    if isinstance(v, bool):  # before int: bool is an int
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v))


def _set_number(point: pb.NumberDataPoint, value: float | int) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        point.as_int = value
    else:
        point.as_double = float(value)
