"""One device's update state, read and changed through its bootloader, its state file and its payload links.

The decisions are ota/slot_state.py's; this module only loads their inputs and stores their outputs, in
an order that is safe at every instant (docs/install.md, "Crash safety").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pitstop.ota import slot_state
from pitstop.ota.bootloader import Bootloader, backend
from pitstop.ota.clock import RELEASE_TIME_FLOOR, Clock
from pitstop.ota.device_state import DeviceState, StateStore, Versions
from pitstop.ota.payload_store import PayloadStore
from pitstop.ota.slot_state import BootEnv, Phase, StateError, Status
from pitstop.ota.system_config import SystemConfig


def slot_from_cmdline(cmdline: str, boot_names: dict[str, str]) -> str | None:
    for arg in cmdline.split():
        if arg.startswith("pitstop.slot="):
            return boot_names.get(arg.split("=", 1)[1])
    return None


@dataclass(frozen=True)
class DeviceStatus:
    slots: Status
    payloads: dict[str, Versions]
    pending_bundle: dict[str, Any] | None
    time_floor: datetime | None

    def to_json(self) -> dict[str, Any]:
        s = self.slots
        return {
            "booted": s.booted, "primary": s.primary, "next_boot": s.next_boot, "pending": s.pending,
            "phase": s.phase.value, "committed_security_version": s.committed_security_version,
            "slots": [{"name": v.name, "booted": v.booted, "primary": v.primary, "next_boot": v.next_boot,
                       "bootable": v.bootable, "tries_left": v.tries_left, "content": v.content.value,
                       "pending_commit": v.pending_commit, "bundle": v.bundle} for v in s.slots],
            "payloads": {t: v.to_json() for t, v in sorted(self.payloads.items())},
            "pending_payloads": self.pending_bundle,
            "time_floor": self.time_floor.strftime("%Y-%m-%dT%H:%M:%SZ") if self.time_floor else None,
        }


class Device:
    def __init__(self, cfg: SystemConfig, bootloader: Bootloader | None = None) -> None:
        self.cfg = cfg
        self.bootloader = bootloader or backend(cfg)
        names = (cfg.slots[0].name, cfg.slots[1].name)
        self.slot_names: tuple[str, str] = (min(names), max(names))
        self.store = StateStore(cfg.state_dir, self.slot_names)
        self.payloads = PayloadStore(cfg.data_dir)

    # -- facts about the running system ----------------------------------------------------------------

    def booted(self) -> str | None:
        if self.cfg.booted_slot is not None:
            return self.cfg.booted_slot
        try:
            cmdline = self.cfg.cmdline.read_text()
        except OSError:
            cmdline = ""
        found = slot_from_cmdline(cmdline, {s.boot_name: s.name for s in self.cfg.slots})
        if found:
            return found
        root = os.stat("/").st_dev
        for s in self.cfg.slots:
            try:
                if os.stat(s.device).st_rdev == root:
                    return s.name
            except OSError:
                continue
        return None

    def boot_id(self) -> str:
        try:
            return self.cfg.boot_id.read_text().strip()
        except OSError:
            return "unknown"

    def clock(self, state: DeviceState) -> Clock:
        floor = max(RELEASE_TIME_FLOOR, state.time_floor) if state.time_floor else RELEASE_TIME_FLOOR
        return Clock(self.cfg.clock, datetime.now(UTC), floor)

    def load(self) -> tuple[BootEnv, DeviceState]:
        env = self.bootloader.read()
        return env, self.store.load(env)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One update command at a time per device (the CLI and the daemon may both try). Leftover temporary
        files of a writer that was killed are removed once the lock is held."""
        # The lock is on the data directory itself: taking it writes nothing, so a refused command
        # leaves the data partition exactly as it was.
        try:
            fd = os.open(self.cfg.data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StateError(f"data directory {self.cfg.data_dir}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError("another pitstop update command is running on this device") from None
            self._remove_stale_temporaries()
            yield
        finally:
            os.close(fd)

    def _remove_stale_temporaries(self) -> None:
        paths = [self.store.path]
        grubenv = self.cfg.bootloader.grubenv
        if grubenv is not None:
            paths.append(grubenv)
        for p in paths:
            with contextlib.suppress(OSError):
                for tmp in p.parent.glob(f".{p.name}.*.tmp"):
                    tmp.unlink()

    # -- views and commands --------------------------------------------------------------------------------

    def status(self) -> DeviceStatus:
        env, state = self.load()
        st = slot_state.status(env, state.record, self.booted(), self.boot_id())
        return DeviceStatus(st, state.payloads, state.pending_bundle, state.time_floor)

    def mark_good(self) -> DeviceStatus:
        with self.locked():
            self._mark_good()
        return self.status()

    def _mark_good(self) -> None:
        env, state = self.load()
        before = state
        booted = self.booted()
        rec = state.record
        new_env, new_rec = slot_state.mark_good(env, rec, booted, self.cfg.bootloader.tries, self.boot_id())
        # An install in the other slot still waiting for its reboot keeps its payload versions pending.
        waiting = new_rec.pending is not None
        if not waiting and (rec.pending == booted or (rec.pending is None and state.pending_bundle is not None)):
            if state.pending_bundle is not None:  # a model/files-only bundle: its security_version commits here
                sv = int(state.pending_bundle.get("security_version", 0))
                new_rec = replace(new_rec, committed_security_version=max(new_rec.committed_security_version, sv))
            state = _commit_payloads(state)
        elif not waiting and rec.pending is not None:
            state = drop_pending_payloads(state)
        # Record first: the bootloader change is the one the next boot sees, so it goes last.
        gone = _gone(before, state)
        self.store.save(replace(state, record=new_rec))
        if new_env != env:
            self.bootloader.write(new_env)
        self.reconcile_links(gone)

    def mark_bad(self, slot: str | None = None) -> DeviceStatus:
        with self.locked():
            self._mark_bad(slot)
        return self.status()

    def _mark_bad(self, slot: str | None) -> None:
        env, state = self.load()
        before = state
        booted = self.booted()
        if slot is None and state.record.pending is None and state.pending_bundle is not None:
            state = drop_pending_payloads(state)  # a model/files-only install: back to the previous versions
            self.store.save(state)
            self.reconcile_links(_gone(before, state))
            return
        target = slot or booted
        if target is None:
            raise StateError("cannot tell which slot is booted; name the slot to mark bad")
        if target not in self.slot_names:
            raise StateError(f"no slot named {target!r}")
        new_env, new_rec = slot_state.mark_bad(env, state.record, booted, target)
        if state.record.pending == target:
            state = drop_pending_payloads(state)
        self.store.save(replace(state, record=new_rec))
        self.bootloader.write(new_env)
        self.reconcile_links(_gone(before, state))

    def reconcile_links(self, gone: Iterable[str] = ()) -> None:
        """Point each model/files target at the version the state says is live now: a pending version once
        it is in effect (payload-only install, or booted into the pending slot), else the committed one.
        `gone`: targets the state just forgot (a first version dropped): their link and versions go too."""
        env, state = self.load()
        for target in gone:
            if target not in state.payloads:
                self.payloads.switch(target, None)
                self.payloads.prune(target, set())
        ph = slot_state.phase(env, state.record, self.booted(), self.boot_id())
        for target, v in state.payloads.items():
            in_effect = v.pending is not None and (not state.pending_rootfs or ph == Phase.TRIAL)
            self.payloads.switch(target, v.pending if in_effect else v.current)
            self.payloads.prune(target, {x for x in (v.current, v.previous, v.pending) if x})


def _gone(before: DeviceState, after: DeviceState) -> list[str]:
    return sorted(set(before.payloads) - set(after.payloads))


def _commit_payloads(state: DeviceState) -> DeviceState:
    payloads = {t: Versions(v.pending, v.current, None) if v.pending else v for t, v in state.payloads.items()}
    return replace(state, payloads=payloads, pending_rootfs=False, pending_bundle=None)


def drop_pending_payloads(state: DeviceState) -> DeviceState:
    """Forget pending model/files versions (the live links go back to the committed ones at reconcile)."""
    payloads = {t: Versions(v.current, v.previous, None) for t, v in state.payloads.items()
                if v.current or v.previous}
    return replace(state, payloads=payloads, pending_rootfs=False, pending_bundle=None)


def record_dir(state_dir: Path, slot: str) -> Path:
    return state_dir / "slots" / slot
