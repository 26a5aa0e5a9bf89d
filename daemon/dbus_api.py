"""The daemon's D-Bus API: the contract in data/org.pitstop.Daemon1.xml bound to the daemon core."""

from __future__ import annotations

from importlib import resources

from dbus_fast.aio import MessageBus

from pitstop.daemon.core import DaemonCore, UpdateState
from pitstop.daemon.dbus_service import ContractObject, may_control
from pitstop.ota.slot_state import Status

BUS_NAME = "org.pitstop.Daemon1"
PATH = "/org/pitstop/Daemon1"
INTERFACE = "org.pitstop.Daemon1"


def contract() -> str:
    return (resources.files("pitstop.daemon") / "data" / f"{INTERFACE}.xml").read_text()


class DbusEvents:
    """The core's announcements as signals and PropertiesChanged."""

    def __init__(self, obj: ContractObject, core: DaemonCore) -> None:
        self.obj, self.core = obj, core

    def progress(self, stage: str, done: int, total: int) -> None:
        self.obj.emit("Progress", stage, done, total)
        self.obj.properties_changed("UpdateProgress")

    def state_changed(self, state: UpdateState, reason: str) -> None:
        self.obj.emit("StateChanged", state.value, reason)
        self.obj.properties_changed("UpdateState", "UpdateError")

    def completed(self, success: bool, message: str) -> None:
        self.obj.emit("Completed", success, message)

    def slots_changed(self) -> None:
        self.obj.properties_changed("Slots", "PrimarySlot", "Phase")

    def loop_state_changed(self, name: str, state: str, cause: str) -> None:
        self.obj.emit("LoopStateChanged", name, state, cause)


def serve(bus: MessageBus, core: DaemonCore, *, control_group: str) -> tuple[ContractObject, DbusEvents]:
    """Export the API on `bus` (the caller requests the bus name once everything is ready)."""

    async def install(source: str) -> None:
        core.request_install(source)

    async def start_loop(name: str) -> None:
        await core.start_loop(name)

    async def stop_loop(name: str) -> None:
        await core.stop_loop(name)

    async def mark_bad(slot: str) -> None:
        await core.mark_bad(slot)

    def st() -> Status:
        return core.current_status().slots

    obj = ContractObject(
        bus,
        contract(),
        PATH,
        methods={
            "Install": install,
            "CheckForUpdate": core.check_for_update,
            "MarkGood": core.mark_good,
            "MarkBad": mark_bad,
            "Reboot": core.reboot,
            "StartLoop": start_loop,
            "StopLoop": stop_loop,
        },
        properties={
            "Version": lambda: core.version,
            "Compatible": lambda: core.system.compatible,
            "BootedSlot": lambda: st().booted or "",
            "PrimarySlot": lambda: st().primary or "",
            "Phase": lambda: st().phase.value,
            "Slots": core.slot_rows,
            "UpdateState": lambda: core.state.value,
            "UpdateProgress": lambda: (core.progress.done, core.progress.total, core.progress.stage),
            "UpdateError": lambda: core.error,
            "Health": core.health,
            "Loops": core.loop_rows,
        },
        authorize=lambda uid: may_control(uid, control_group),
    )
    events = DbusEvents(obj, core)
    core.events = events
    obj.export()
    return obj, events
