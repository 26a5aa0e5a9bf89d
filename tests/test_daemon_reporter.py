"""The health reporter (daemon/reporter.py) against a real loopback OTLP/HTTP receiver (tests/otlpkit.py) and a
real SQLite spool.

Must show: the receiver goes down for a while and comes back; every report arrives exactly once and in order.
Every test runs its event loop in debug mode and fails if a callback held the loop for long (a blocking call
made on the loop instead of in a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from otlpkit import OtlpReceiver

from pitstop.daemon.config import HealthConfig
from pitstop.daemon.health import HealthSample, HealthSampler, Metric
from pitstop.daemon.otlp import resource_attributes
from pitstop.daemon.prometheus import PrometheusEndpoint
from pitstop.daemon.reporter import Reporter
from pitstop.daemon.spool import Spool

RESOURCE = resource_attributes(host_name="rig-1", device_id="dev-0001", version="0.1.0", booted_slot="a")
SLOW_CALLBACK_S = 0.5  # generous: two shared cores; a blocking HTTP request or fsync on the loop is caught anyway
T = TypeVar("T")


@pytest.fixture(autouse=True)
def no_blocking_on_the_loop(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.WARNING, "asyncio"):
        yield
    records = caplog.get_records("call")
    slow = [r.getMessage() for r in records if r.name == "asyncio" and " took " in r.getMessage()]
    assert not slow, f"the event loop was blocked: {slow}"


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    async def main() -> T:
        asyncio.get_running_loop().slow_callback_duration = SLOW_CALLBACK_S
        return await asyncio.wait_for(scenario(), timeout)

    return asyncio.run(main(), debug=True)


async def until(cond: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met in {timeout} s")
        await asyncio.sleep(0.01)


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Counting:
    """A cheap sampler: one gauge with the sample's number."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> HealthSample:
        self.n += 1
        return HealthSample(time.time_ns(), (Metric("test.sample", self.n, "{sample}"),))


def config(rx: OtlpReceiver, **kw: Any) -> HealthConfig:
    return HealthConfig(**{"interval_s": 0.05, "otlp_url": rx.url, "otlp_timeout_s": 2.0, **kw})


def reporter(cfg: HealthConfig, sample: Callable[[], HealthSample], spool: Spool, **kw: Any) -> Reporter:
    return Reporter(cfg, sample, spool, RESOURCE, **{"backoff_min_s": 0.02, "backoff_max_s": 0.2, **kw})


def metric_value(rx: OtlpReceiver, index: int, name: str) -> float | int:
    (m,) = [m for m in rx.received[index].report.samples[0].metrics if m.name == name]
    return m.value


def test_upstream_outage_every_report_exactly_once_in_order(tmp_path: Path) -> None:
    """The must-show: the receiver goes away for a while (many intervals) and comes back."""
    n = 60
    with OtlpReceiver() as rx, Spool(tmp_path / "spool.db", 10_000) as spool:
        cfg = config(rx, partitions=(Path("/"),))
        rep = reporter(cfg, HealthSampler(cfg.partitions).sample, spool)
        outage: dict[str, int] = {}

        async def scenario() -> None:
            task = asyncio.create_task(rep.run(samples=n))
            await until(lambda: len(rx.seqs) >= 10, what="first reports")
            await asyncio.to_thread(rx.stop)
            outage["from"] = rep.status.sampled
            await asyncio.sleep(0.75)  # 15 intervals
            outage["queued"] = rep.status.queued
            outage["refused"] = rep.status.send_errors
            await asyncio.to_thread(rx.start)
            await asyncio.wait_for(rep.wait_drained(), 30)
            await stop(task)

        run(scenario)

        # Every report arrived exactly once, in order, and nothing is left behind.
        assert rx.seqs == list(range(1, n + 1))
        assert not rx.duplicates()
        assert len({r.spool_id for r in rx.received}) == 1
        assert [r.at for r in rx.received] == sorted(r.at for r in rx.received)
        c = spool.counters()
        assert (c.queued, c.delivered, c.dropped, c.rejected) == (0, n, 0, 0)
        # The outage was real: reports piled up and delivery attempts failed meanwhile.
        assert outage["queued"] >= 5, outage
        assert outage["refused"] >= 3, outage
        assert rep.status.send_errors >= outage["refused"]
        assert rep.status.delivered == n and rep.status.queued == 0
        # The reports are real samples of this machine, and say who sent them.
        first = rx.received[0].report
        assert first.resource["device.id"] == "dev-0001" and first.resource["service.name"] == "pitstop"
        names = {m.name for m in first.samples[0].metrics}
        assert {
            "system.cpu.utilization",
            "system.memory.usage",
            "system.filesystem.usage",
            "system.uptime",
            "pitstop.spool.queued",
            "pitstop.spool.dropped",
        } <= names
        # A report taken during the outage says how many were waiting.
        assert max(metric_value(rx, i, "pitstop.spool.queued") for i in range(n)) >= 5


def test_spool_bound_during_outage_drops_oldest_and_reports_it(tmp_path: Path) -> None:
    with OtlpReceiver() as rx, Spool(tmp_path / "spool.db", 5) as spool:
        rx.stop()  # down from the start
        rep = reporter(config(rx), Counting(), spool)

        async def scenario() -> None:
            task = asyncio.create_task(rep.run())
            await until(lambda: rep.status.dropped >= 8, what="drops")
            await asyncio.to_thread(rx.start)
            await until(lambda: len(rx.seqs) >= 8, what="delivery after the outage")
            rep.stop_sampling()
            await asyncio.wait_for(rep.wait_drained(), 30)
            await stop(task)

        run(scenario)

        seqs = [s for s in rx.seqs if s is not None]
        assert seqs == sorted(seqs) and len(seqs) == len(rx.seqs) and not rx.duplicates()
        c = spool.counters()
        assert c.queued == 0 and c.last_seq == seqs[-1]
        # Only the oldest went, each counted once: nothing delivered was also counted as dropped. (The report
        # being sent when the receiver came back is spared by the bound, so the first one may be older.)
        missing = sorted(set(range(1, c.last_seq + 1)) - set(seqs))
        assert len(missing) == c.dropped >= 8
        assert max(missing) < seqs[1]
        assert seqs[1:] == list(range(seqs[1], c.last_seq + 1))
        assert c.delivered == len(seqs) and c.last_seq == c.delivered + c.dropped
        # The drops are reported: the newest report carries the final count, and the count only grew.
        dropped = [metric_value(rx, i, "pitstop.spool.dropped") for i in range(len(seqs))]
        assert dropped[-1] == c.dropped
        assert dropped == sorted(dropped)
        assert rep.status.dropped == c.dropped


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("form", ["seconds", "date"])
def test_retry_after_is_honoured(tmp_path: Path, status: int, form: str) -> None:
    with OtlpReceiver() as rx, Spool(tmp_path / "spool.db", 100) as spool:
        retry_after = "1" if form == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
        rx.fail(status, retry_after=retry_after)
        rep = reporter(config(rx), Counting(), spool, backoff_min_s=0.01)

        async def scenario() -> None:
            task = asyncio.create_task(rep.run(samples=3))
            await asyncio.wait_for(rep.wait_drained(), 30)
            await stop(task)

        run(scenario)
        assert rx.seqs == [1, 2, 3]
        refused, retried = rx.attempts[0], rx.attempts[1]
        assert (refused.status, refused.seq) == (status, 1)
        assert (retried.status, retried.seq) == (200, 1)  # the same report again, not the next one
        assert retried.at - refused.at >= 0.9, f"retried after {retried.at - refused.at:.3f} s"
        assert rep.status.send_errors == 1 and f"HTTP {status}" in (rep.status.last_error or "")


def test_server_errors_back_off_and_keep_the_report(tmp_path: Path) -> None:
    with OtlpReceiver() as rx, Spool(tmp_path / "spool.db", 100) as spool:
        rx.fail(500, count=3)
        rep = reporter(config(rx), Counting(), spool, backoff_min_s=0.05, backoff_max_s=0.1)

        async def scenario() -> None:
            task = asyncio.create_task(rep.run(samples=2))
            await asyncio.wait_for(rep.wait_drained(), 30)
            await stop(task)

        run(scenario)
        assert rx.seqs == [1, 2]
        assert [(a.status, a.seq) for a in rx.attempts] == [(500, 1), (500, 1), (500, 1), (200, 1), (200, 2)]
        gaps = [b.at - a.at for a, b in zip(rx.attempts[:3], rx.attempts[1:4], strict=True)]
        assert gaps[0] >= 0.05 * 0.8 - 0.01 and gaps[1] >= 0.1 * 0.8 - 0.01  # doubling, capped, with jitter
        assert rep.status.send_errors == 3


def test_client_error_rejects_the_report_and_counts_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with OtlpReceiver() as rx, Spool(tmp_path / "spool.db", 100) as spool:
        rx.fail(400, body=b"metric names must be ASCII")
        rep = reporter(config(rx), Counting(), spool)

        async def scenario() -> None:
            task = asyncio.create_task(rep.run(samples=6))
            await asyncio.wait_for(rep.wait_drained(), 30)
            await stop(task)

        with caplog.at_level(logging.WARNING, "pitstop.daemon.reporter"):
            run(scenario)
        assert rx.seqs == [2, 3, 4, 5, 6]
        c = spool.counters()
        assert (c.rejected, c.delivered, c.queued) == (1, 5, 0)
        assert rep.status.rejected == 1
        assert "HTTP 400" in (rep.status.last_error or "") and "must be ASCII" in (rep.status.last_error or "")
        assert "refuses reports for good" in caplog.text
        assert metric_value(rx, -1, "pitstop.upstream.rejected") == 1


def test_restarted_daemon_continues_without_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with OtlpReceiver() as rx:

        async def first_run() -> None:
            with Spool(path, 100) as spool:
                rep = reporter(config(rx), Counting(), spool)
                task = asyncio.create_task(rep.run(samples=8))
                await until(lambda: len(rx.seqs) >= 3, what="first reports")
                await asyncio.to_thread(rx.stop)
                await until(lambda: rep.status.sampled >= 8, what="all samples")
                await stop(task)  # the daemon stops with reports still queued
                assert len(spool) >= 4

        async def second_run() -> None:
            with Spool(path, 100) as spool:
                rep = reporter(config(rx), Counting(), spool)
                task = asyncio.create_task(rep.run(samples=4))
                await asyncio.wait_for(rep.wait_drained(), 30)
                await stop(task)
                assert len(spool) == 0

        run(first_run)
        rx.start()
        run(second_run)
        assert rx.seqs == list(range(1, 13))
        assert not rx.duplicates()
        assert len({r.spool_id for r in rx.received}) == 1


def test_stop_while_a_request_is_on_the_wire(tmp_path: Path) -> None:
    """Cancelled mid-request, the reporter waits for the answer and records it: no resend after restart."""
    path = tmp_path / "spool.db"
    with OtlpReceiver() as rx:
        rx.delay_s = 0.6

        async def first_run() -> None:
            with Spool(path, 100) as spool:
                rep = reporter(config(rx, interval_s=30.0), Counting(), spool)
                task = asyncio.create_task(rep.run(samples=1))
                await until(lambda: rep.status.sampled == 1, what="a sample")
                await asyncio.sleep(0.2)  # the request is on the wire, its answer 0.4 s away
                assert len(spool) == 1
                await stop(task)
                assert len(spool) == 0 and spool.counters().delivered == 1

        async def second_run() -> None:
            with Spool(path, 100) as spool:
                rep = reporter(config(rx), Counting(), spool)
                task = asyncio.create_task(rep.run(samples=1))
                await asyncio.wait_for(rep.wait_drained(), 30)
                await stop(task)

        run(first_run)
        rx.delay_s = 0
        run(second_run)
        assert rx.seqs == [1, 2]
        assert [a.seq for a in rx.attempts] == [1, 2]


def test_no_upstream_still_feeds_prometheus(tmp_path: Path) -> None:
    cfg = HealthConfig(interval_s=0.05, otlp_url=None, partitions=(Path("/"),))
    endpoint = PrometheusEndpoint("127.0.0.1:0", RESOURCE)
    endpoint.start()
    try:
        rep = Reporter(cfg, HealthSampler(cfg.partitions).sample, None, RESOURCE, listeners=[endpoint.update])

        async def scenario() -> None:
            task = asyncio.create_task(rep.run(samples=2))
            await until(lambda: rep.status.sampled == 2, what="samples")
            await asyncio.sleep(0.01)
            host, port = endpoint.address
            text = (await asyncio.to_thread(requests.get, f"http://{host}:{port}/metrics", timeout=10)).text
            assert "system_filesystem_usage_bytes{" in text and 'system_filesystem_mountpoint="/"' in text
            assert "system_cpu_utilization_ratio{" in text and 'target_info{device_id="dev-0001"' in text
            assert "pitstop_spool" not in text  # nothing is spooled without an upstream
            await stop(task)

        run(scenario)
        assert rep.status.upstream is None and rep.status.sampled == 2
    finally:
        endpoint.close()


def test_spool_required_when_pushing() -> None:
    with pytest.raises(ValueError, match="needs a spool"):
        Reporter(HealthConfig(otlp_url="http://127.0.0.1:1/v1/metrics"), Counting(), None, RESOURCE)


def test_reconfigure_moves_to_another_receiver_in_order(tmp_path: Path) -> None:
    with OtlpReceiver() as old, OtlpReceiver() as new, Spool(tmp_path / "spool.db", 100) as spool:
        rep = reporter(config(old), Counting(), spool)

        async def scenario() -> None:
            task = asyncio.create_task(rep.run(samples=12))
            await until(lambda: len(old.seqs) >= 4, what="reports to the old receiver")
            assert rep.reconfigure(config(new, interval_s=0.02, otlp_headers={"Authorization": "Bearer x"}))
            await asyncio.wait_for(rep.wait_drained(), 30)
            await stop(task)

        run(scenario)
        seqs = old.seqs + new.seqs
        assert seqs == list(range(1, 13)) and old.seqs and new.seqs
        assert not rep.reconfigure(HealthConfig(otlp_url=None))  # switching pushing off needs a new reporter
        assert spool.max_reports == HealthConfig().spool_max_reports


def test_summary(tmp_path: Path) -> None:
    with OtlpReceiver() as rx, Spool(tmp_path / "spool.db", 100) as spool:
        cfg = config(rx, partitions=(Path("/"),))
        rep = reporter(cfg, HealthSampler(cfg.partitions).sample, spool)

        async def scenario() -> None:
            task = asyncio.create_task(rep.run(samples=2))
            await asyncio.wait_for(rep.wait_drained(), 30)
            await stop(task)

        run(scenario)
        s = rep.summary()
        assert 0 <= s["cpu.utilization"] <= 1 and 0 < s["memory.utilization"] < 1 and s["uptime_s"] > 0
        assert 0 <= s["filesystem.utilization:/"] <= 1
        assert s["reports.sampled"] == 2 and s["reports.delivered"] == 2 and s["reports.queued"] == 0
        assert abs(s["reports.last_delivered_unix_s"] - time.time()) < 60
        assert all(isinstance(v, float | int) for v in s.values())
