"""The A/B boot-slot state machine. Pure: no I/O; the bootloader backends and the state store do that.

Two inputs describe a device: the bootloader's environment (`BootEnv`: boot order, per-slot OK flag and
tries left, which the bootloader itself decrements) and pitstop's record on the data partition (`Record`:
what each slot holds and which install awaits commit). Every operation takes both plus the booted slot
and returns the new pair, or raises `StateError` without changing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from pitstop.errors import PitstopError


class StateError(PitstopError):
    """The requested slot operation is not allowed in the device's current state."""

    exit_code = 24


class Content(StrEnum):
    EMPTY = "empty"          # nothing pitstop installed (or unknown)
    WRITING = "writing"      # an install is (or was, when interrupted) overwriting it: not bootable
    INSTALLED = "installed"  # complete and verified; awaiting activation or commit
    GOOD = "good"            # committed after a healthy boot
    BAD = "bad"              # failed its tries or marked bad


@dataclass(frozen=True)
class BootEnv:
    """Bootloader-neutral boot configuration; slot keys are slot names (backends map boot names)."""

    order: tuple[str, ...]
    ok: dict[str, bool]
    tries: dict[str, int]

    def bootable(self, slot: str) -> bool:
        return slot in self.order and self.ok.get(slot, False)

    @property
    def primary(self) -> str | None:
        return self.order[0] if self.order else None

    def next_boot(self) -> str | None:
        """The slot the bootloader picks next (docs/grub.md): first OK slot in order with tries left,
        else, as a last resort, the first OK slot, else the first slot."""
        for s in self.order:
            if self.ok.get(s, False) and self.tries.get(s, 0) > 0:
                return s
        for s in self.order:
            if self.ok.get(s, False):
                return s
        return self.order[0] if self.order else None

    def after_boot(self) -> tuple[str | None, BootEnv]:
        """What the bootloader does on one boot: pick a slot and spend one of its tries."""
        s = self.next_boot()
        if s is None or not self.ok.get(s, False) or self.tries.get(s, 0) <= 0:
            return s, self
        return s, replace(self, tries={**self.tries, s: self.tries[s] - 1})


@dataclass(frozen=True)
class SlotRecord:
    content: Content = Content.EMPTY
    bundle: dict[str, Any] = field(default_factory=dict)  # version, security_version, manifest_sha256, …


@dataclass(frozen=True)
class Record:
    slots: dict[str, SlotRecord]
    pending: str | None = None           # slot whose install awaits commit
    activated_boot: str | None = None    # boot id when the pending slot was activated
    committed_security_version: int = 0
    # The pending slot's (OK flag, tries) before its activation's boot switch: the same values after a reboot,
    # with the slot still not primary, mean the switch never landed (nothing but the switch and booting the
    # slot changes them), not that the slot was tried and failed.
    switch_from: tuple[bool, int] | None = None


def initial_record(env: BootEnv, slots: tuple[str, str]) -> Record:
    """A device pitstop has not recorded anything on yet: what the bootloader boots came from the factory."""
    return Record({s: SlotRecord(Content.GOOD if env.bootable(s) else Content.EMPTY) for s in slots})


class Phase(StrEnum):
    NONE = "none"                # nothing awaits commit
    INSTALLED = "installed"      # written and verified, boot configuration not switched (interrupted)
    ACTIVATED = "activated"      # primary with tries; takes effect at the next reboot
    TRIAL = "trial"              # booted from the pending slot: health checks, then mark-good or mark-bad
    ROLLED_BACK = "rolled-back"  # tried and fell back: mark-good on the running slot settles it


@dataclass(frozen=True)
class SlotView:
    name: str
    booted: bool
    primary: bool
    next_boot: bool
    bootable: bool
    tries_left: int
    content: Content
    pending_commit: bool
    bundle: dict[str, Any]


@dataclass(frozen=True)
class Status:
    booted: str | None
    primary: str | None
    next_boot: str | None
    pending: str | None
    phase: Phase
    committed_security_version: int
    slots: tuple[SlotView, ...]


def _slots(rec: Record) -> tuple[str, str]:
    names = tuple(sorted(rec.slots))
    if len(names) != 2:
        raise StateError("the device record must describe exactly two slots")
    return names[0], names[1]


def _other(rec: Record, s: str) -> str:
    a, b = _slots(rec)
    return b if s == a else a


def phase(env: BootEnv, rec: Record, booted: str | None, boot_id: str | None) -> Phase:
    p = rec.pending
    if p is None:
        return Phase.NONE
    if booted == p:
        return Phase.TRIAL
    if rec.activated_boot is None:
        return Phase.INSTALLED
    # Activated earlier; we are not running it. Still primary with tries and no reboot since: waiting.
    # Anything else (tries spent, a reboot that landed elsewhere, flags cleared) means it was tried and failed.
    switched = env.primary == p and env.bootable(p)
    if not switched and env.primary != p and rec.switch_from == (env.ok.get(p, False), env.tries.get(p, 0)):
        return Phase.INSTALLED  # the boot switch never landed (power failed between record and switch)
    if boot_id == rec.activated_boot:
        if not switched:
            return Phase.INSTALLED  # the boot switch never landed (power failed between record and switch)
        if env.tries.get(p, 0) > 0:
            return Phase.ACTIVATED
    return Phase.ROLLED_BACK


def status(env: BootEnv, rec: Record, booted: str | None, boot_id: str | None) -> Status:
    nxt = env.next_boot()
    views = tuple(
        SlotView(name=s, booted=s == booted, primary=s == env.primary, next_boot=s == nxt, bootable=env.bootable(s),
                 tries_left=env.tries.get(s, 0), content=r.content, pending_commit=s == rec.pending,
                 bundle=dict(r.bundle))
        for s, r in sorted(rec.slots.items())
    )
    return Status(booted, env.primary, nxt, rec.pending, phase(env, rec, booted, boot_id),
                  rec.committed_security_version, views)


def _need_booted(rec: Record, booted: str | None) -> str:
    if booted is None or booted not in rec.slots:
        raise StateError("cannot tell which slot is booted (kernel command line lacks pitstop.slot=)")
    return booted


def begin_install(env: BootEnv, rec: Record, booted: str | None) -> tuple[str, BootEnv, Record]:
    """Choose the target (the slot not booted) and record it as being written.

    The target loses its OK flag and tries before a byte is written: a half-written slot must be neither the
    next boot (an activated install not yet booted) nor the fallback (GRUB goes there when the running slot's
    tries run out or its kernel does not load). The running slot goes first in ORDER. If the target has no OK
    flag and the running slot is the next boot already, the boot configuration stays as it is.

    Refused while the booted slot runs an install not committed yet, and when the target is the only bootable
    slot (the running one was marked bad or failed): overwriting it would leave nothing to boot.
    """
    booted = _need_booted(rec, booted)
    if rec.pending == booted:
        raise StateError(f"slot {booted} runs an update that is not committed yet: mark-good or mark-bad first")
    target = _other(rec, booted)
    # The record counts too: a bootloader that cannot clear a slot's OK flag (nvbootctrl) still shows a running
    # slot marked bad as bootable.
    running_ok = env.bootable(booted) and rec.slots[booted].content not in (Content.WRITING, Content.BAD)
    if env.bootable(target) and not running_ok:
        raise StateError(f"slot {booted} is not bootable and {target} is the only slot that is: installing would "
                         f"overwrite it; reboot into {target} first")
    if env.next_boot() != booted or env.ok.get(target, False):  # (no next boot: GRUB's default ORDER is "a b")
        env = BootEnv((booted, target), {**env.ok, target: False}, {**env.tries, target: 0})
    slots = {**rec.slots, target: SlotRecord(Content.WRITING)}
    return target, env, replace(rec, slots=slots, pending=None, activated_boot=None, switch_from=None)


def finish_install(rec: Record, target: str, bundle: dict[str, Any]) -> Record:
    """The payload is fully written and verified: record it as the pending install."""
    if rec.slots.get(target, SlotRecord()).content != Content.WRITING:
        raise StateError(f"slot {target} is not being written")
    slots = {**rec.slots, target: SlotRecord(Content.INSTALLED, dict(bundle))}
    return replace(rec, slots=slots, pending=target, activated_boot=None, switch_from=None)


def activate(env: BootEnv, rec: Record, target: str, tries: int, boot_id: str) -> tuple[BootEnv, Record]:
    """Make the installed target primary with `tries` attempts; the other slot stays as fallback.

    A fallback with its OK flag gets at least `tries` tries too: with none left (the running slot booted
    without being marked good since), GRUB's last resort, the first OK slot in ORDER, would be the new slot
    forever once it has spent its tries, and a failing update would never roll back.
    """
    if rec.pending != target or rec.slots[target].content != Content.INSTALLED:
        raise StateError(f"slot {target} holds no verified install to activate")
    old = _other(rec, target)
    new_ok = {**env.ok, target: True}
    new_tries = {**env.tries, target: tries}
    if rec.slots[old].content in (Content.WRITING, Content.BAD):
        new_ok[old], new_tries[old] = False, 0  # a stale OK flag: never a fallback
    elif env.ok.get(old, False):
        new_tries[old] = max(env.tries.get(old, 0), tries)
    before = None if env.primary == target else (env.ok.get(target, False), env.tries.get(target, 0))
    return BootEnv((target, old), new_ok, new_tries), replace(rec, activated_boot=boot_id, switch_from=before)


def mark_good(env: BootEnv, rec: Record, booted: str | None, tries: int,
              boot_id: str | None = None) -> tuple[BootEnv, Record]:
    """The booted slot passed its health checks: primary again with full tries. If it was the pending slot,
    the install is committed and its security_version becomes the floor; if the other slot was pending and
    was tried, that one failed and is marked bad (the rollback is settled). The other slot keeps its flags
    unless it is recorded as being written or bad: then it loses its OK flag.

    An install in the other slot that has not been tried yet (phase installed or activated: same boot as its
    activation) is left pending and, if activated, primary: marking the running slot good refreshes only its
    own tries, so the daemon's routine health commit does not cancel an update waiting for its reboot."""
    booted = _need_booted(rec, booted)
    cur = rec.slots[booted]
    if cur.content in (Content.WRITING, Content.BAD):
        raise StateError(f"slot {booted} is recorded as {cur.content.value}; it cannot be marked good")
    other = _other(rec, booted)
    waiting = phase(env, rec, booted, boot_id) in (Phase.INSTALLED, Phase.ACTIVATED)
    if rec.pending == other and rec.slots[other].content == Content.INSTALLED and waiting:
        order = env.order if env.order and env.primary == other and env.bootable(other) else (booted, other)
        slots = {**rec.slots, booted: replace(cur, content=Content.GOOD)}
        return (BootEnv(order, {**env.ok, booted: True}, {**env.tries, booted: tries}),
                replace(rec, slots=slots))
    slots = dict(rec.slots)
    ok = {**env.ok, booted: True}
    tries_left = {**env.tries, booted: tries}
    floor = rec.committed_security_version
    if rec.pending == other:
        slots[other] = replace(slots[other], content=Content.BAD)
    if slots[other].content in (Content.WRITING, Content.BAD):
        # the failed install, or a stale OK flag on a slot whose write was interrupted: never a fallback
        ok[other] = False
        tries_left[other] = 0
    if rec.pending == booted:
        floor = max(floor, int(cur.bundle.get("security_version", 0)))
    slots[booted] = replace(cur, content=Content.GOOD)
    return BootEnv((booted, other), ok, tries_left), Record(slots, None, None, floor)


def mark_bad(env: BootEnv, rec: Record, booted: str | None, slot: str) -> tuple[BootEnv, Record]:
    """Never boot `slot` again until something new is installed into it. Refused if that would leave no
    bootable slot, or would drop the fallback of an install not committed yet (activated, on trial or
    rolled back): an unproven slot must never be the only one left."""
    if slot not in rec.slots:
        raise StateError(f"no slot named {slot!r}")
    other = _other(rec, slot)
    if not env.bootable(other) or rec.slots[other].content in (Content.WRITING, Content.BAD):
        raise StateError(f"slot {other} is not bootable: marking {slot} bad would leave nothing to boot")
    if rec.pending == other:
        raise StateError(f"slot {other} holds an install not committed yet and {slot} is its fallback: "
                         f"settle {other} first")
    slots = {**rec.slots, slot: replace(rec.slots[slot], content=Content.BAD)}
    pending = None if rec.pending == slot else rec.pending
    activated_boot = rec.activated_boot if pending else None
    switch_from = rec.switch_from if pending else None
    env2 = BootEnv((other, slot), {**env.ok, slot: False}, {**env.tries, slot: 0})
    return env2, replace(rec, slots=slots, pending=pending, activated_boot=activated_boot, switch_from=switch_from)
