"""The local Prometheus endpoint (daemon/prometheus.py), scraped over real HTTP and parsed here."""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from pitstop.daemon.errors import DaemonError
from pitstop.daemon.health import HealthSample, Metric
from pitstop.daemon.prometheus import PrometheusEndpoint, metric_name, parse_listen, render

# -- a small, independent parser of text format 0.0.4 --------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse(text: str) -> dict[str, dict[str, object]]:
    """{family: {"type": ..., "help": ..., "samples": [(labels, value)]}}; asserts the format's rules."""
    families: dict[str, dict[str, object]] = {}
    current: str | None = None
    assert text == "" or text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert name not in families, f"{name} described twice"
            families[name] = {"help": help_, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, type_ = line[7:].partition(" ")
            assert name == current and type_ in ("gauge", "counter")
            families[name]["type"] = type_
        elif line.startswith("#") or not line:
            continue
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, _, body, value = m.groups()
            assert name == current, f"{name} outside its family {current}"
            labels: dict[str, str] = {}
            if body:
                pos = 0
                for lm in _LABEL.finditer(body):
                    assert lm.start() == pos, f"bad labels in {line!r}"
                    labels[lm.group(1)] = _unescape(lm.group(2))
                    pos = lm.end()
                assert pos == len(body), f"bad labels in {line!r}"
            samples = families[name]["samples"]
            assert isinstance(samples, list)
            samples.append((labels, float(value)))
    return families


def values(fams: dict[str, dict[str, object]], name: str) -> list[tuple[dict[str, str], float]]:
    samples = fams[name]["samples"]
    assert isinstance(samples, list)
    return samples


# -- tests --------------------------------------------------------------------------------------------------


def test_names() -> None:
    assert metric_name("system.cpu.utilization", "1", "gauge") == "system_cpu_utilization_ratio"
    assert metric_name("system.memory.usage", "By", "gauge") == "system_memory_usage_bytes"
    assert metric_name("hw.temperature", "Cel", "gauge") == "hw_temperature_celsius"
    assert metric_name("system.cpu.load_average.1m", "{thread}", "gauge") == "system_cpu_load_average_1m"
    assert metric_name("pitstop.spool.dropped", "{report}", "sum") == "pitstop_spool_dropped_total"
    assert metric_name("hw.energy", "J", "sum") == "hw_energy_joules_total"
    assert (
        metric_name("pitstop.inference.throughput", "{frame}/s", "gauge") == "pitstop_inference_throughput_per_second"
    )
    assert metric_name("pitstop.inference.latency", "s", "gauge") == "pitstop_inference_latency_seconds"
    assert metric_name("pitstop.update.state", "", "gauge") == "pitstop_update_state"
    assert metric_name("x.uptime_seconds", "s", "gauge") == "x_uptime_seconds"
    assert metric_name("9lives--odd name", "By/s", "gauge") == "_9lives_odd_name_bytes_per_second"


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":9464") == ("", 9464)
    for bad in ("9464", "host:", "host:port", "h:99999"):
        with pytest.raises(ValueError):
            parse_listen(bad)


TRICKY = 'say "hi"\\ then\nnewline'


def sample() -> HealthSample:
    return HealthSample(
        0,
        (
            Metric("system.cpu.utilization", 0.125, "1", {"cpu.mode": "user"}, description="Share of CPU time"),
            Metric("system.cpu.utilization", 0.875, "1", {"cpu.mode": "idle"}, description="Share of CPU time"),
            Metric("system.memory.limit", 24684084 * 1024, "By", description="Total\nusable \\ memory"),
            Metric("hw.temperature", 45.0, "Cel", {"hw.id": "thermal_zone0", "hw.name": TRICKY}),
            Metric("pitstop.spool.dropped", 4, "{report}", kind="sum", description="Dropped reports"),
            Metric("pitstop.slot.status", 1, "", {"slot": "a", "booted": True, "tries": 3}),
            Metric("odd", float("nan"), "", {"a.b": "1", "a_b": "2", "0x": "3"}),
            Metric("odd", float("inf"), "", {"a.b": "x"}),
        ),
    )


@pytest.fixture
def endpoint() -> Iterator[PrometheusEndpoint]:
    ep = PrometheusEndpoint("127.0.0.1:0", {"service.name": "pitstop", "host.name": "cam-7"})
    ep.start()
    try:
        yield ep
    finally:
        ep.close()


def scrape(ep: PrometheusEndpoint, path: str = "/metrics") -> requests.Response:
    host, port = ep.address
    return requests.get(f"http://{host}:{port}{path}", timeout=10)


def test_scrape(endpoint: PrometheusEndpoint) -> None:
    before = scrape(endpoint)
    assert before.status_code == 200
    assert list(parse(before.text)) == ["target_info"]  # nothing sampled yet

    endpoint.update(sample())
    resp = scrape(endpoint)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    fams = parse(resp.text)
    assert values(fams, "target_info") == [({"host_name": "cam-7", "service_name": "pitstop"}, 1.0)]
    assert fams["system_cpu_utilization_ratio"]["type"] == "gauge"
    assert fams["system_cpu_utilization_ratio"]["help"] == "Share of CPU time"
    assert sorted(values(fams, "system_cpu_utilization_ratio"), key=lambda s: s[1]) == [
        ({"cpu_mode": "user"}, 0.125),
        ({"cpu_mode": "idle"}, 0.875),
    ]
    assert values(fams, "system_memory_limit_bytes") == [({}, 24684084 * 1024.0)]
    assert fams["system_memory_limit_bytes"]["help"] == "Total\\nusable \\\\ memory"
    ((labels, value),) = values(fams, "hw_temperature_celsius")
    assert labels == {"hw_id": "thermal_zone0", "hw_name": TRICKY} and value == 45.0
    assert fams["pitstop_spool_dropped_total"]["type"] == "counter"
    assert values(fams, "pitstop_spool_dropped_total") == [({}, 4.0)]
    assert values(fams, "pitstop_slot_status") == [({"booted": "true", "slot": "a", "tries": "3"}, 1.0)]
    (nan, inf) = values(fams, "odd")
    assert nan[0] == {"a_b": "1;2", "key_0x": "3"} and math.isnan(nan[1])
    assert inf == ({"a_b": "x"}, math.inf)

    host, port = endpoint.address
    head = requests.head(f"http://{host}:{port}/metrics", timeout=10)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) > 0
    assert scrape(endpoint, "/other").status_code == 404
    assert scrape(endpoint, "/").status_code == 200


def test_duplicate_series_kept_once(caplog: pytest.LogCaptureFixture) -> None:
    s = HealthSample(
        0,
        (
            Metric("a", 1, "", {"k": "v"}),
            Metric("a", 2, "", {"k": "v"}),
            Metric("b", 1, "{x}", kind="sum"),
            Metric("b_total", 1, "", kind="gauge"),
        ),
    )
    fams = parse(render(s))
    assert values(fams, "a") == [({"k": "v"}, 1.0)]
    assert fams["b_total"]["type"] == "counter"
    assert "first kept" in caplog.text and "already a counter" in caplog.text


def test_scrape_does_not_need_the_caller(endpoint: PrometheusEndpoint) -> None:
    """Scrapes are served from the endpoint's own threads, many at once."""
    endpoint.update(sample())
    results: list[int] = []

    def worker() -> None:
        for _ in range(10):
            results.append(len(parse(scrape(endpoint).text)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and len(set(results)) == 1


def test_address_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DaemonError, match="cannot listen"):
            PrometheusEndpoint(f"127.0.0.1:{port}").start()
    with pytest.raises(DaemonError, match="expected host:port"):
        PrometheusEndpoint("nonsense").start()


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    ep = PrometheusEndpoint("[::1]:0")
    ep.start()
    try:
        ep.update(HealthSample(0, (Metric("up", 1, ""),)))
        port = ep.address[1]
        resp = requests.get(f"http://[::1]:{port}/metrics", timeout=10)
        assert values(parse(resp.text), "up") == [({}, 1.0)]
    finally:
        t0 = time.monotonic()
        ep.close()
        assert time.monotonic() - t0 < 2
