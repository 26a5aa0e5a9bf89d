"""The health reporter: sample every interval, spool the report, deliver the spool upstream strictly in order.

Two asyncio tasks. The sampler takes a sample (in a worker thread: it reads /proc, /sys and calls statvfs),
hands it to the listeners (the Prometheus endpoint), encodes it as one OTLP request carrying its spool seq,
and puts it in the spool. The sender posts the oldest spooled report, and only once that one is settled
(acknowledged, or refused for good) does it look at the next: report n+1 never leaves before report n.
One report = one spool row = one HTTP request; catching up after an outage just sends them back to back.

OTLP/HTTP outcomes (https://opentelemetry.io/docs/specs/otlp/#otlphttp-response):
- 2xx: delivered; the row is acknowledged (deleted, counted as delivered).
- 429, 502, 503, 504: the receiver is busy or down: retry the same report after Retry-After when the receiver
  gives one, else after the back-off.
- any other 4xx: the receiver will never take this report: it is deleted and counted as rejected.
- other 5xx, 3xx, connection errors, timeouts: retry the same report with exponential back-off (capped).

Delivery is at least once on the wire: if the daemon dies after the receiver took a report but before the
acknowledgement was recorded, that report is sent again, with the same seq, so the receiver can drop it.
A graceful stop (task cancelled) lets a request already on the wire finish and records its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pitstop.daemon.config import HealthConfig
from pitstop.daemon.errors import SpoolError
from pitstop.daemon.health import AttrValue, HealthSample, LogOnce, Metric
from pitstop.daemon.otlp import CONTENT_TYPE, SEQ_ATTR, SPOOL_ATTR, encode

if TYPE_CHECKING:
    # requests, protobuf and sqlite3 (the spool) load only when there is an OTLP URL to push to: without one
    # the daemon never needs them (about 10 MiB of its memory; benchmarks/daemon_footprint.py).
    import requests

    from pitstop.daemon.spool import Entry, Spool, SpoolCounters

log = logging.getLogger(__name__)

RETRYABLE = frozenset({429, 502, 503, 504})
Listener = Callable[[HealthSample], None]


@dataclass(frozen=True, slots=True)
class ReporterStatus:
    """The reporter's figures, for the D-Bus health summary. Spool counters persist across restarts; the
    others count since this reporter started."""

    upstream: str | None  # the OTLP URL, None when not pushing
    sampled: int = 0  # samples taken
    queued: int = 0  # reports waiting in the spool
    delivered: int = 0
    rejected: int = 0
    dropped: int = 0
    send_errors: int = 0  # failed delivery attempts (each retry counts)
    spool_errors: int = 0  # reports that could not be spooled (disk full, I/O error): lost
    last_error: str | None = None
    last_delivered_ns: int | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: int | None  # None: no HTTP answer (connection refused, timeout…)
    error: str | None = None
    retry_after_s: float | None = None
    rejected_points: int = 0  # partial success: points the receiver refused inside an accepted request


class Reporter:
    def __init__(
        self,
        config: HealthConfig,
        sample: Callable[[], HealthSample],
        spool: Spool | None,
        resource: Mapping[str, AttrValue],
        *,
        listeners: Sequence[Listener] = (),
        session: requests.Session | None = None,
        backoff_min_s: float = 1.0,
        backoff_max_s: float = 300.0,
        retry_after_max_s: float = 3600.0,
        scope_version: str = "",
    ) -> None:
        if config.otlp_url is not None and spool is None:
            raise ValueError("pushing to an OTLP receiver needs a spool")
        self.config = config
        self.url = config.otlp_url
        self._sample = sample
        self._spool = spool if self.url is not None else None
        self._resource = dict(resource)
        self._listeners = list(listeners)
        # Only a reporter that pushes needs a session (pushing cannot be switched on in place: `reconfigure`).
        if session is None and self.url is not None:
            import requests  # noqa: PLC0415 - see the imports

            session = requests.Session()
        self._session = session
        if session is not None:
            session.headers.update(config.otlp_headers)
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self._scope_version = scope_version
        self._start_ns = time.time_ns()
        # Written from worker threads (sampler and sender at once): one lock for the plain counters.
        self._lock = threading.Lock()
        self._sampled = 0
        self._send_errors = 0
        self._spool_errors = 0
        self._last_error: str | None = None
        self._last_delivered_ns: int | None = None
        self._counters: SpoolCounters | None = None  # the spool's, as of the last put or settle
        self._stop_sampling = asyncio.Event()
        self._sampling_done = asyncio.Event()
        self._wake = asyncio.Event()  # the sampler spooled something
        self._idle = asyncio.Event()  # the sender found the spool empty
        self._once = LogOnce(log)
        self.latest: HealthSample | None = None

    # -- public -----------------------------------------------------------------------------------------

    def reconfigure(self, config: HealthConfig) -> bool:
        """Apply a reloaded [health] table in place: interval, URL, headers, timeout, spool bound. Returns False
        when that cannot be done (pushing switched on or off): then cancel this reporter and start a new one on
        the same spool, which picks up where this one stopped."""
        if (config.otlp_url is None) != (self.url is None):
            return False
        if self._session is not None:
            for name in set(self.config.otlp_headers) - set(config.otlp_headers):
                self._session.headers.pop(name, None)
            self._session.headers.update(config.otlp_headers)
        self.config = config
        self.url = config.otlp_url
        if self._spool is not None:
            self._spool.max_reports = config.spool_max_reports  # applied at the next put
        return True

    def summary(self) -> dict[str, float]:
        """A flat summary of the latest sample and the delivery figures (the D-Bus Health property)."""
        return summary(self.latest, self.status)

    @property
    def status(self) -> ReporterStatus:
        """Cheap (no I/O): safe to call from the event loop."""
        c = self._counters
        with self._lock:
            return ReporterStatus(
                upstream=self.url,
                sampled=self._sampled,
                queued=c.queued if c else 0,
                delivered=c.delivered if c else 0,
                rejected=c.rejected if c else 0,
                dropped=c.dropped if c else 0,
                send_errors=self._send_errors,
                spool_errors=self._spool_errors,
                last_error=self._last_error,
                last_delivered_ns=self._last_delivered_ns,
            )

    async def run(self, samples: int | None = None) -> None:
        """Sample every interval (at most `samples` times) and deliver, until cancelled."""
        sender = asyncio.create_task(self._send_loop(), name="health-sender") if self._spool is not None else None
        try:
            if self._spool is not None:
                try:
                    self._counters = await asyncio.to_thread(self._spool.counters)
                except SpoolError as e:
                    self._once(logging.ERROR, f"health: cannot read the spool: {e.message}")
            await self._sample_loop(samples)
            if sender is not None:
                await sender
            else:
                await asyncio.Future()  # nothing to deliver: wait to be cancelled
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

    def stop_sampling(self) -> None:
        """Take no more samples; what is spooled is still delivered."""
        self._stop_sampling.set()

    async def wait_drained(self) -> None:
        """Return once sampling has ended and the spool is empty."""
        await self._sampling_done.wait()
        while self._spool is not None:
            self._idle.clear()
            if not await asyncio.to_thread(len, self._spool):
                return
            await self._idle.wait()

    # -- sampling ---------------------------------------------------------------------------------------

    async def _sample_loop(self, samples: int | None) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        taken = 0
        try:
            while not self._stop_sampling.is_set() and (samples is None or taken < samples):
                try:
                    sample = await asyncio.to_thread(self._take)
                except Exception as e:  # the sampler catches its sources' errors; this is a last guard
                    self._once(logging.ERROR, f"health: sampling failed: {e!r}")
                    sample = None
                taken += 1
                if sample is not None:
                    self._publish(sample)
                    if self._spool is not None:
                        await asyncio.to_thread(self._put, sample)
                        self._wake.set()
                due += self.config.interval_s
                due = max(due, loop.time())  # late (a slow disk, a suspended device): no burst to catch up
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_sampling.wait(), due - loop.time())
        finally:
            self._sampling_done.set()
            self._wake.set()

    def _publish(self, sample: HealthSample) -> None:
        self.latest = sample
        for listener in self._listeners:
            try:
                listener(sample)
            except Exception as e:
                self._once(logging.WARNING, f"health: listener {listener!r} failed: {e!r}")

    def _take(self) -> HealthSample:
        """Worker thread: the sample plus the reporter's own figures."""
        sample = self._sample()
        with self._lock:
            self._sampled += 1
        return HealthSample(sample.timestamp_ns, sample.metrics + tuple(self._own_metrics()))

    def _own_metrics(self) -> list[Metric]:
        c = self._counters
        if c is None:
            return []
        # Spool counters persist with the spool, so they count from its creation; a fresh spool is a reset.
        return [
            Metric("pitstop.spool.queued", c.queued, "{report}", description="Reports waiting to be delivered"),
            Metric(
                "pitstop.spool.dropped",
                c.dropped,
                "{report}",
                {},
                "sum",
                "Reports dropped unsent because the spool was full",
                c.created_ns,
            ),
            Metric(
                "pitstop.upstream.delivered",
                c.delivered,
                "{report}",
                {},
                "sum",
                "Reports the OTLP receiver acknowledged",
                c.created_ns,
            ),
            Metric(
                "pitstop.upstream.rejected",
                c.rejected,
                "{report}",
                {},
                "sum",
                "Reports the OTLP receiver refused for good (4xx), deleted unsent",
                c.created_ns,
            ),
            Metric(
                "pitstop.upstream.errors",
                self._send_errors,
                "{error}",
                {},
                "sum",
                "Failed delivery attempts (network errors, 5xx, 429)",
                self._start_ns,
            ),
        ]

    def _put(self, sample: HealthSample) -> None:
        """Worker thread: encode with the seq the spool assigns, inside its transaction."""
        spool = self._spool
        assert spool is not None

        def payload(seq: int) -> bytes:
            scope: dict[str, AttrValue] = {SEQ_ATTR: seq, SPOOL_ATTR: spool.spool_id}
            return encode(
                [sample],
                self._resource,
                start_ns=self._start_ns,
                scope_attributes=scope,
                scope_version=self._scope_version,
            ).SerializeToString()

        try:
            spool.put(payload)
            self._counters = spool.counters()
        except SpoolError as e:
            with self._lock:
                self._spool_errors += 1
                self._last_error = f"spool: {e.message}"
            self._once(logging.ERROR, f"health: report not spooled, lost: {e.message}")

    # -- sending ----------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        spool = self._spool
        assert spool is not None
        backoff = self.backoff_min_s
        while True:
            self._wake.clear()  # before looking: a put after this look sets it again
            try:
                entries = await asyncio.to_thread(spool.peek, 1)
            except SpoolError as e:
                self._once(logging.ERROR, f"health: cannot read the spool: {e.message}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if not entries:
                self._idle.set()
                await self._wake.wait()
                continue
            try:
                outcome = await self._deliver(entries[0])
            except SpoolError as e:
                # Delivered or not, the spool could not record it: the report goes again later (same seq).
                self._once(logging.ERROR, f"health: cannot record a delivery in the spool: {e.message}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if outcome.status is not None and 200 <= outcome.status < 300:
                backoff = self.backoff_min_s
                continue
            if outcome.status is not None and 400 <= outcome.status < 500 and outcome.status not in RETRYABLE:
                continue  # rejected: the next report goes at once
            if outcome.retry_after_s is not None:
                wait = max(outcome.retry_after_s, self.backoff_min_s)  # "Retry-After: 0" must not spin
            else:
                wait = backoff * random.uniform(0.8, 1.2)  # jitter: a fleet coming back must not call in step
                backoff = min(backoff * 2, self.backoff_max_s)
            await asyncio.sleep(wait)

    async def _deliver(self, entry: Entry) -> _Outcome:
        """Post one report and record its outcome. Cancelled mid-request, it still waits (up to the timeout)
        for the answer, so a report the receiver took is acknowledged and not sent again after a restart."""
        assert self._spool is not None
        self._spool.hold(entry.seq)  # the bound must not drop it while it may be arriving
        fut = asyncio.ensure_future(asyncio.to_thread(self._post, entry.payload))
        try:
            try:
                outcome = await asyncio.shield(fut)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    outcome = await asyncio.wait_for(fut, self.config.otlp_timeout_s + 1)
                    await asyncio.to_thread(self._settle, entry, outcome)
                raise
            await asyncio.to_thread(self._settle, entry, outcome)
        finally:
            self._spool.hold(None)
        return outcome

    def _post(self, payload: bytes) -> _Outcome:
        """Worker thread: one POST, classified."""
        import requests  # noqa: PLC0415 - loaded with the session already

        assert self.url is not None and self._session is not None
        timeout = self.config.otlp_timeout_s
        try:
            resp = self._session.post(
                self.url, data=payload, headers={"Content-Type": CONTENT_TYPE}, timeout=(timeout, timeout)
            )
        except requests.RequestException as e:
            return _Outcome(None, f"{type(e).__name__}: {_first_line(e)}")
        with resp:
            status = resp.status_code
            if 200 <= status < 300:
                return _Outcome(status, rejected_points=_rejected_points(resp.content))
            detail = resp.text[:200].strip() if resp.content else ""
            error = f"HTTP {status} {resp.reason}" + (f": {detail}" if detail else "")
            retry_after = None
            if status in RETRYABLE:
                retry_after = _retry_after(resp.headers.get("Retry-After"), self.retry_after_max_s)
            return _Outcome(status, error, retry_after)

    def _settle(self, entry: Entry, outcome: _Outcome) -> None:
        """Worker thread: acknowledge, reject or count the failure of report `entry`."""
        spool = self._spool
        assert spool is not None
        status = outcome.status
        if status is not None and 200 <= status < 300:
            spool.ack(entry.seq)
            with self._lock:
                self._last_delivered_ns = time.time_ns()
            if outcome.rejected_points:
                self._once(
                    logging.WARNING,
                    f"health: the receiver takes reports but refuses some of their points "
                    f"(report {entry.seq}: {outcome.rejected_points})",
                )
        elif status is not None and 400 <= status < 500 and status not in RETRYABLE:
            spool.reject(entry.seq)
            with self._lock:
                self._last_error = outcome.error
            self._once(
                logging.WARNING,
                f"health: the receiver refuses reports for good ({outcome.error}); "
                "they are dropped and counted as rejected",
            )
        else:
            with self._lock:
                self._send_errors += 1
                self._last_error = outcome.error
            self._once(logging.WARNING, f"health: cannot deliver to {self.url}: {outcome.error}; will retry")
            return
        self._counters = spool.counters()


def summary(sample: HealthSample | None, status: ReporterStatus) -> dict[str, float]:
    """cpu/memory/filesystem utilisation (0..1), uptime, the hottest sensor and the report counters."""
    out: dict[str, float] = {}
    if sample is not None:
        idle = sample.find("system.cpu.utilization", **{"cpu.mode": "idle"})
        if idle:
            out["cpu.utilization"] = 1.0 - float(idle[0].value)
        for name, key in (("system.memory.utilization", "memory.utilization"), ("system.uptime", "uptime_s")):
            found = sample.find(name)
            if found:
                out[key] = float(found[0].value)
        temps = [float(m.value) for m in sample.find("hw.temperature")]
        if temps:
            out["temperature.max_celsius"] = max(temps)
        for m in sample.find("system.filesystem.utilization"):
            out[f"filesystem.utilization:{m.attributes['system.filesystem.mountpoint']}"] = float(m.value)
    out.update(
        {
            "reports.sampled": status.sampled,
            "reports.queued": status.queued,
            "reports.delivered": status.delivered,
            "reports.rejected": status.rejected,
            "reports.dropped": status.dropped,
            "reports.send_errors": status.send_errors,
            "reports.spool_errors": status.spool_errors,
        }
    )
    if status.last_delivered_ns is not None:
        out["reports.last_delivered_unix_s"] = status.last_delivered_ns / 1e9
    return out


def _retry_after(value: str | None, cap: float) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return min(max(seconds, 0.0), cap) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), cap)


def _rejected_points(body: bytes) -> int:
    if not body:
        return 0
    from google.protobuf.message import DecodeError  # noqa: PLC0415 - see the imports
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: PLC0415
        ExportMetricsServiceResponse,
    )

    try:
        return int(ExportMetricsServiceResponse.FromString(body).partial_success.rejected_data_points)
    except DecodeError:
        return 0  # a receiver answering 200 with something else (JSON, text) still took the report


def _first_line(e: Exception) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
