"""Encoding health samples as OTLP (daemon/otlp.py), checked with the opentelemetry-proto classes."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb

from pitstop.daemon.health import HealthSample, Metric
from pitstop.daemon.otlp import SEQ_ATTR, SPOOL_ATTR, attributes, decode, encode, resource_attributes

T0 = 1_800_000_000_000_000_000
START = T0 - 3600 * 10**9

RESOURCE = resource_attributes(host_name="cam-7", device_id="dev-0042", version="0.1.0", booted_slot="b")


def samples() -> list[HealthSample]:
    out = []
    for i in range(2):
        t = T0 + i * 30 * 10**9
        out.append(
            HealthSample(
                t,
                (
                    Metric("system.cpu.utilization", 0.25 + i / 10, "1", {"cpu.mode": "user"}),
                    Metric("system.cpu.utilization", 0.5, "1", {"cpu.mode": "idle"}),
                    Metric(
                        "system.memory.usage",
                        123456789 + i,
                        "By",
                        {"system.memory.state": "used"},
                        description="Memory in each state",
                    ),
                    Metric("pitstop.spool.dropped", 3 + i, "{report}", {}, "sum", "Dropped reports"),
                    Metric(
                        "pitstop.inference.drops",
                        10,
                        "{frame}",
                        {"loop": "cam", "healthy": True, "n": 2, "f": 0.5},
                        "sum",
                        start_ns=START + 5,
                    ),
                ),
            )
        )
    return out


def test_resource_attributes() -> None:
    assert RESOURCE == {
        "service.name": "pitstop",
        "service.version": "0.1.0",
        "host.name": "cam-7",
        "device.id": "dev-0042",
        "pitstop.slot.booted": "b",
    }
    bare = resource_attributes(host_name="h", device_id=None, version="1", booted_slot=None)
    assert "device.id" not in bare and "pitstop.slot.booted" not in bare


def test_encode_as_protobuf() -> None:
    payload = encode(
        samples(), RESOURCE, start_ns=START, scope_attributes={SEQ_ATTR: 17, SPOOL_ATTR: "abc"}, scope_version="0.1.0"
    ).SerializeToString()
    req = ExportMetricsServiceRequest.FromString(payload)
    assert len(req.resource_metrics) == 1
    rm = req.resource_metrics[0]
    res = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
    assert res["service.name"] == "pitstop" and res["device.id"] == "dev-0042" and res["pitstop.slot.booted"] == "b"
    (sm,) = rm.scope_metrics
    assert sm.scope.name == "pitstop.daemon.health" and sm.scope.version == "0.1.0"
    scope = {kv.key: kv.value for kv in sm.scope.attributes}
    assert scope[SEQ_ATTR].int_value == 17 and scope[SPOOL_ATTR].string_value == "abc"

    by_name = {m.name: m for m in sm.metrics}
    assert list(by_name) == [
        "system.cpu.utilization",
        "system.memory.usage",
        "pitstop.spool.dropped",
        "pitstop.inference.drops",
    ]
    cpu = by_name["system.cpu.utilization"]
    assert cpu.WhichOneof("data") == "gauge" and cpu.unit == "1"
    assert [p.time_unix_nano for p in cpu.gauge.data_points] == [T0, T0, T0 + 30 * 10**9, T0 + 30 * 10**9]
    assert cpu.gauge.data_points[2].as_double == pytest.approx(0.35)
    assert cpu.gauge.data_points[0].start_time_unix_nano == 0

    mem = by_name["system.memory.usage"]
    assert mem.description == "Memory in each state" and mem.unit == "By"
    assert mem.gauge.data_points[1].WhichOneof("value") == "as_int"
    assert mem.gauge.data_points[1].as_int == 123456790

    dropped = by_name["pitstop.spool.dropped"]
    assert dropped.WhichOneof("data") == "sum"
    assert dropped.sum.aggregation_temporality == pb.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert dropped.sum.is_monotonic
    assert [(p.start_time_unix_nano, p.as_int) for p in dropped.sum.data_points] == [(START, 3), (START, 4)]

    drops = by_name["pitstop.inference.drops"]
    assert drops.sum.data_points[0].start_time_unix_nano == START + 5  # the metric's own start wins
    kinds = {kv.key: kv.value.WhichOneof("value") for kv in drops.sum.data_points[0].attributes}
    assert kinds == {"loop": "string_value", "healthy": "bool_value", "n": "int_value", "f": "double_value"}


def test_decode_round_trip() -> None:
    sent = samples()
    payload = encode(sent, RESOURCE, start_ns=START, scope_attributes={SEQ_ATTR: 5}).SerializeToString()
    (report,) = decode(payload)
    assert report.seq == 5
    assert report.resource == RESOURCE
    assert [s.timestamp_ns for s in report.samples] == [s.timestamp_ns for s in sent]
    for got, want in zip(report.samples, sent, strict=True):
        expect = [
            m
            if m.kind == "gauge" or m.start_ns is not None
            else Metric(m.name, m.value, m.unit, m.attributes, m.kind, m.description, START)
            for m in want.metrics
        ]
        assert sorted(got.metrics, key=repr) == sorted(expect, key=repr)


def test_one_name_cannot_be_gauge_and_sum() -> None:
    bad = HealthSample(T0, (Metric("x", 1), Metric("x", 2, kind="sum")))
    with pytest.raises(ValueError, match="both a gauge and a sum"):
        encode([bad], RESOURCE, start_ns=START)


def test_big_and_odd_values() -> None:
    s = HealthSample(T0, (Metric("big", 2**70), Metric("neg", -5), Metric("flag", True)))
    (report,) = decode(encode([s], {}, start_ns=0).SerializeToString())
    values = {m.name: m.value for m in report.samples[0].metrics}
    assert values == {"big": float(2**70), "neg": -5, "flag": 1.0}


def test_garbage_does_not_decode() -> None:
    with pytest.raises(DecodeError):
        decode(b"\xff\xff\xff\xff not protobuf")
    assert attributes([]) == {}
