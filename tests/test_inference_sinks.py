"""Result sinks (inference/sinks.py): JSON lines to real files and stdout, callbacks, and MQTT against a real
mosquitto broker on loopback (tests/mqttkit.py) that is killed and restarted under the sink."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from httpkit import TlsFiles, make_tls
from mqttkit import Broker, Subscriber, find_mosquitto, free_port

from pitstop.inference.errors import SinkError
from pitstop.inference.frames import Result
from pitstop.inference.sinks import CallbackSink, JsonlSink, MqttSink, open_sink, to_json


def result(i: int, **value: object) -> Result:
    return Result(index=i, captured_ns=1_000_000 + i, origin="rtsp://cam/live", kind="orientation",
                  value=value or {"label": i % 4, "score": 0.5})  # fmt: skip


def one_line(e: pytest.ExceptionInfo[SinkError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- JSON lines --------------------------------------------------------------------------------------------------


def test_jsonl_file_appends_and_flushes_each_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"earlier":true}\n')
    sink = open_sink(f"jsonl:{path}")
    for i in range(3):
        sink.write(result(i))
        # Flushed per result: a reader (tail -f, a log shipper) sees it before close.
        assert len(path.read_text().splitlines()) == 2 + i
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"earlier": True}
    assert lines[1] == {"index": 0, "captured_ns": 1_000_000, "origin": "rtsp://cam/live", "kind": "orientation",
                        "label": 0, "score": 0.5}  # fmt: skip
    assert [line["index"] for line in lines[1:]] == [0, 1, 2]


def test_jsonl_bare_path_and_numpy_values(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    sink = open_sink(str(path))
    boxes = np.array([[1.5, 2.0], [3.0, 4.0]], dtype=np.float32)
    sink.write(result(7, boxes=boxes, count=np.int64(2), score=np.float32(0.25), ok=np.bool_(True)))
    sink.close()
    assert json.loads(path.read_text()) == {"index": 7, "captured_ns": 1_000_007, "origin": "rtsp://cam/live",
                                            "kind": "orientation", "boxes": [[1.5, 2.0], [3.0, 4.0]], "count": 2,
                                            "score": 0.25, "ok": True}  # fmt: skip
    with pytest.raises(SinkError, match="written after close"):
        sink.write(result(8))


@pytest.mark.parametrize("uri", ["-", "stdout", "jsonl:-"])
def test_jsonl_stdout(uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    sink = open_sink(uri)
    sink.write(result(0))
    sink.write(result(1))
    sink.close()
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["index"] for line in out] == [0, 1]


def test_values_json_cannot_carry() -> None:
    with pytest.raises(SinkError, match=r"reserved field\(s\) index, kind"):
        to_json(result(0, index=3, kind="x"))
    with pytest.raises(SinkError, match=r"result 0 \(orientation\) is not JSON: .*set"):
        to_json(result(0, labels={1, 2}))
    with pytest.raises(SinkError, match="not JSON"):
        to_json(result(0, score=float("nan")))
    with pytest.raises(SinkError, match="not JSON"):
        to_json(result(0, score=np.float32("inf")))


def test_jsonl_cannot_open_or_write(tmp_path: Path) -> None:
    with pytest.raises(SinkError) as e:
        open_sink(f"jsonl:{tmp_path / 'missing' / 'r.jsonl'}")
    assert one_line(e) == f"jsonl:{tmp_path / 'missing' / 'r.jsonl'}: cannot open: No such file or directory"
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to fill")
    sink = JsonlSink("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(SinkError) as e:
        sink.write(result(0))
    assert one_line(e) == "jsonl:/dev/full: cannot write: No space left on device"


def test_unknown_sinks_and_options(tmp_path: Path) -> None:
    for uri in ("results.txt", "kafka://broker/topic", "jsonl:", "http://x/y.jsonl"):
        with pytest.raises(SinkError, match="unknown sink"):
            open_sink(uri)
    with pytest.raises(SinkError, match=r"unknown option 'qos' \(allowed: none\)"):
        open_sink(f"jsonl:{tmp_path / 'r.jsonl'}", qos=1)


# --- callback ----------------------------------------------------------------------------------------------------


def test_callback_sink() -> None:
    got: list[Result] = []
    sink = CallbackSink(got.append)
    sink.write(result(0))
    sink.write(result(1))
    sink.close()
    assert [r.index for r in got] == [0, 1]

    def broken(r: Result) -> None:
        raise KeyError("boxes")

    with pytest.raises(SinkError, match=r"callback .*broken: KeyError: 'boxes'") as e:
        CallbackSink(broken).write(result(0))
    assert isinstance(e.value.__cause__, KeyError)


# --- MQTT --------------------------------------------------------------------------------------------------------


@pytest.fixture
def mosquitto() -> str:
    return find_mosquitto()


@pytest.fixture
def broker(tmp_path: Path, mosquitto: str) -> Iterator[Broker]:
    with Broker(tmp_path / "broker", mosquitto) as b:
        yield b


def wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize("qos", [0, 1])
def test_mqtt_publishes_json(broker: Broker, qos: int) -> None:
    with Subscriber(broker.port, "pitstop/#", qos=1) as sub:
        sink = open_sink(broker.url("pitstop/results"), qos=str(qos), client_id="loop-1")
        assert isinstance(sink, MqttSink) and sink.connected
        for i in range(5):
            sink.write(result(i))
        sink.close()
        sink.close()  # idempotent
        with pytest.raises(SinkError, match="written after close"):
            sink.write(result(5))
        messages = sub.wait_for(5)
    assert [m.topic for m in messages] == ["pitstop/results"] * 5
    assert [m.qos for m in messages] == [qos] * 5
    assert [json.loads(m.payload) for m in messages] == [json.loads(to_json(result(i))) for i in range(5)]


def test_mqtt_close_flushes_queued_qos1(broker: Broker) -> None:
    with Subscriber(broker.port, "bulk", qos=1) as sub:
        sink = open_sink(broker.url("bulk"), qos=1)
        for i in range(300):
            sink.write(result(i))
        sink.close()  # returns once the broker acknowledged every one
        messages = sub.wait_for(300)
    assert sorted(json.loads(m.payload)["index"] for m in messages) == list(range(300))


def test_mqtt_broker_down_at_open(mosquitto: str) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(SinkError) as e:
        open_sink(f"mqtt://127.0.0.1:{port}/pitstop/results", connect_timeout=2)
    assert one_line(e) == f"mqtt://127.0.0.1:{port}/pitstop/results: cannot connect to the broker: Connection refused"
    assert time.monotonic() - start < 3


def test_mqtt_reconnects_after_broker_restart(broker: Broker) -> None:
    sink = MqttSink("127.0.0.1", broker.port, "live", qos=1, close_timeout=10)
    broker.kill()
    wait(lambda: not sink.connected)
    sink.write(result(0))  # queued by paho while the broker is away
    broker.start()
    with Subscriber(broker.port, "live", qos=1) as sub:
        wait(lambda: sink.connected)
        sink.write(result(1))
        sink.close()
        messages = sub.wait_for(2)
    assert sorted(json.loads(m.payload)["index"] for m in messages) == [0, 1]


def test_mqtt_qos0_is_dropped_while_away_and_qos1_reported_lost_at_close(broker: Broker) -> None:
    qos0 = MqttSink("127.0.0.1", broker.port, "t", qos=0)
    qos1 = MqttSink("127.0.0.1", broker.port, "t", qos=1, close_timeout=0.3, max_queued=2)
    broker.kill()
    wait(lambda: not qos0.connected and not qos1.connected)
    qos0.write(result(0))
    assert qos0.dropped == 1
    qos0.close()
    qos1.write(result(0))
    qos1.write(result(1))
    with pytest.raises(SinkError, match="2 results wait for the broker; giving up"):
        qos1.write(result(2))
    with pytest.raises(SinkError) as e:
        qos1.close()
    assert one_line(e) == f"mqtt://127.0.0.1:{broker.port}/t: 2 results not delivered within 0.3 s"


def test_mqtt_credentials(tmp_path: Path, mosquitto: str) -> None:
    with Broker(tmp_path / "auth", mosquitto, users={"loop": "s3cret"}) as broker:
        with pytest.raises(SinkError) as e:
            open_sink(broker.url("t"), username="loop", password="wrong")
        assert one_line(e) == f"mqtt://127.0.0.1:{broker.port}/t: the broker refused the connection: Not authorized"
        url = f"mqtt://loop:s3cret@127.0.0.1:{broker.port}/t"
        sink = open_sink(url, qos=1)
        sink.write(result(0))
        sink.close()
        with pytest.raises(SinkError) as e:
            open_sink(url, qos=5)
        assert "s3cret" not in str(e.value)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("mqtt-tls"))


def test_mqtts(tmp_path: Path, mosquitto: str, tls: TlsFiles) -> None:
    with Broker(tmp_path / "tls", mosquitto, tls=tls) as broker:
        with Subscriber(broker.port, "secure", tls=tls) as sub:
            sink = open_sink(broker.url("secure", "mqtts"), ca=str(tls.ca_cert), qos=1)
            sink.write(result(0))
            sink.close()
            assert json.loads(sub.wait_for(1)[0].payload)["index"] == 0
        with pytest.raises(SinkError) as e:
            open_sink(broker.url("secure", "mqtts"), connect_timeout=3)  # the system's CAs do not know ours
        assert "certificate verify failed" in one_line(e)
        with pytest.raises(SinkError, match="ca, cert and key need TLS"):
            open_sink(broker.url("secure"), ca=str(tls.ca_cert))


def test_mqtt_bad_uris() -> None:
    for uri, msg in (
        ("mqtt://127.0.0.1:1883/", "needs a topic"),
        ("mqtt://127.0.0.1:1883/a/#", "needs a topic without wildcards"),
        ("mqtt://127.0.0.1:1883/a/+/b", "needs a topic without wildcards"),
        ("mqtt:///topic", "no broker host"),
        ("mqtt://127.0.0.1:99999/t", "bad port"),
    ):
        with pytest.raises(SinkError, match=msg):
            open_sink(uri)
    with pytest.raises(SinkError, match="option 'qos' wants int"):
        open_sink("mqtt://127.0.0.1/t", qos="high")
