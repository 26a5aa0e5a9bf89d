"""Result sinks for inference loops: JSON lines (file or stdout), a Python callback, MQTT.

`open_sink(uri, **options)` picks the sink from the URI (forms and options: docs/inference-sources-sinks.md).
Every sink sends the same JSON object per result: `index`, `captured_ns`, `origin`, `kind` and the fields of
the result's `value`.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from pitstop.inference.errors import SinkError
from pitstop.inference.frames import Result, Sink
from pitstop.inference.sources import parse_options, redact

log = logging.getLogger("pitstop.inference.sinks")

RESERVED = ("index", "captured_ns", "origin", "kind")


def to_json(result: Result) -> str:
    """The result as one line of compact JSON; SinkError if `value` holds something JSON cannot carry."""
    clash = [k for k in RESERVED if k in result.value]
    if clash:
        raise SinkError(f"result value uses reserved field(s) {', '.join(clash)} (kind {result.kind!r})")
    record = {"index": result.index, "captured_ns": result.captured_ns, "origin": result.origin,
              "kind": result.kind, **result.value}  # fmt: skip
    try:
        return json.dumps(record, separators=(",", ":"), default=_numpy, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SinkError(f"result {result.index} ({result.kind}) is not JSON: {e}") from e


def _numpy(o: object) -> object:
    """Post-processing naturally yields numpy scalars and arrays: send them as plain numbers and lists."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        value = o.item()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is not a JSON number")
        return value
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class JsonlSink:
    """One JSON object per line, flushed per result, to a file (appended to) or to stdout (`path` None)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.name = "stdout" if path is None else str(path)
        self._own = path is not None
        self._out: IO[str] | None
        if path is None:
            self._out = None  # sys.stdout looked up at each write: tests and daemons replace it
            return
        try:
            self._out = Path(path).open("a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise SinkError(f"jsonl:{path}: cannot open: {e.strerror or e}") from e

    def write(self, result: Result) -> None:
        line = to_json(result) + "\n"
        out = self._out if self._own else sys.stdout
        if out is None:
            raise SinkError(f"jsonl:{self.name}: written after close")
        try:
            out.write(line)
            out.flush()
        except OSError as e:  # disk full, a reader that went away on stdout
            raise SinkError(f"jsonl:{self.name}: cannot write: {e.strerror or e}") from e

    def close(self) -> None:
        out, self._out = self._out, None
        try:
            if out is not None:
                out.close()
            elif not self._own:
                sys.stdout.flush()
        except OSError as e:
            raise SinkError(f"jsonl:{self.name}: cannot write: {e.strerror or e}") from e


class CallbackSink:
    """Hands each result to `fn`; an exception from it becomes SinkError (the original chained)."""

    def __init__(self, fn: Callable[[Result], object]) -> None:
        self._fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))

    def write(self, result: Result) -> None:
        try:
            self._fn(result)
        except SinkError:
            raise
        except Exception as e:
            raise SinkError(f"callback {self.name}: {type(e).__name__}: {' '.join(str(e).split())}") from e

    def close(self) -> None:
        pass


class MqttSink:
    """Publishes each result as JSON to `topic` on an MQTT broker, through paho-mqtt's background loop.

    The connection is made (or SinkError raised) before the constructor returns. Afterwards a lost broker is
    reconnected by paho (1 s doubling to 30 s); meanwhile QoS 0 results are dropped (counted in `dropped`) and
    QoS 1/2 ones queued, up to `max_queued`, beyond which write() raises SinkError. close() waits up to
    `close_timeout` s for what is queued to be sent (QoS 0) or acknowledged (QoS 1/2), then disconnects.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        *,
        qos: int = 0,
        retain: bool = False,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 60,
        tls: bool = False,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        connect_timeout: float = 5.0,
        close_timeout: float = 5.0,
        max_queued: int = 1000,
    ) -> None:
        scheme = "mqtts" if tls else "mqtt"
        self.name = f"{scheme}://{host}:{port}/{topic}"
        if not topic or any(c in topic for c in "+#\0"):
            raise SinkError(f"{self.name}: needs a topic without wildcards, as in mqtt://host:1883/pitstop/results")
        if qos not in (0, 1, 2) or keepalive <= 0 or connect_timeout <= 0 or close_timeout < 0 or max_queued < 1:
            raise SinkError(f"{self.name}: need qos 0, 1 or 2, keepalive > 0, timeouts > 0 and max_queued >= 1")
        self._topic, self._qos, self._retain = topic, qos, retain
        self._close_timeout = close_timeout
        self._max_queued = max_queued
        self.dropped = 0  # QoS 0 results published while the broker was away
        self._cond = threading.Condition()
        self._pending: set[int] = set()  # mids handed to paho and not yet sent (QoS 0) or acknowledged
        self._early: set[int] = set()  # mids paho finished before write() recorded them
        self._connected = False
        self._closed = False
        self._refused: str | None = None
        self._first = threading.Event()

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.connect_timeout = connect_timeout
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if username is not None:
            client.username_pw_set(username, password)
        try:
            if tls:
                client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
            elif ca or cert or key:
                raise SinkError(f"{self.name}: ca, cert and key need TLS (mqtts://)")
            client.connect(host, port, keepalive)
        except (OSError, ssl.SSLError, ValueError) as e:  # refused, unresolvable, timed out, bad certificate
            raise SinkError(f"{self.name}: cannot connect to the broker: {_reason(e)}") from e
        client.loop_start()
        self._client = client
        if not self._first.wait(connect_timeout) or self._refused is not None:
            why = self._refused or f"no answer within {connect_timeout:g} s"
            client.disconnect()
            client.loop_stop()
            raise SinkError(f"{self.name}: the broker refused the connection: {why}")

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> MqttSink:
        """`mqtt://[user[:password]@]host[:port]/topic`, or `mqtts://` for TLS (port 8883 by default)."""
        parts = urlsplit(uri)
        if parts.fragment or parts.query or uri.endswith(("#", "?")):
            raise SinkError(f"{uri}: needs a topic without wildcards ('#' would be a URL fragment)")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as e:
            raise SinkError(f"{uri}: bad port") from e
        if not parts.hostname:
            raise SinkError(f"{uri}: no broker host")
        if parts.username is not None:
            options.setdefault("username", unquote(parts.username))
            if parts.password is not None:
                options.setdefault("password", unquote(parts.password))
        return cls(parts.hostname, port, unquote(parts.path.lstrip("/")), tls=tls, **options)

    @property
    def connected(self) -> bool:
        return self._connected

    def write(self, result: Result) -> None:
        if self._closed:
            raise SinkError(f"{self.name}: written after close")
        payload = to_json(result)
        with self._cond:
            if self._qos and len(self._pending) >= self._max_queued:
                raise SinkError(f"{self.name}: {len(self._pending)} results wait for the broker; giving up")
        info = self._client.publish(self._topic, payload, qos=self._qos, retain=self._retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and self._qos == 0:
            self.dropped += 1  # QoS 0 promises at most once; paho does not queue it
            return
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN with QoS > 0: queued
            raise SinkError(f"{self.name}: cannot publish: {mqtt.error_string(info.rc)}")
        with self._cond:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)

    def close(self) -> None:
        """Send what is queued (bounded by close_timeout), then disconnect; SinkError if results were lost."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._cond.wait_for(lambda: not self._pending, timeout=self._close_timeout)
            unsent = len(self._pending)
        self._client.disconnect()
        self._client.loop_stop()
        if unsent:
            raise SinkError(f"{self.name}: {unsent} results not delivered within {self._close_timeout:g} s")

    # paho's callbacks, in its network thread

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            if not self._first.is_set():
                client.disconnect()  # a refused first connection ends here: no retries against bad credentials
        else:
            if self._first.is_set():
                log.info("%s: reconnected", self.name)
            self._connected = True
        self._first.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if self._connected and reason.value != 0:
            log.warning("%s: connection lost (%s); reconnecting", self.name, reason)
        self._connected = False

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode, props: object) -> None:
        with self._cond:
            if mid in self._pending:
                self._pending.discard(mid)
                self._cond.notify_all()
            else:
                self._early.add(mid)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


_OPTIONS: dict[str, type] = {
    "qos": int, "retain": bool, "client_id": str, "username": str, "password": str, "keepalive": int,
    "ca": str, "cert": str, "key": str, "connect_timeout": float, "close_timeout": float, "max_queued": int,
}  # fmt: skip


def open_sink(uri: str, **options: Any) -> Sink:
    """The sink `uri` names: `jsonl:PATH`, `-` or `stdout`, `mqtt://host[:port]/topic`, `mqtts://…`.

    Raises SinkError for an unknown form, a bad option, or a sink that cannot be opened.
    """
    if uri.startswith(("mqtt://", "mqtts://")):
        return MqttSink.from_uri(uri, **parse_options(redact(uri), options, _OPTIONS, SinkError))
    parse_options(uri, options, {}, SinkError)
    if uri in ("-", "stdout", "jsonl:-", "jsonl:stdout"):
        return JsonlSink(None)
    if uri.startswith("jsonl:") and len(uri) > len("jsonl:"):
        return JsonlSink(uri.removeprefix("jsonl:"))
    if uri.endswith((".jsonl", ".ndjson")) and "://" not in uri:
        return JsonlSink(uri)
    raise SinkError(f"{uri}: unknown sink (use jsonl:PATH, - for stdout, mqtt://host:port/topic, mqtts://…)")
