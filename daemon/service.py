"""`pitstop daemon`: the resident service. Connects to the bus, serves the API, supervises the inference loops,
samples and reports health; tells systemd when it is ready, pings its watchdog from the event loop, stops
cleanly on SIGTERM and reloads what can be reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from pitstop.daemon import config as daemon_config
from pitstop.daemon import journal, sdnotify
from pitstop.daemon.config import DaemonConfig
from pitstop.daemon.core import DaemonCore
from pitstop.daemon.dbus_api import BUS_NAME, serve
from pitstop.daemon.errors import DaemonError
from pitstop.daemon.health_service import HealthService
from pitstop.daemon.supervisor import EVENT_FIGURES, EVENT_STATE, LoopEvent, Supervisor
from pitstop.daemon.update_agent import UpdateAgent
from pitstop.errors import PitstopError
from pitstop.ota import system_config
from pitstop.ota.slot_state import Content, Phase
from pitstop.ota.system_config import SystemConfig
from pitstop.runner import run

if TYPE_CHECKING:
    from pitstop.daemon.ddi import DdiClient

log = logging.getLogger(__name__)

READY_LINE = "PITSTOP-READY"
SERVING_LINE = "PITSTOP-SERVING"

# The update agent's client is made at start: its settings that a reload cannot apply keep their old values.
_AGENT_RESTART = tuple(s.key for s in daemon_config.UPDATE.values if not s.live)


@dataclass
class Options:
    config: Path = daemon_config.DEFAULT_PATH
    system_config: Path | None = None  # None: $PITSTOP_CONFIG or /etc/pitstop/system.toml
    bus_address: str | None = None  # None: the bus the configuration names
    reboot: Callable[[], None] | None = None  # None: systemctl reboot
    # Called once the daemon is ready (tests wait on it instead of polling the bus).
    on_ready: Callable[[], Awaitable[None] | None] | None = None
    extra_tasks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Told the committed slot's name once this boot's update flow has settled (default: the ready line on stdout).
    on_committed: Callable[[str], None] | None = None
    # Told a loop's name when a run of it delivers its first results (default: the serving line on stdout).
    on_serving: Callable[[str], None] | None = None


def print_ready(slot: str) -> None:
    # The unit sends stdout, and only stdout, to the console too: boot tests and HIL rigs wait for this line.
    print(f"{READY_LINE} slot={slot}", flush=True)


def print_serving(loop: str) -> None:
    # On the console too: the rig measures from a reboot to inference served again by this line.
    print(f"{SERVING_LINE} loop={loop}", flush=True)


class ServingWatch:
    """Tells once per run of each loop (a run is a child process) that it delivers results."""

    def __init__(self, tell: Callable[[str], None]) -> None:
        self.tell = tell
        self._told: dict[str, int | None] = {}

    def __call__(self, ev: LoopEvent) -> None:
        st = ev.status
        if ev.kind != EVENT_FIGURES or not st.figures or int(st.figures.get("frames_out") or 0) <= 0:
            return
        if st.name in self._told and self._told[st.name] == st.pid:
            return
        self._told[st.name] = st.pid
        self.tell(st.name)


def systemctl_reboot() -> None:
    run(["systemctl", "reboot"])


async def connect(cfg: DaemonConfig, address: str | None) -> MessageBus:
    if address is not None:
        bus = MessageBus(bus_address=address)
    else:
        bus = MessageBus(bus_type=BusType.SYSTEM if cfg.bus == "system" else BusType.SESSION)
    try:
        return await bus.connect()
    except OSError as e:
        raise DaemonError(f"cannot connect to the {cfg.bus} bus: {e.strerror or e}") from None


async def serve_forever(opts: Options) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean stop."""
    interval = sdnotify.watchdog_interval()
    # The inference loops must not inherit systemd's notify socket or watchdog settings.
    notifier = sdnotify.Notifier.from_env(unset=True)
    system = system_config.load(opts.system_config)
    cfg = daemon_config.load(opts.config, data_dir=system.data_dir)
    journal.setup_logging(cfg.log_level)
    bus = await connect(cfg, opts.bus_address)
    loops = Supervisor(cfg.loops, cache_dir=system.data_dir / "pitstop" / "engines")
    core = DaemonCore(system, loops=loops, reboot=opts.reboot or systemctl_reboot, delta=cfg.update.delta)
    health = HealthService(cfg, core, loop_figures=lambda: _figures(loops))
    core.health_source = health.summary
    obj, events = serve(bus, core, control_group=cfg.control_group)

    def on_loop(ev: LoopEvent) -> None:
        if ev.kind == EVENT_STATE:
            st = ev.status
            events.loop_state_changed(st.name, st.state.value, st.cause or "")

    loops.subscribe(on_loop)
    loops.subscribe(ServingWatch(opts.on_serving or print_serving))
    # The name last: a client that finds the name finds a complete API.
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        bus.disconnect()
        raise DaemonError(f"the bus name {BUS_NAME} is taken: is another pitstop daemon running?")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = UpdateAgent(
        core,
        cfg.update,
        cfg.state_dir,
        loops=loops,
        client=_ddi_client(cfg),
        enabled_loops=lambda: tuple(lc.name for lc in running.config.loops if lc.enabled),
    )
    core.flow = agent
    running = Running(cfg, loops, health, agent)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload(opts, system, running, notifier)))
    watchdog = sdnotify.start_watchdog(notifier, interval) if cfg.watchdog else None
    health.start()
    await loops.start_all()
    # After the loops: the health gate of an update on trial watches them.
    tasks: list[asyncio.Task[None]] = [
        loop.create_task(agent.run()),
        loop.create_task(_announce_committed(agent, core, notifier, opts.on_committed or print_ready)),
        *(loop.create_task(t()) for t in opts.extra_tasks),
    ]
    slots = core.status.slots
    notifier.ready(f"serving: booted slot {slots.booted or '?'}, phase {slots.phase.value}")
    log.info("pitstop daemon ready on %s (booted slot %s)", BUS_NAME, slots.booted)
    if opts.on_ready is not None:
        maybe = opts.on_ready()
        if maybe is not None:
            await maybe
    try:
        await stop.wait()
    finally:
        notifier.stopping("stopping")
        log.info("pitstop daemon stopping")
        for t in [*tasks, *([watchdog] if watchdog else [])]:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await agent.close()
        agent.shutdown()
        await core.close()
        await loops.shutdown()
        await health.stop()
        obj.unexport()
        bus.disconnect()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        notifier.close()
    return 0


async def _announce_committed(
    agent: UpdateAgent, core: DaemonCore, notifier: sdnotify.Notifier, tell: Callable[[str], None]
) -> None:
    """Once this boot's update flow has gone as far as it can (a routine commit, or an update's health gate and
    commit): if the booted slot is committed, say so. A slot on its way back to the other one stays silent."""
    await agent.resumed.wait()
    await agent.settled()
    await core.refresh()
    st = core.status.slots
    booted = next((v for v in st.slots if v.booted), None)
    if booted is None or booted.content is not Content.GOOD or st.phase is Phase.TRIAL:
        log.info("slot %s is not committed: not announcing it ready", st.booted)
        return
    notifier.status(f"serving: slot {booted.name} committed")
    log.info("slot %s committed and serving", booted.name, extra=journal.fields(PITSTOP_SLOT=booted.name))
    tell(booted.name)


def _figures(loops: Supervisor) -> dict[str, dict[str, object]]:
    return {st.name: st.figures for st in loops.statuses() if st.figures}


def _ddi_client(cfg: DaemonConfig) -> DdiClient | None:
    if cfg.update.server is None:
        return None
    from pitstop.daemon.ddi import DdiClient  # noqa: PLC0415 - requests loads when an update server is set

    return DdiClient.from_config(cfg.update)


@dataclass
class Running:
    """The configuration in effect and what a reload reconfigures in place."""

    config: DaemonConfig
    loops: Supervisor
    health: HealthService
    agent: UpdateAgent


async def _apply_loops(loops: Supervisor, old: DaemonConfig, new: DaemonConfig) -> None:
    """Loops removed are stopped and forgotten, new ones started, changed ones restarted; the others run on."""
    before = {lc.name: lc for lc in old.loops}
    for name in set(before) - {lc.name for lc in new.loops}:
        await loops.remove(name)
    for lc in new.loops:
        if before.get(lc.name) == lc:
            continue
        loops.add(lc)
        if not lc.enabled:
            await loops.stop(lc.name)
        elif lc.name in before:
            await loops.restart(lc.name)
        else:
            await loops.start(lc.name)


async def _reload(opts: Options, system: SystemConfig, running: Running, notifier: sdnotify.Notifier) -> None:
    notifier.reloading("reloading the configuration")
    try:
        new = daemon_config.load(opts.config, data_dir=system.data_dir)
    except (PitstopError, OSError) as e:
        log.error("configuration not reloaded, the running one stays: %s", getattr(e, "message", None) or e)
        notifier.ready("serving (reload refused: see the journal)")
        return
    live, restart = daemon_config.reload_diff(running.config, new)
    if restart:
        log.warning("changed settings that need a restart, not applied: %s", ", ".join(sorted(restart)))
    journal.setup_logging(new.log_level)
    try:
        await _apply_loops(running.loops, running.config, new)
    except PitstopError as e:
        log.error("loops not all reconfigured: %s", e.message)
    if not running.health.reporter.reconfigure(new.health):
        log.warning("health.otlp_url switched on or off: applied at the next restart")
    running.health.sampler.set_partitions(new.health.partitions)
    running.agent.cfg = replace(new.update, **{k: getattr(running.config.update, k) for k in _AGENT_RESTART})
    running.config = new
    log.info("configuration reloaded%s", f": {', '.join(sorted(live))}" if live else " (no change)")
    notifier.ready("serving")
