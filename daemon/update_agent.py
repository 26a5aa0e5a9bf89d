"""The update agent: takes an update from the server (hawkBit DDI) or from Install() over D-Bus, installs it
through the daemon core, reboots by policy, runs the health gate on the new slot (or on new models/files),
then commits and reports success, or rolls back and reports the failure with its reason.

Every stage is recorded first (update_record.py, atomic), so a crash, a reboot or a power cut anywhere
leaves a record the agent continues from at its next start (`resume`). Blocking work (HTTP, the device's
state files, systemctl) runs in worker threads; the flow itself runs on the daemon's event loop.
docs/update-agent.md describes the flow, its feedback to the server and what each stage survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import platform
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pitstop import __version__, crashpoint
from pitstop.daemon import update_policy
from pitstop.daemon.config import UpdateConfig
from pitstop.daemon.core import DaemonCore, UpdateState
from pitstop.daemon.errors import BusyError, DdiError
from pitstop.daemon.health_gate import Gate, GatePolicy, LoopReading, Result, Verdict
from pitstop.daemon.update_record import OUTBOX_FILE, RECORD_FILE, Kind, Origin, RecordStore, Stage, UpdateRecord
from pitstop.errors import PitstopError
from pitstop.ota.slot_state import Phase
from pitstop.runner import run

if TYPE_CHECKING:
    from pitstop.daemon.ddi import DdiClient
    from pitstop.daemon.ddi_model import Deployment
    from pitstop.daemon.supervisor import Supervisor
    from pitstop.ota.http_source import HttpOptions

log = logging.getLogger(__name__)

GATE_INTERVAL_S = 2.0  # how often the gate looks at units and loops
PROGRESS_FEEDBACK_STEP = 10  # percent between "download" feedbacks to the server
REBOOT_CHECK_S = 60.0  # a scheduled reboot re-reads the wall clock this often (it may be stepped meanwhile)
MAX_ATTEMPTS = 3  # installs of one DDI action cut short by a crash or a power cut, before it is reported failed

UnitStates = Callable[[Sequence[str]], dict[str, str]]


def systemd_unit_states(units: Sequence[str]) -> dict[str, str]:
    """ActiveState of each unit, from `systemctl show` (units it does not know are "inactive")."""
    if not units:
        return {}
    out = run(["systemctl", "show", "--property=Id,ActiveState", "--", *units], check=False)
    states: dict[str, str] = {}
    for block, unit in zip(out.stdout.decode(errors="replace").split("\n\n"), units, strict=False):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        states[unit] = fields.get("ActiveState", "unknown")
    return {u: states.get(u, "unknown") for u in units}


def boottime() -> float:
    """Seconds since boot, suspend included: the gate's deadline counts from the boot, across daemon restarts."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def public_source(source: str) -> str:
    """A source as it may be logged and recorded: no user info, query or fragment (signed URLs carry tokens)."""
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https"):
        return source
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class UpdateAgent:
    def __init__(
        self,
        core: DaemonCore,
        cfg: UpdateConfig,
        state_dir: Path,
        *,
        loops: Supervisor | None = None,
        enabled_loops: Callable[[], tuple[str, ...]] = lambda: (),
        client: DdiClient | None = None,
        units: UnitStates = systemd_unit_states,
        now: Callable[[], dt.datetime] = dt.datetime.now,
        clock: Callable[[], float] = boottime,
        rand: Callable[[], float] = random.random,
        gate_interval_s: float = GATE_INTERVAL_S,
    ) -> None:
        self.core = core
        self.cfg = cfg
        self.store = RecordStore(state_dir / RECORD_FILE)
        self.outbox = RecordStore(state_dir / OUTBOX_FILE)  # a finished DDI update whose result is not sent yet
        self.unsent: UpdateRecord | None = None
        # One thread for everything sent to the server, so that its feedback arrives in the order it happened.
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddi-feedback")
        self.loops = loops
        self.enabled_loops = enabled_loops
        self.client = client
        self.units = units
        self.now = now
        self.clock = clock
        self.rand = rand
        self.gate_interval_s = gate_interval_s
        self.record: UpdateRecord | None = None
        self.last_result: UpdateRecord | None = None  # the last finished update, for status
        self._flow: asyncio.Task[None] | None = None
        self._reboot_task: asyncio.Task[None] | None = None
        self._poll_lock = asyncio.Lock()
        self._server_sleep: float | None = None
        self._failures = 0
        self._told: tuple[str, str] | None = None  # (action, reason) of the last "scheduled" feedback
        self._feedback_pct = -1
        self._retry = False  # an interrupted install of the recorded DDI action starts over at the next poll
        self.resumed = asyncio.Event()  # resume() has looked at the record: settled() now means this boot's flow

    # -- policy -------------------------------------------------------------------------------------------

    @property
    def policy(self) -> update_policy.RebootPolicy:
        return update_policy.RebootPolicy(self.cfg.reboot)

    @property
    def window(self) -> update_policy.Window | None:
        w = self.cfg.maintenance_window
        return update_policy.parse_window(w) if w else None

    def gate_policy(self) -> GatePolicy:
        c = self.cfg
        return GatePolicy(c.gate_required_units, c.gate_throughput_fraction, c.gate_deadline_s, c.gate_hold_s)

    # -- entry points ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Carry on with a recorded update, then poll the server (if one is configured) until cancelled."""
        await self.resume()
        if self.client is None:
            return
        while True:
            try:
                await self.check_now()
            except PitstopError as e:
                log.warning("update server: %s", e.message)
            delay = update_policy.poll_delay(
                self._server_sleep, default_s=self.cfg.poll_default_s, failures=self._failures, rand=self.rand()
            )
            await asyncio.sleep(delay)

    def _flow_running(self) -> bool:
        return self._flow is not None and not self._flow.done()

    def busy_reason(self) -> str | None:
        if self._flow_running():
            return "an update is in progress"
        if self.core.busy():
            return "an install is already running"
        rec = self.record
        if rec is not None and rec.stage is not Stage.DONE:
            if rec.stage is Stage.INSTALLED and rec.kind is Kind.ROOTFS:
                return f"version {rec.version} is installed and waits for its reboot"
            return f"an update is in progress ({rec.stage.value})"
        return None

    def install_local(self, source: str) -> None:
        """Install() over D-Bus: the same flow as a deployment from the server, without the feedback."""
        why = self.busy_reason()
        if why is not None:
            raise BusyError(why)
        rec = UpdateRecord(
            Origin.LOCAL, public_source(source), baseline=self.baseline(), from_slot=self.core.status.slots.booted
        )
        self._start_flow(self._install_flow(rec, source, None))

    async def check_now(self) -> bool:
        """One poll of the server now; whether it has a deployment for this device."""
        if self.client is None:
            raise PitstopError("no update server is configured ([update] server, or provisioning)")
        async with self._poll_lock:
            return await self._poll_once(self.client)

    async def settled(self) -> None:
        """Wait until the update flow under way (if any) has gone as far as it can without a reboot."""
        while (flow := self._flow) is not None and not flow.done():
            await asyncio.wait([flow])

    async def close(self) -> None:
        for t in (self._reboot_task, self._flow):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    def _start_flow(self, coro: Any) -> None:
        self._flow = asyncio.get_running_loop().create_task(self._guarded(coro))

    async def _guarded(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except PitstopError as e:
            log.error("update: %s", e.message)
            self.core.set_state(UpdateState.FAILED, e.message)
        except Exception:
            log.exception("update agent failed")
            self.core.set_state(UpdateState.FAILED, "internal error in the update agent (see the journal)")

    # -- what runs on the device ----------------------------------------------------------------------------

    def baseline(self) -> dict[str, float]:
        """Each running loop's results per second now, for the gate after the update."""
        if self.loops is None:
            return {}
        out = {}
        for st in self.loops.statuses():
            fps = float((st.figures or {}).get("throughput_fps", 0.0))
            if st.state.value == "running" and fps > 0:
                out[st.name] = round(fps, 3)
        return out

    def readings(self) -> dict[str, LoopReading]:
        if self.loops is None:
            return {}
        out = {}
        for st in self.loops.statuses():
            f = st.figures or {}
            out[st.name] = LoopReading(
                state=st.state.value,
                frames_out=int(f.get("frames_out", 0)),
                elapsed_s=float(f.get("elapsed_s", 0.0)),
                throughput_fps=float(f.get("throughput_fps", 0.0)),
                cause=st.cause or "",
            )
        return out

    async def _restart_loops(self) -> None:
        """Loops load their models when they start: after a model/files switch they start again."""
        if self.loops is None:
            return
        for name in self.enabled_loops():
            try:
                await self.loops.restart(name)
            except PitstopError as e:
                log.warning("loop %s not restarted: %s", name, e.message)

    # -- the record -----------------------------------------------------------------------------------------

    async def _save(self, rec: UpdateRecord) -> UpdateRecord:
        await asyncio.to_thread(self.store.save, rec)
        self.record = rec
        crashpoint.hit("agent.saved")
        return rec

    async def _finish(self, rec: UpdateRecord, success: bool, message: str, details: tuple[str, ...] = ()) -> None:
        rec = rec.done(success, message, details)
        (log.info if success else log.error)("update %s: %s", "succeeded" if success else "failed", message)
        self.core.set_state(UpdateState.COMMITTED if success else UpdateState.FAILED, message)
        if rec.origin is Origin.DDI:
            await self._to_outbox(rec)
            await self._report()
        else:
            self.last_result = rec
            self.record = None
            await asyncio.to_thread(self.store.clear)

    async def _to_outbox(self, rec: UpdateRecord) -> None:
        """The result goes to the outbox first, then the record is cleared: a crash between the two leaves both,
        and `resume` finishes the move. A new update may start while the result waits for the server."""
        await asyncio.to_thread(self.outbox.save, rec)
        crashpoint.hit("agent.saved")
        self.unsent = rec
        self.last_result = rec
        self.record = None
        await asyncio.to_thread(self.store.clear)

    async def _report(self) -> bool:
        """Send the final feedback of a finished DDI update; False if the server is out of reach (retried at
        each poll: the outbox keeps it until it went)."""
        rec = self.unsent
        if rec is None:
            return True
        if self.client is None or rec.action_id is None:
            log.warning("the result of action %s cannot be sent: no update server is configured", rec.action_id)
            await self._sent()
            return True
        from pitstop.daemon.ddi import DdiStatusError  # noqa: PLC0415
        from pitstop.daemon.ddi_model import Execution, Finished  # noqa: PLC0415

        finished = Finished.SUCCESS if rec.success else Finished.FAILURE
        client, action = self.client, rec.action_id
        try:
            await self._send(
                lambda: client.feedback(action, Execution.CLOSED, finished, details=[rec.message, *rec.details])
            )
        except DdiStatusError as e:
            if e.status not in (404, 410):  # gone: nothing left to tell
                log.warning("result of action %s not sent, retried at the next poll: %s", action, e.message)
                return False
        except DdiError as e:
            log.warning("result of action %s not sent, retried at the next poll: %s", action, e.message)
            return False
        await self._sent()
        return True

    async def _sent(self) -> None:
        self.unsent = None
        await asyncio.to_thread(self.outbox.clear)

    async def _send(self, call: Callable[[], None]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._sender, call)

    def _feedback(self, execution: str, *lines: str, progress: tuple[int, int] | None = None) -> None:
        """Intermediate feedback: sent in the background, lost if the server is out of reach (the final one is
        not)."""
        rec = self.record
        if self.client is None or rec is None or rec.origin is not Origin.DDI or rec.action_id is None:
            return
        from pitstop.daemon.ddi_model import Execution, Finished  # noqa: PLC0415

        client, action = self.client, rec.action_id

        def send() -> None:
            try:
                client.feedback(action, Execution(execution), Finished.NONE, progress=progress, details=lines)
            except DdiError as e:
                log.info("feedback %s on action %s not sent: %s", execution, action, e.message)

        asyncio.get_running_loop().run_in_executor(self._sender, send)

    # -- install ----------------------------------------------------------------------------------------------

    async def _install_flow(self, rec: UpdateRecord, source: str, http: HttpOptions | None) -> None:
        rec = await self._save(rec)
        self._feedback_pct = -1
        outcome = await self.core.install(source, http=http, progress=self._on_progress)
        if not outcome.ok:
            await self._finish(rec, False, f"install failed: {outcome.message}")
            return
        st = self.core.status
        kind = Kind.ROOTFS if st.slots.pending is not None else Kind.PAYLOADS
        rec = await self._save(
            replace(rec, stage=Stage.INSTALLED, kind=kind, version=outcome.version, target_slot=st.slots.pending)
        )
        if kind is Kind.ROOTFS:
            await self._reboot_by_policy(rec)
        else:
            self._feedback(
                "proceeding",
                f"version {rec.version} installed (models/files): restarting the loops on it, then the health gate",
            )
            await self._restart_loops()
            await self._verify(rec)

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        if not total:
            return
        pct = min(100, done * 100 // total)
        if pct >= self._feedback_pct + PROGRESS_FEEDBACK_STEP or (pct == 100 and self._feedback_pct < 100):
            self._feedback_pct = pct
            self._feedback("download", f"{stage}: {pct} %", progress=(pct, 100))

    async def _reboot_by_policy(self, rec: UpdateRecord) -> None:
        plan = update_policy.reboot_plan(self.policy, self.window, self.now())
        into = f"version {rec.version} is installed in slot {rec.target_slot}"
        if plan.when is update_policy.RebootWhen.NOW:
            self._feedback("proceeding", f"{into}: rebooting into it now")
            await self._reboot()
        elif plan.when is update_policy.RebootWhen.AT and plan.at is not None:
            self._feedback("proceeding", f"{into}: rebooting into it at {plan.at:%Y-%m-%d %H:%M} (maintenance window)")
            log.info("%s: reboot scheduled at %s", into, plan.at)
            self._reboot_task = asyncio.get_running_loop().create_task(self._reboot_at(plan.at))
        else:
            self._feedback("proceeding", f"{into}: waiting for a reboot by an operator")
            log.info("%s: waiting for a reboot by an operator (Reboot over D-Bus)", into)

    async def _reboot_at(self, at: dt.datetime) -> None:
        while (left := (at - self.now()).total_seconds()) > 0:
            await asyncio.sleep(min(left, REBOOT_CHECK_S))
        await self._reboot()

    async def _reboot(self) -> None:
        self.core.set_state(UpdateState.REBOOTING, "update installed")
        await self._flush()
        await self.core.reboot()

    async def _flush(self) -> None:
        """Wait until the feedback queued so far went (or failed): the server hears of a reboot before it."""
        await self._send(lambda: None)

    # -- the health gate ----------------------------------------------------------------------------------

    def _payloads_pending(self) -> bool:
        st = self.core.status
        return st.pending_bundle is not None and st.slots.pending is None

    async def _verify(self, rec: UpdateRecord) -> None:
        boot_id = await asyncio.to_thread(self.core.device.boot_id)
        if rec.gate_boot_id != boot_id or rec.gate_started is None or rec.stage is not Stage.VERIFYING:
            # The deadline counts from the gate's start in this boot; a restarted daemon does not extend it.
            rec = await self._save(replace(rec, stage=Stage.VERIFYING, gate_boot_id=boot_id, gate_started=self.clock()))
        self.core.set_state(UpdateState.VERIFYING, f"health gate for version {rec.version or '?'}")
        self._feedback(
            "proceeding", f"version {rec.version} runs: health gate (deadline {self.cfg.gate_deadline_s:g} s)"
        )
        gate = Gate(self.gate_policy(), rec.baseline, self.enabled_loops())
        assert rec.gate_started is not None
        while True:
            await self.core.refresh()
            if not self._still_on_trial(rec):
                await self._settled_elsewhere(rec)
                return
            units = await asyncio.to_thread(self.units, self.cfg.gate_required_units)
            res = gate.step(self.clock() - rec.gate_started, units, self.readings())
            if res.verdict is Verdict.PASS:
                await self._commit(rec, res)
                return
            if res.verdict is Verdict.FAIL:
                await self._roll_back(rec, res.reason, res.details)
                return
            await asyncio.sleep(self.gate_interval_s)

    def _still_on_trial(self, rec: UpdateRecord) -> bool:
        if rec.kind is Kind.PAYLOADS:
            return self._payloads_pending()
        return self.core.status.slots.phase is Phase.TRIAL

    async def _settled_elsewhere(self, rec: UpdateRecord) -> None:
        """The update was settled without the gate's verdict being recorded: by hand (MarkGood, `pitstop mark-good`,
        MarkBad), or by the gate itself just before a crash or power cut."""
        st = self.core.status.slots
        if rec.kind is Kind.ROOTFS and st.booted == rec.target_slot and st.phase is Phase.NONE:
            await self._finish(
                rec, True, f"version {rec.version} is committed (by the gate before a restart cut it short, or by hand)"
            )
        else:
            await self._finish(rec, False, f"version {rec.version} was settled by hand before the gate passed")

    async def _commit(self, rec: UpdateRecord, res: Result) -> None:
        await self.core.mark_good()
        where = f"slot {rec.target_slot}" if rec.kind is Kind.ROOTFS else "models/files"
        await self._finish(rec, True, f"version {rec.version} committed ({where}): {res.reason}", res.details)

    async def _roll_back(self, rec: UpdateRecord, reason: str, details: tuple[str, ...]) -> None:
        log.error("health gate failed for version %s: %s", rec.version, reason)
        rec = await self._save(
            replace(rec, stage=Stage.ROLLING_BACK, message=f"health gate failed: {reason}", details=details)
        )
        if rec.kind is not Kind.PAYLOADS:
            self._feedback("proceeding", f"{rec.message}: rolling back to slot {rec.from_slot}")
        await self._continue_rollback(rec)

    # -- across reboots -------------------------------------------------------------------------------------

    async def resume(self) -> None:
        """Continue from the record (and the device's own state) after a start, a reboot or a power cut."""
        try:
            await self._resume()
        finally:
            self.resumed.set()

    async def _resume(self) -> None:
        self.unsent = await asyncio.to_thread(self.outbox.load)
        rec = await asyncio.to_thread(self.store.load)
        if rec is not None and rec.stage is Stage.DONE:  # stopped between the outbox write and the clear
            if rec.origin is Origin.DDI and not rec.reported:
                await self._to_outbox(rec)
            else:
                await asyncio.to_thread(self.store.clear)
            rec = None
        self.record = rec
        await self.core.refresh()
        st = self.core.status
        phase = st.slots.phase
        if rec is None:
            if phase is Phase.TRIAL or self._payloads_pending():
                # Installed without the daemon (`pitstop install --local`): the same gate, without a baseline.
                kind = Kind.ROOTFS if phase is Phase.TRIAL else Kind.PAYLOADS
                rec = UpdateRecord(
                    Origin.LOCAL,
                    "installed without the daemon",
                    stage=Stage.INSTALLED,
                    kind=kind,
                    version=self._booted_version() if kind is Kind.ROOTFS else self._pending_version(),
                    target_slot=st.slots.booted if kind is Kind.ROOTFS else None,
                )
                self._start_flow(self._verify(rec))
            elif phase in (Phase.NONE, Phase.ROLLED_BACK):
                await self._routine_commit()
            return
        self._start_flow(self._continue(rec))

    def _booted_version(self) -> str:
        st = self.core.status.slots
        return next((str(v.bundle.get("version", "")) for v in st.slots if v.booted), "")

    async def _routine_commit(self) -> None:
        """Every boot with nothing on trial: the running slot is the good one; this refreshes its boot tries and
        settles a rollback (docs/install.md, "Boot counting")."""
        try:
            await self.core.mark_good()
        except PitstopError as e:
            log.warning("the running slot was not marked good: %s", e.message)

    async def _continue(self, rec: UpdateRecord) -> None:
        st = self.core.status.slots
        phase = st.phase
        if rec.stage is Stage.ROLLING_BACK:
            await self._continue_rollback(rec)
            return
        kind = rec.kind
        if kind is Kind.UNKNOWN:  # the daemon stopped during the install: what did it leave?
            kind = Kind.ROOTFS if st.pending is not None else Kind.PAYLOADS if self._payloads_pending() else kind
            rec = await self._save(
                replace(rec, kind=kind, target_slot=st.pending, version=rec.version or self._pending_version())
            )
        on_trial = phase is Phase.TRIAL if kind is Kind.ROOTFS else self._payloads_pending()
        if kind is not Kind.UNKNOWN and on_trial:
            await self._verify(rec)
        elif kind is Kind.ROOTFS and phase is Phase.ACTIVATED:
            rec = await self._save(replace(rec, stage=Stage.INSTALLED))
            self.core.set_state(UpdateState.INSTALLED, f"version {rec.version} waits for its reboot")
            await self._reboot_by_policy(rec)
        elif kind is Kind.ROOTFS and phase is Phase.ROLLED_BACK:
            await self._routine_commit()
            await self._finish(
                rec,
                False,
                f"slot {rec.target_slot} with version {rec.version} did not come up "
                f"(its boot tries ran out); slot {st.booted} runs again",
            )
        elif kind is Kind.UNKNOWN or (rec.stage is Stage.INSTALLING and phase in (Phase.NONE, Phase.INSTALLED)):
            await self._routine_commit()
            why = "the install was interrupted (the daemon stopped or the power failed); nothing was switched"
            if rec.origin is Origin.DDI and rec.attempts < MAX_ATTEMPTS:
                # The action is still open on the server: its next poll hands out a fresh link and it starts over.
                log.warning("%s: attempt %d of %d, again at the next poll", why, rec.attempts + 1, MAX_ATTEMPTS)
                self._retry = True
                return
            await self._finish(rec, False, f"{why} ({rec.attempts} attempts)" if rec.attempts > 1 else why)
        else:
            await self._routine_commit()
            await self._settled_elsewhere(rec)

    def _pending_version(self) -> str:
        st = self.core.status
        if st.slots.pending is not None:
            return next((str(v.bundle.get("version", "")) for v in st.slots.slots if v.name == st.slots.pending), "")
        return str((st.pending_bundle or {}).get("version", ""))

    async def _continue_rollback(self, rec: UpdateRecord) -> None:
        st = self.core.status.slots
        if rec.kind is Kind.PAYLOADS:
            if self._payloads_pending():
                await self.core.mark_bad("")
                await self._restart_loops()
            await self._finish(rec, False, f"{rec.message}; back on the previous models/files", rec.details)
        elif st.booted == rec.target_slot:
            # Right after the gate's verdict, or after a power cut before the reboot landed (marking bad again
            # is harmless): the previous slot next.
            await self.core.mark_bad(rec.target_slot or "")
            self.core.set_state(UpdateState.REBOOTING, "rolling back")
            await self._flush()
            await self.core.reboot()
        else:
            await self._routine_commit()
            await self._finish(rec, False, f"{rec.message}; slot {st.booted} runs again", rec.details)

    # -- the server -----------------------------------------------------------------------------------------

    async def _poll_once(self, client: DdiClient) -> bool:
        from pitstop.daemon.ddi import DdiStatusError  # noqa: PLC0415

        if self.unsent is not None:
            await self._report()
        try:
            base = await asyncio.to_thread(client.poll)
        except DdiError as e:
            self._failures += 1
            if self._failures == 1 or (isinstance(e, DdiStatusError) and not e.transient):
                log.warning("update server: %s", e.message)
            return False
        if self._failures:
            log.info("update server reachable again after %d failed polls", self._failures)
        self._failures = 0
        self._server_sleep = base.sleep_s
        if base.config_data_href is not None:
            await self._send_config_data(client)
        if base.cancel_href is not None:
            await self._on_cancel(client, base.cancel_href)
        if base.deployment_href is None:
            return False
        dep = await asyncio.to_thread(client.deployment, base.deployment_href)
        await self._on_deployment(client, dep)
        return True

    def attributes(self) -> dict[str, str]:
        st = self.core.status.slots
        return {
            "compatible": self.core.system.compatible,
            "pitstop_version": __version__,
            "booted_slot": st.booted or "unknown",
            "bundle_version": self._booted_version() or "unknown",
            "machine": platform.machine(),
        }

    async def _send_config_data(self, client: DdiClient) -> None:
        try:
            await asyncio.to_thread(client.put_config_data, self.attributes())
        except DdiError as e:
            log.warning("device attributes not sent: %s", e.message)

    async def _on_cancel(self, client: DdiClient, href: str) -> None:
        from pitstop.daemon.ddi_model import Execution, Finished  # noqa: PLC0415

        c = await asyncio.to_thread(client.cancel, href)
        rec = self.record
        if rec is not None and rec.stage is not Stage.DONE and rec.action_id == c.stop_id:
            why = (
                f"action {c.stop_id} is {rec.stage.value}: an install that has begun is not stopped (the slot "
                "switch and the health gate decide its fate)"
            )
            await self._send(
                lambda: client.cancel_feedback(c.action_id, Execution.REJECTED, Finished.NONE, details=[why])
            )
            log.info("cancel of action %s refused: %s", c.stop_id, why)
            return
        self._told = None
        await self._send(
            lambda: client.cancel_feedback(
                c.action_id,
                Execution.CLOSED,
                Finished.SUCCESS,
                details=[f"action {c.stop_id} cancelled: nothing of it had begun on this device"],
            )
        )
        log.info("action %s cancelled by the server before it began", c.stop_id)

    async def _on_deployment(self, client: DdiClient, dep: Deployment) -> None:
        from pitstop.daemon.ddi_model import Execution, Finished, bundle_artifact  # noqa: PLC0415

        rec = self.record
        retry = rec is not None and self._retry and rec.action_id == dep.action_id
        if rec is not None and not retry:
            if rec.action_id != dep.action_id:
                log.info("action %s waits: %s is not finished", dep.action_id, rec.action_id or "a local update")
            return  # this one is in progress
        if self.unsent is not None and self.unsent.action_id == dep.action_id:
            return  # finished here; the server has not heard yet
        if self._flow_running() or self.core.busy():
            return
        if not retry and self.busy_reason() is not None:
            return
        d = update_policy.decide(
            download=dep.download,
            update=dep.update,
            maintenance_window=dep.maintenance_window,
            reboot=self.policy,
            window=self.window,
            now=self.now(),
        )
        if d.download_only:
            why = (
                "pitstop streams a bundle straight into the inactive slot and keeps no downloaded copy, so a "
                "download-only assignment cannot be carried out; assign it as a soft or forced update"
            )
            await self._send(lambda: client.feedback(dep.action_id, Execution.CLOSED, Finished.FAILURE, details=[why]))
            return
        if not d.install:
            if self._told != (dep.action_id, d.reason):
                self._told = (dep.action_id, d.reason)
                await self._send(
                    lambda: client.feedback(
                        dep.action_id, Execution.SCHEDULED, Finished.NONE, details=[f"waiting: {d.reason}"]
                    )
                )
            return
        try:
            artifact = bundle_artifact(dep)
        except DdiError as e:
            why = e.message
            await self._send(lambda: client.feedback(dep.action_id, Execution.CLOSED, Finished.FAILURE, details=[why]))
            return
        url, http = client.artifact_source(artifact)
        if rec is not None and retry:
            self._retry = False
            rec = replace(rec, source=public_source(url), attempts=rec.attempts + 1)
        else:
            rec = UpdateRecord(Origin.DDI, public_source(url), action_id=dep.action_id, baseline=self.baseline(),
                               from_slot=self.core.status.slots.booted)  # fmt: skip
        rec = await self._save(rec)
        self._feedback("proceeding", f"installing {artifact.filename} ({artifact.size} bytes)")
        self._start_flow(self._install_flow(rec, url, http))

    def shutdown(self) -> None:
        self._sender.shutdown(wait=False, cancel_futures=True)
