"""The latest health sample as Prometheus text (exposition format 0.0.4), served on a local address.

Names follow OpenTelemetry's Prometheus compatibility rules: characters outside [a-zA-Z0-9_:] become "_",
the unit becomes a suffix (By → _bytes, s → _seconds, Cel → _celsius, "1" on a gauge → _ratio, {annotations}
dropped, "/s" → _per_second), counters end in _total. Attribute keys become label names the same way. The
resource is served as `target_info`.

The server is a small http.server in its own thread: a scrape renders text in that thread and never waits on
(or blocks) the daemon's event loop; the loop only swaps in the newest sample.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pitstop.daemon.errors import DaemonError
from pitstop.daemon.health import AttrValue, HealthSample, LogOnce, Metric

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# UCUM units (as OpenTelemetry writes them) to the words Prometheus names end with.
_UNITS = {
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "min": "minutes",
    "h": "hours",
    "d": "days",
    "Cel": "celsius",
    "W": "watts",
    "J": "joules",
    "V": "volts",
    "A": "amperes",
    "Hz": "hertz",
    "%": "percent",
}
_PER = {"s": "second", "min": "minute", "h": "hour", "d": "day"}
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(name: str, unit: str, kind: str) -> str:
    """The Prometheus name of an OpenTelemetry metric."""
    base = _squash(_INVALID.sub("_", name))
    words = [w for w in base.split("_") if w]
    for suffix in _unit_suffix(unit, kind):
        if suffix not in words:  # "pitstop.x.seconds" in s must not become ..._seconds_seconds
            base += "_" + suffix
    if kind == "sum" and not base.endswith("_total"):
        base += "_total"
    if base[:1].isdigit():
        base = "_" + base
    return base


def _unit_suffix(unit: str, kind: str) -> list[str]:
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()  # {report}, {frame}/s: annotations carry no unit
    if unit == "1":
        return ["ratio"] if kind == "gauge" else []
    if not unit:
        return []
    main, _, per = unit.partition("/")
    out = []
    if main:
        out += _squash(_INVALID_LABEL.sub("_", _UNITS.get(main, main))).strip("_").split("_")
    if per:
        out += ["per", _squash(_INVALID_LABEL.sub("_", _PER.get(per, per))).strip("_")]
    return [w for w in out if w]


def label_name(key: str) -> str:
    name = _squash(_INVALID_LABEL.sub("_", key))
    if name[:1].isdigit():
        name = "key_" + name
    return name


def _squash(s: str) -> str:
    return re.sub(r"__+", "_", s)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _label_text(v: AttrValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def labels(attrs: Mapping[str, AttrValue]) -> tuple[tuple[str, str], ...]:
    """Label pairs, sorted; keys that collide once converted get their values joined with ";" (as OpenTelemetry
    specifies), in key order."""
    merged: dict[str, list[str]] = {}
    for key in sorted(attrs):
        merged.setdefault(label_name(key), []).append(_label_text(attrs[key]))
    return tuple(sorted((k, ";".join(v)) for k, v in merged.items()))


@dataclass
class _Family:
    name: str
    type: str
    help: str
    samples: dict[tuple[tuple[str, str], ...], float | int] = field(default_factory=dict)


def render(
    sample: HealthSample | None, resource: Mapping[str, AttrValue] | None = None, once: LogOnce | None = None
) -> str:
    """The exposition text of `sample` (and `resource` as target_info)."""
    once = once or LogOnce(log)
    families: dict[str, _Family] = {}
    if resource:
        families["target_info"] = _Family("target_info", "gauge", "Target metadata", {labels(resource): 1})
    for m in sample.metrics if sample else ():
        _add(families, m, once)
    out: list[str] = []
    for fam in families.values():
        out.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        for lbls, value in fam.samples.items():
            text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in lbls)
            out.append(f"{fam.name}{{{text}}} {format_value(value)}" if text else f"{fam.name} {format_value(value)}")
    return "\n".join(out) + "\n" if out else ""


def _add(families: dict[str, _Family], m: Metric, once: LogOnce) -> None:
    name = metric_name(m.name, m.unit, m.kind)
    ptype = "counter" if m.kind == "sum" else "gauge"
    fam = families.get(name)
    if fam is None:
        fam = families[name] = _Family(name, ptype, m.description or m.name)
    elif fam.type != ptype:
        once(logging.WARNING, f"prometheus: {m.name} maps to {name}, already a {fam.type}; left out")
        return
    key = labels(m.attributes)
    if key in fam.samples:
        once(logging.WARNING, f"prometheus: {m.name}: two values with the same labels {dict(key)}; first kept")
        return
    fam.samples[key] = m.value


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (every interface)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {listen!r}: expected host:port")
    return host.strip("[]"), int(port)


class PrometheusEndpoint:
    """`update` is a Reporter listener; `start` binds and serves, `close`/`aclose` stop."""

    def __init__(self, listen: str, resource: Mapping[str, AttrValue] | None = None) -> None:
        self.listen = listen
        self.resource = dict(resource or {})
        self._sample: HealthSample | None = None
        self._cache: tuple[HealthSample | None, bytes] | None = None
        self._lock = threading.Lock()
        self._once = LogOnce(log)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def update(self, sample: HealthSample) -> None:
        self._sample = sample  # a reference swap: scrapes in other threads see the old or the new one

    def body(self) -> bytes:
        sample = self._sample
        with self._lock:
            if self._cache is None or self._cache[0] is not sample:
                self._cache = (sample, render(sample, self.resource, self._once).encode())
            return self._cache[1]

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve. Raises DaemonError when the address cannot be used."""
        try:
            host, port = parse_listen(self.listen)
            family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        except (ValueError, OSError) as e:
            raise DaemonError(f"prometheus_listen {self.listen!r}: {e}") from e
        try:
            self._server = _Server((host, port), self, family)
        except OSError as e:
            raise DaemonError(f"prometheus_listen {self.listen!r}: cannot listen: {e.strerror}") from e
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="prometheus", daemon=True
        )
        self._thread.start()
        log.info("health: Prometheus metrics on http://%s/metrics", self.listen)

    def close(self) -> None:
        """Blocks up to one poll interval: from the event loop use `aclose`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], endpoint: PrometheusEndpoint, family: int) -> None:
        self.address_family = family  # read by TCPServer.__init__ when it makes the socket
        self.endpoint = endpoint
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pitstop"
    timeout = 30  # a client that connects and sends nothing does not hold a thread for ever

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            body, status, ctype = b"not found: the metrics are at /metrics\n", 404, "text/plain; charset=utf-8"
        else:
            assert isinstance(self.server, _Server)
            endpoint = self.server.endpoint
            body, status, ctype = endpoint.body(), 200, CONTENT_TYPE
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("prometheus: %s %s", self.address_string(), format % args)
