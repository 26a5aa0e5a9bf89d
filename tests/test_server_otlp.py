"""OTLP/HTTP metrics ingest of `pitstop server`: reports made by the daemon's own encoder (and pushed by its own
reporter, spool and all), the health summary the device list shows, authentication, duplicates, encodings."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from bundlekit import run_cli
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from serverkit import Site, site

from pitstop.daemon.config import HealthConfig
from pitstop.daemon.health import HealthSample, HealthSampler, Metric, slot_metrics, state_metric
from pitstop.daemon.otlp import SEQ_ATTR, SPOOL_ATTR, encode, resource_attributes
from pitstop.daemon.reporter import Reporter
from pitstop.daemon.spool import Spool
from pitstop.ota.server import devices

PROTO = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Site]:
    with site(tmp_path) as st:
        yield st


def sample(t_ns: int | None = None, *, idle: float = 0.88, loop_fps: float = 29.5) -> HealthSample:
    fs = {"system.filesystem.mountpoint": "/data", "system.device": "/dev/vda3", "system.filesystem.type": "ext4"}
    metrics = [
        *(
            Metric("system.cpu.utilization", v, "1", {"cpu.mode": m})
            for m, v in (("idle", idle), ("user", 1 - idle - 0.02), ("system", 0.02))
        ),
        Metric("system.memory.utilization", 0.4, "1", {"system.memory.state": "used"}),
        Metric("system.uptime", 3600.0, "s"),
        Metric("system.filesystem.utilization", 0.55, "1", fs),
        Metric("system.filesystem.utilization", 0.12, "1", {**fs, "system.filesystem.mountpoint": "/boot/efi"}),
        Metric(
            "system.filesystem.utilization",
            0.96,
            "1",
            {**fs, "system.filesystem.mountpoint": "/", "system.filesystem.mode": "ro"},
        ),
        Metric("hw.temperature", 48.0, "Cel", {"hw.id": "thermal_zone0", "hw.name": "cpu"}),
        Metric("hw.temperature", 61.2, "Cel", {"hw.id": "thermal_zone1", "hw.name": "gpu"}),
        Metric("pitstop.inference.throughput", loop_fps, "{frame}/s", {"loop": "det"}),
        state_metric("pitstop.update.state", "idle"),
        *slot_metrics("b", {"a": {"version": "1.0.0"}, "b": {"version": "2.0.0"}}),
        Metric("pitstop.spool.queued", 0, "{report}"),
    ]
    return HealthSample(t_ns or time.time_ns(), tuple(metrics))


def report(device: str, seq: int = 1, *, spool: str = "spool-1", **kw: Any) -> bytes:
    resource = resource_attributes(host_name=device, device_id=device, version="0.1.0", booted_slot="b")
    return encode(
        [sample(**kw)], resource, start_ns=time.time_ns(), scope_attributes={SEQ_ATTR: seq, SPOOL_ATTR: spool}
    ).SerializeToString()


def post(s: Site, body: bytes, token: str | None = None, **headers: str) -> requests.Response:
    h = {**PROTO, **headers}
    if token is not None:
        h.setdefault("Authorization", f"TargetToken {token}")
    return requests.post(f"{s.url}/v1/metrics", data=body, headers=h, timeout=10)


def test_report_becomes_the_devices_health(s: Site, capsys: pytest.CaptureFixture[str]) -> None:
    tok = s.add_device("dev-1", group="lab")
    r = post(s, report("dev-1"), tok)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-protobuf"
    assert not ExportMetricsServiceResponse.FromString(r.content).HasField("partial_success")
    d = s.device("dev-1")
    assert d.health == {
        "cpu": 0.12,
        "memory": 0.4,
        "uptime_s": 3600.0,
        "disk": {"/boot/efi": 0.12, "/data": 0.55},  # writable: the device list shows the fuller one
        "disk_readonly": {"/": 0.96},  # the slot's root is as full as its image: no alarm
        "temperature_max": 61.2,
        "loops": {"det": 29.5},
        "update_state": "idle",
        "slot": "b",
        "version": "2.0.0",
        "spool_queued": 0.0,
        "pitstop_version": "0.1.0",
    }
    assert (d.booted_slot, d.version) == ("b", "2.0.0")
    listed = run_cli(capsys, "server", "device", "list", "--data", s.store.data_dir)
    assert listed.rc == 0
    assert "cpu 12% mem 40% disk 55% 61°C det 29.5/s" in listed.out
    line = next(ln for ln in listed.out.splitlines() if ln.startswith("dev-1"))
    assert " 2.0.0 " in line and " b " in line
    doc = json.loads(run_cli(capsys, "server", "device", "list", "--data", s.store.data_dir, "--json").out)
    assert doc[0]["health"]["loops"] == {"det": 29.5}


def test_duplicate_reports_count_once(s: Site) -> None:
    tok = s.add_device("dev-1")
    for seq in (1, 2, 2, 1, 3):
        assert post(s, report("dev-1", seq), tok).status_code == 200
    assert post(s, report("dev-1", 1, spool="spool-2"), tok).status_code == 200  # a fresh spool starts at 1
    history = s.store.read(lambda c: devices.health_history(c, "dev-1", 100))
    assert len(history) == 4


def test_health_history_is_bounded(tmp_path: Path) -> None:
    with site(tmp_path, health_history=5) as s:
        tok = s.add_device("dev-1")
        for seq in range(1, 81):
            assert post(s, report("dev-1", seq), tok).status_code == 200
        n = s.store.read(lambda c: c.execute("SELECT count(*) FROM health").fetchone()[0])
        assert 5 <= n <= 5 + 16


def test_authorization(s: Site) -> None:
    tok1 = s.add_device("dev-1")
    tok2 = s.add_device("dev-2")
    assert post(s, report("dev-1")).status_code == 401
    assert post(s, report("dev-1"), tok2).status_code == 401
    assert post(s, report("ghost"), tok1).status_code == 401
    s.set_gateway_token("gw-secret-1")
    both = report("dev-1") + report("dev-2", spool="other")  # two requests concatenated: one with 2 resources
    assert post(s, both, Authorization="GatewayToken gw-secret-1").status_code == 200
    assert s.device("dev-1").health is not None and s.device("dev-2").health is not None
    assert post(s, report("dev-1") + report("dev-2"), tok1).status_code == 401  # tok1 cannot speak for dev-2
    assert post(s, report("dev-1", 9), tok1).status_code == 200


def test_resources_without_device_id(s: Site) -> None:
    tok = s.add_device("dev-1")
    anonymous = encode([sample()], {"service.name": "pitstop"}, start_ns=0).SerializeToString()
    assert post(s, anonymous, tok).status_code == 400
    r = post(s, report("dev-1") + anonymous, tok)
    assert r.status_code == 200
    assert ExportMetricsServiceResponse.FromString(r.content).partial_success.rejected_data_points == len(
        sample().metrics
    )


def test_encodings(s: Site) -> None:
    tok = s.add_device("dev-1")
    assert post(s, gzip.compress(report("dev-1", 1)), tok, **{"Content-Encoding": "gzip"}).status_code == 200
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    as_json = json_format.MessageToJson(ExportMetricsServiceRequest.FromString(report("dev-1", 2, idle=0.5)))
    r = post(s, as_json.encode(), tok, **{"Content-Type": "application/json"})
    assert (r.status_code, r.headers["Content-Type"]) == (200, "application/json")
    assert s.device("dev-1").health["cpu"] == 0.5
    assert post(s, b"\xff\x00garbage", tok).status_code == 400
    assert post(s, b"x", tok, **{"Content-Type": "text/plain"}).status_code == 415
    assert post(s, b"x", tok, **{"Content-Encoding": "br"}).status_code == 415
    assert post(s, b"not gzip", tok, **{"Content-Encoding": "gzip"}).status_code == 400
    bomb = gzip.compress(bytes(20 << 20))
    assert post(s, bomb, tok, **{"Content-Encoding": "gzip"}).status_code == 413
    assert requests.get(f"{s.url}/v1/metrics", timeout=5).status_code == 405


def test_the_daemons_reporter_pushes_to_the_server(s: Site, tmp_path: Path) -> None:
    """The daemon's reporter (real samples of this machine, its spool, its otlp_headers) delivers to the
    server; every report is acknowledged and the device shows this machine's figures."""
    tok = s.add_device("dev-1")
    cfg = HealthConfig(
        interval_s=0.05,
        otlp_url=f"{s.url}/v1/metrics",
        otlp_timeout_s=5.0,
        otlp_headers={"Authorization": f"TargetToken {tok}"},
        prometheus_listen=None,
    )
    resource = resource_attributes(host_name="rig", device_id="dev-1", version="0.1.0", booted_slot="a")

    async def scenario() -> None:
        with Spool(tmp_path / "spool.db", 100) as spool:
            reporter = Reporter(cfg, HealthSampler([Path("/")]).sample, spool, resource)
            task = asyncio.create_task(reporter.run(samples=3))
            await asyncio.wait_for(reporter.wait_drained(), 30)
            task.cancel()  # the sender waits for more reports until cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await task
            st = reporter.status
            assert (st.delivered, st.rejected, st.queued) == (3, 0, 0)

    asyncio.run(scenario())
    h = s.device("dev-1").health
    assert h is not None and 0 <= h["cpu"] <= 1 and 0 < h["memory"] < 1 and "/" in h["disk"]
    assert h["slot"] == "a"
    assert len(s.store.read(lambda c: devices.health_history(c, "dev-1", 10))) == 3
