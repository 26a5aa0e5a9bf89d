"""The daemon's health pipeline, assembled from its configuration: the sampler with its sources (system, GPU,
inference loops, update state, slots), the durable spool, the OTLP push and the Prometheus endpoint
(docs/health.md)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pitstop import __version__
from pitstop.daemon.config import DaemonConfig
from pitstop.daemon.core import DaemonCore
from pitstop.daemon.gpu_health import gpu_source
from pitstop.daemon.health import HealthSampler, Metric, inference_metrics, slot_metrics, state_metric
from pitstop.daemon.otlp import resource_attributes
from pitstop.daemon.prometheus import PrometheusEndpoint
from pitstop.daemon.reporter import Reporter

if TYPE_CHECKING:
    from pitstop.daemon.spool import Spool

LoopFigures = Callable[[], dict[str, dict[str, object]]]


class HealthService:
    def __init__(self, cfg: DaemonConfig, core: DaemonCore, loop_figures: LoopFigures | None = None) -> None:
        self.core = core
        self.sampler = HealthSampler(cfg.health.partitions)
        self._gpu = gpu_source()
        self.sampler.add_source("gpu", self._gpu)
        if loop_figures is not None:
            figures = loop_figures
            self.sampler.add_source(
                "loops", lambda: [m for name, fig in figures().items() for m in inference_metrics(name, fig)]
            )
        self.sampler.add_source("update", lambda: [state_metric("pitstop.update.state", core.state.value)])
        self.sampler.add_source("slots", self._slots)
        slots = core.status.slots
        resource = resource_attributes(
            host_name=socket.gethostname(), device_id=cfg.update.controller_id, version=__version__,
            booted_slot=slots.booted,
        )  # fmt: skip
        self.spool: Spool | None = None
        if cfg.health.otlp_url:
            # sqlite3 (and, in the reporter, requests and protobuf) load only when pushing: see reporter.py.
            from pitstop.daemon.spool import SPOOL_FILE, open_spool  # noqa: PLC0415

            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self.spool = open_spool(cfg.state_dir / SPOOL_FILE, cfg.health.spool_max_reports)
        self.prom = (
            PrometheusEndpoint(cfg.health.prometheus_listen, resource) if cfg.health.prometheus_listen else None
        )
        listeners = [self.prom.update] if self.prom else []
        self.reporter = Reporter(cfg.health, self.sampler.sample, self.spool, resource, listeners=listeners)
        self._task: asyncio.Task[None] | None = None

    def _slots(self) -> Iterable[Metric]:
        st = self.core.status.slots
        rows = {
            v.name: {"bootable": v.bootable, "primary": v.primary, "tries_left": v.tries_left,
                     "pending_commit": v.pending_commit}
            for v in st.slots
        }  # fmt: skip
        return slot_metrics(st.booted, rows)

    def summary(self) -> dict[str, float]:
        return self.reporter.summary()

    def start(self) -> None:
        if self.prom is not None:
            self.prom.start()
        self._task = asyncio.get_running_loop().create_task(self.reporter.run(), name="health-reporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.prom is not None:
            await self.prom.aclose()
        if self.spool is not None:
            self.spool.close()
        # A Jetson's source keeps a tegrastats child: stop it with the daemon, not at interpreter exit.
        close = getattr(self._gpu, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
