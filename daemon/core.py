"""What the daemon does when asked: install a bundle, commit or reject a slot, reboot, start and stop loops;
and what it reports: slots, update state and progress, health, loops. The D-Bus layer (dbus_api.py) and the
update agent call this; it calls the ota library, the loop supervisor and the health sampler.

Blocking work (the installer, the slot state files) runs in worker threads so the event loop, and with it
the watchdog and the D-Bus API, stays responsive; one job at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from pitstop import __version__
from pitstop.daemon.errors import BusyError, UnknownLoopError
from pitstop.errors import PitstopError
from pitstop.ota.device import Device, DeviceStatus
from pitstop.ota.system_config import SystemConfig

if TYPE_CHECKING:
    from pitstop.ota.http_source import HttpOptions

log = logging.getLogger(__name__)


class UpdateState(StrEnum):
    IDLE = "idle"
    INSTALLING = "installing"
    INSTALLED = "installed"  # written and activated: the new slot boots at the next reboot
    REBOOTING = "rebooting"
    VERIFYING = "verifying"  # booted into the new slot: the health gate runs
    COMMITTED = "committed"
    FAILED = "failed"


class Loops(Protocol):
    """The loop supervisor as the daemon sees it."""

    def names(self) -> Sequence[str]: ...
    async def start(self, name: str) -> None: ...
    async def stop(self, name: str) -> None: ...
    def rows(self) -> list[tuple[str, str, float, float, float, int, str]]:
        """(name, state, fps, p50 ms, p99 ms, restarts, cause) per loop."""
        ...


@dataclass
class Progress:
    done: int = 0
    total: int = 0
    stage: str = ""


class Events(Protocol):
    """Where the core announces changes (the D-Bus object's signals)."""

    def progress(self, stage: str, done: int, total: int) -> None: ...
    def state_changed(self, state: UpdateState, reason: str) -> None: ...
    def completed(self, success: bool, message: str) -> None: ...
    def slots_changed(self) -> None: ...


class NoEvents:
    def progress(self, stage: str, done: int, total: int) -> None:
        pass

    def state_changed(self, state: UpdateState, reason: str) -> None:
        pass

    def completed(self, success: bool, message: str) -> None:
        pass

    def slots_changed(self) -> None:
        pass


STATUS_MAX_AGE_S = 1.0  # the API's view of the slots is at most this old

# How often progress is announced at most: a bundle has tens of thousands of chunks.
PROGRESS_INTERVAL_S = 0.25

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
# (source, progress, TLS and auth for an http(s) source) -> the installed version
Installer = Callable[[str, ProgressFn, "HttpOptions | None"], str]


@dataclass(frozen=True)
class InstallOutcome:
    ok: bool
    version: str = ""  # the installed bundle's version (ok)
    message: str = ""  # why it failed, one line (not ok)


class UpdateFlow(Protocol):
    """The update agent as the API sees it: installs and checks go through it when it runs, so that a local
    install gets the same reboot policy and health gate as one from the server."""

    def install_local(self, source: str) -> None: ...
    async def check_now(self) -> bool: ...


class DaemonCore:
    def __init__(
        self,
        system: SystemConfig,
        *,
        device: Device | None = None,
        loops: Loops | None = None,
        health: Callable[[], Mapping[str, float]] | None = None,
        reboot: Callable[[], None] | None = None,
        installer: Installer | None = None,
        http: HttpOptions | None = None,
        delta: bool = True,
    ) -> None:
        self.system = system
        self.device = device or Device(system)
        self.loops = loops
        self.health_source = health  # set later by the daemon once its health pipeline exists
        self._reboot = reboot
        self._installer = installer or self._ota_install
        self.http = http  # TLS and auth for http(s) sources given to Install
        self.delta = delta  # [update] delta: reuse the booted slot's chunks over HTTP(S)
        self.flow: UpdateFlow | None = None  # set by the daemon once its update agent runs
        self.events: Events = NoEvents()
        self.state = UpdateState.IDLE
        self.error = ""
        self.progress = Progress()
        self._job: asyncio.Task[InstallOutcome] | None = None
        self._lock = asyncio.Lock()
        self._status = self.device.status()
        self._status_at = time.monotonic()

    # -- reported state ----------------------------------------------------------------------------------

    @property
    def status(self) -> DeviceStatus:
        return self._status

    async def refresh(self) -> None:
        self._status = await asyncio.to_thread(self.device.status)

    def current_status(self) -> DeviceStatus:
        """The status as the files say now, for the API: `pitstop mark-good --local` and friends change them
        behind the daemon's back. Re-read at most every STATUS_MAX_AGE_S (reading takes about 0.5 ms); kept
        as it was while a job holds the device."""
        now = time.monotonic()
        if now - self._status_at >= STATUS_MAX_AGE_S and not self._lock.locked():
            self._status_at = now
            try:
                self._status = self.device.status()
            except PitstopError as e:
                log.warning("device status not re-read: %s", e.message)
        return self._status

    def slot_rows(self) -> list[tuple[str, bool, bool, bool, bool, int, str]]:
        return [
            (v.name, v.booted, v.primary, v.bootable, v.pending_commit, v.tries_left, str(v.bundle.get("version", "")))
            for v in self.current_status().slots.slots
        ]

    def health(self) -> dict[str, float]:
        return dict(self.health_source()) if self.health_source else {}

    def loop_rows(self) -> list[tuple[str, str, float, float, float, int, str]]:
        return self.loops.rows() if self.loops else []

    @property
    def version(self) -> str:
        return __version__

    def set_state(self, state: UpdateState, reason: str = "") -> None:
        """The update agent's stages (verifying, committed, failed after the gate) as the API reports them."""
        if state is UpdateState.FAILED:
            self.error = reason
        self._set_state(state, reason)

    def _set_state(self, state: UpdateState, reason: str = "") -> None:
        if state != self.state:
            log.info("update state %s -> %s%s", self.state, state, f": {reason}" if reason else "")
            self.state = state
            self.events.state_changed(state, reason)

    # -- jobs --------------------------------------------------------------------------------------------

    def request_install(self, source: str) -> None:
        """Install() over D-Bus: through the update agent when it runs, else a plain install."""
        if self.flow is not None:
            self.flow.install_local(source)
        else:
            self.install(source)

    def busy(self) -> bool:
        return self._job is not None and not self._job.done()

    def install(
        self, source: str, *, http: HttpOptions | None = None, progress: ProgressFn | None = None
    ) -> asyncio.Task[InstallOutcome]:
        """Start installing `source`; returns the job (its end is also announced through `events.completed`).
        `http`: TLS and auth for this source (default: the daemon's); `progress`: called on the event loop."""
        if self.busy():
            raise BusyError("an install is already running")
        job = asyncio.get_running_loop().create_task(self._install(source, http or self.http, progress))
        self._job = job
        return job

    async def _install(self, source: str, http: HttpOptions | None, progress: ProgressFn | None) -> InstallOutcome:
        async with self._lock:
            loop = asyncio.get_running_loop()
            self.progress = Progress(0, 0, "install")
            self.error = ""
            self._set_state(UpdateState.INSTALLING, source)
            last = 0.0

            def on_progress(stage: str, done: int, total: int) -> None:  # a worker thread
                nonlocal last
                now = time.monotonic()
                if now - last >= PROGRESS_INTERVAL_S or (total and done >= total):
                    last = now
                    loop.call_soon_threadsafe(self._announce, stage, done, total, progress)

            try:
                version = await asyncio.to_thread(self._installer, source, on_progress, http)
            except PitstopError as e:
                await self._failed(e.message)
                return InstallOutcome(False, message=e.message)
            except Exception as e:
                log.exception("install of %s failed", source)
                message = f"internal error: {type(e).__name__}"
                await self._failed(message)
                return InstallOutcome(False, message=message)
            await self.refresh()
            self.events.slots_changed()
            self._set_state(UpdateState.INSTALLED, f"version {version}")
            when = "it runs after the next reboot" if self._status.slots.pending else "in use now, on trial"
            self.events.completed(True, f"installed version {version}: {when}")
            return InstallOutcome(True, version=version)

    def _announce(self, stage: str, done: int, total: int, also: ProgressFn | None) -> None:
        self.progress = Progress(done, total, stage)
        self.events.progress(stage, done, total)
        if also is not None:
            also(stage, done, total)

    async def _failed(self, message: str) -> None:
        self.error = message
        await self.refresh()
        self.events.slots_changed()
        self._set_state(UpdateState.FAILED, message)
        self.events.completed(False, message)

    def _ota_install(self, source: str, progress: ProgressFn, http: HttpOptions | None) -> str:
        # The installer and its HTTP stack load when an install runs, not when the daemon starts.
        from pitstop.ota.installer import Installer as OtaInstaller  # noqa: PLC0415
        from pitstop.ota.installer import InstallProgress  # noqa: PLC0415

        def on_progress(ev: InstallProgress) -> None:
            progress(ev.phase, ev.done, ev.total)

        result = OtaInstaller(self.system, http=http, progress=on_progress, delta=self.delta).install(source)
        return result.manifest.version

    async def mark_good(self) -> str:
        async with self._lock:
            status = await asyncio.to_thread(self.device.mark_good)
        self._status = status
        self.events.slots_changed()
        if self.state in (UpdateState.VERIFYING, UpdateState.INSTALLED):
            self._set_state(UpdateState.COMMITTED, "marked good")
        return status.slots.booted or ""

    async def mark_bad(self, slot: str) -> None:
        async with self._lock:
            self._status = await asyncio.to_thread(self.device.mark_bad, slot or None)
        self.events.slots_changed()

    async def reboot(self) -> None:
        if self._reboot is None:
            raise PitstopError("rebooting is not enabled in this daemon")
        if self.state == UpdateState.INSTALLED:
            self._set_state(UpdateState.REBOOTING, "requested")
        await asyncio.to_thread(self._reboot)

    async def check_for_update(self) -> bool:
        if self.flow is None:
            raise PitstopError("no update server is configured ([update] server, or provisioning)")
        return await self.flow.check_now()

    async def start_loop(self, name: str) -> None:
        await self._loops(name).start(name)

    async def stop_loop(self, name: str) -> None:
        await self._loops(name).stop(name)

    def _loops(self, name: str) -> Loops:
        if self.loops is None or name not in self.loops.names():
            raise UnknownLoopError(f"no loop named {name!r} is configured")
        return self.loops

    async def close(self) -> None:
        if self._job is not None and not self._job.done():
            # An install in a worker thread cannot be interrupted safely mid-write; it is crash-safe, so
            # waiting is only a courtesy. systemd's stop timeout bounds it.
            await asyncio.wait([self._job], timeout=5)
