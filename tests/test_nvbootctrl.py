"""The Jetson boot-slot backend (ota/nvbootctrl.py, docs/jetson.md).

1. Parsers, on outputs quoted from NVIDIA's developer forums (and one OE4T pull request), each with its source
   beside it, plus edits of those quotes for robustness (labelled as edits: no device printed them).
   NVIDIA's Developer Guide pages ("Root File System Redundancy", "Update and Redundancy", R35.x/R36.x) could
   not be read past their opening in the stored copies available here, so nothing below is quoted from them.
   No quoted output of `get-number-slots` was found: the backend does not use that command.
2. The pure mapping `plan` over the real state machine (ota/slot_state.py): named scenarios, then every state
   reachable from the factory by install / interrupted install / failing install / reboot / mark-good /
   mark-bad (explored to a fixpoint), against a model of the UEFI boot chain taken from NVIDIA's L4TLauncher
   source (edk2-nvidia,
   Silicon/NVIDIA/Application/L4TLauncher/L4TRootfsValidation.c, `ValidateRootfsStatus`). After every write,
   and after every prefix of its commands (an interruption), the next boot must land on a slot that boots.
3. The backend class against an executable `nvbootctrl` stand-in (a Python script with a JSON state file),
   including a write interrupted at every call, and an end-to-end update through the `pitstop` CLI.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from bundlekit import Keys, assert_refused, make_bundle, mixed_data, rootfs_payload, run_cli

from pitstop.errors import CommandError
from pitstop.ota import slot_state as ss
from pitstop.ota import system_config
from pitstop.ota.bootloader import backend
from pitstop.ota.errors import BootEnvError
from pitstop.ota.nvbootctrl import (
    VERIFY,
    NvbootctrlBackend,
    SlotInfo,
    SlotsInfo,
    Status,
    env_from_info,
    parse_current_slot,
    parse_dump_slots_info,
    plan,
)
from pitstop.ota.slot_state import BootEnv, Content, Phase, Record, StateError

NORMAL, UNBOOTABLE = Status.NORMAL, Status.UNBOOTABLE
BOOTENV = 22

# --- outputs quoted from public sources --------------------------------------------------------------------

# https://forums.developer.nvidia.com/t/rootfs-a-b-redundancy-fail-over-mechanism-in-jetpack5-1/247290
# JetPack 5.1 (L4T R35.2.1), Jetson Xavier NX devkit (eMMC), NVIDIA's "verified flow" post, step 2:
# `sudo nvbootctrl -t rootfs dump-slots-info` right after flashing with ROOTFS_AB=1.
R35_2_FRESH = """\
Current rootfs slot: A
Active rootfs slot: A
num_slots: 2
slot: 0,             retry_count: 3,             status: normal
slot: 1,             retry_count: 3,             status: normal
"""

# Same post, step 6: after slot A's rootfs was corrupted and UEFI tried it three times and switched to B.
# The page shows each line padded with spaces to 80 columns (a serial console); the last line is not padded.
R35_2_FAILED_OVER = (
    "\n".join(
        [
            "Current rootfs slot: B".ljust(80),
            "Active rootfs slot: B".ljust(80),
            "num_slots: 2".ljust(80),
            "slot: 0,             retry_count: 0,             status: unbootable".ljust(80),
            "slot: 1,             retry_count: 3,             status: normal",
        ]
    )
    + "\n"
)

# https://forums.developer.nvidia.com/t/redundant-a-b-rootfs-not-switching-with-set-active-boot-slot-but-working-with-set-sr-br/306475
# L4T R35.4.1 ("Current version: 35.4.1"), Jetson AGX Xavier. `nvbootctrl dump-slots-info -t rootfs`:
R35_4_ROOTFS = """\
Current rootfs slot: A
Active rootfs slot: A
num_slots: 2
slot: 0,             retry_count: 3,             status: normal
slot: 1,             retry_count: 3,             status: normal
"""
# Same post, `nvbootctrl dump-slots-info` without `-t rootfs`: the bootloader chains, no retry counts.
R35_4_BOOTLOADER = """\
Current version: 35.4.1
Capsule update status: 0
Current bootloader slot: A
Active bootloader slot: A
num_slots: 2
slot: 0,             status: normal
slot: 1,             status: normal
"""
# Same post, `nvbootctrl  get-current-slot`:
R35_4_CURRENT = "0\n"

# https://forums.developer.nvidia.com/t/rootfs-slot-falls-to-unbootable-status/340715
# JetPack 6.0 (L4T R36.3), Jetson AGX Orin. `sudo nvbootctrl -t rootfs dump-slots-info`; the first line is
# sudo's password prompt as the post shows it (not nvbootctrl's output, but a parser fed it must cope).
R36_3_FAILED_OVER = """\
[sudo] password for pilot:
Current rootfs slot: B
Active rootfs slot: B
num_slots: 2
slot: 0,             retry_count: 0,             status: unbootable
slot: 1,             retry_count: 3,             status: normal
"""

# https://github.com/OE4T/meta-tegra/pull/1833 (comment of 2025-02-08), L4T R36.4.0:
# `nvbootctrl dump-slots-info` (bootloader chains) and `nvbootctrl verify`, whose line is normal on R36.
R36_4_BOOTLOADER = """\
Current version: 36.4.0
Capsule update status: 1
Current bootloader slot: B
Active bootloader slot: B
num_slots: 2
slot: 0,             status: normal
slot: 1,             status: normal
"""
R36_4_VERIFY = "Info: variable BootChainFwStatus is not found.\n"

FRESH = SlotsInfo(0, 0, (SlotInfo(3, NORMAL), SlotInfo(3, NORMAL)))
FAILED_OVER = SlotsInfo(1, 1, (SlotInfo(0, UNBOOTABLE), SlotInfo(3, NORMAL)))


# --- 1. parsers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (R35_2_FRESH, FRESH),
        (R35_2_FAILED_OVER, FAILED_OVER),
        (R35_4_ROOTFS, FRESH),
        (R36_3_FAILED_OVER, FAILED_OVER),
    ],
    ids=["r35.2-fresh", "r35.2-failed-over", "r35.4.1", "r36.3-failed-over"],
)
def test_parses_quoted_dump_slots_info(text: str, expected: SlotsInfo) -> None:
    assert parse_dump_slots_info(text) == expected


def test_quoted_failover_reads_as_fallback_env() -> None:
    env = env_from_info(parse_dump_slots_info(R36_3_FAILED_OVER), ("a", "b"))
    assert env == BootEnv(("b", "a"), {"a": False, "b": True}, {"a": 0, "b": 3})
    assert env.next_boot() == "b" and not env.bootable("a")


@pytest.mark.parametrize("text", [R35_4_BOOTLOADER, R36_4_BOOTLOADER], ids=["r35.4.1", "r36.4.0"])
def test_bootloader_dump_is_not_taken_for_rootfs(text: str) -> None:
    with pytest.raises(BootEnvError, match=r"no 'Current rootfs slot' line .*without `-t rootfs`"):
        parse_dump_slots_info(text)


def test_parses_quoted_get_current_slot() -> None:
    assert parse_current_slot(R35_4_CURRENT) == 0
    # Edits of the quote (not seen from a device): letters, spacing, an informational line around it.
    assert parse_current_slot("B\n") == 1
    assert parse_current_slot("  1  \r\n") == 1
    assert parse_current_slot(R36_4_VERIFY + "0\n") == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no slot"),
        (R36_4_VERIFY, "no slot"),
        ("0\n1\n", "more than one slot"),
        ("x" * 70_000, "more than 65536"),
    ],
)
def test_get_current_slot_refusals(text: str, message: str) -> None:
    with pytest.raises(BootEnvError, match=message):
        parse_current_slot(text)


# Edits of R35_4_ROOTFS that a robust parser must read the same way (none of these was printed by a device).
READ_SAME = {
    "crlf line ends": R35_4_ROOTFS.replace("\n", "\r\n"),
    "no trailing newline": R35_4_ROOTFS.rstrip("\n"),
    "single spaces": R35_4_ROOTFS.replace(",             ", ", "),
    "no spaces": R35_4_ROOTFS.replace(",             ", ",").replace(": ", ":"),
    "tabs and indentation": "\n".join("\t " + ln.replace(" ", "\t") for ln in R35_4_ROOTFS.splitlines()),
    "lines reordered": "\n".join(reversed(R35_4_ROOTFS.splitlines())),
    "extra lines": "Current version: 35.4.1\nInfo: something\n\n" + R35_4_ROOTFS + "Capsule update status: 0\n",
    "letter slot numbers": R35_4_ROOTFS.replace("slot: 0,", "slot: A,").replace("slot: 1,", "slot: B,"),
    "numeric current and active": R35_4_ROOTFS.replace("slot: A\n", "slot: 0\n"),
    "upper-case keys and values": R35_4_ROOTFS.upper(),
    "an unknown extra field": R35_4_ROOTFS.replace("status: normal", "status: normal, priority: 15"),
    "fields reordered": R35_4_ROOTFS.replace(
        "slot: 1,             retry_count: 3,             status: normal", "status: normal, retry_count: 3, slot: 1"
    ),
}


@pytest.mark.parametrize("name", sorted(READ_SAME))
def test_robust_to_formatting(name: str) -> None:
    assert parse_dump_slots_info(READ_SAME[name]) == FRESH


def _edit(old: str, new: str) -> str:
    assert old in R35_4_ROOTFS, old
    return R35_4_ROOTFS.replace(old, new, 1)


SLOT1 = "slot: 1,             retry_count: 3,             status: normal\n"

# Edits that must be refused with a message naming what is wrong (none of these was printed by a device).
REFUSED = {
    "empty": ("", "no 'Current rootfs slot' line"),
    "no current": (_edit("Current rootfs slot: A\n", ""), "no 'Current rootfs slot' line"),
    "no active": (_edit("Active rootfs slot: A\n", ""), "no 'Active rootfs slot' line"),
    "no num_slots": (_edit("num_slots: 2\n", ""), "no 'num_slots' line"),
    "one slot": (_edit("num_slots: 2", "num_slots: 1"), "num_slots is '1', not 2 (pitstop needs the two rootfs slots"),
    "slot line missing": (_edit(SLOT1, ""), "line for slot 1"),
    "slot listed twice": (R35_4_ROOTFS + SLOT1, "line 6: slot 1 is listed twice"),
    "current twice": ("Current rootfs slot: B\n" + R35_4_ROOTFS, "'Current rootfs slot' appears twice"),
    "bad current": (_edit("Current rootfs slot: A", "Current rootfs slot: C"), "'C' is not a rootfs slot"),
    "bad active": (_edit("Active rootfs slot: A", "Active rootfs slot: "), "'' is not a rootfs slot"),
    "slot out of range": (_edit("slot: 1,", "slot: 2,"), "line 5: '2' is not a rootfs slot"),
    "no retry_count": (
        _edit("retry_count: 3,             status: normal\n", "status: normal\n"),
        "line 4: no retry_count",
    ),
    "no status": (_edit(",             status: normal\n", "\n"), "line 4: no status"),
    "retry not a number": (_edit("retry_count: 3", "retry_count: three"), "retry_count 'three' is not"),
    "retry negative": (_edit("retry_count: 3", "retry_count: -1"), "retry_count '-1' is not"),
    "retry huge": (_edit("retry_count: 3", "retry_count: 99999"), "retry_count '99999' is not"),
    "unknown status": (_edit("status: normal", "status: bootable"), "status 'bootable' is neither normal"),
    "field without colon": (_edit("retry_count: 3,", "retry_count 3,"), "'retry_count 3' is not a 'name: value'"),
    "oversized": (R35_4_ROOTFS + "#" * 70_000, "more than 65536"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refuses_malformed(name: str) -> None:
    text, message = REFUSED[name]
    with pytest.raises(BootEnvError) as e:
        parse_dump_slots_info(text)
    assert message in e.value.message, e.value.message
    assert "\n" not in e.value.message and e.value.exit_code == BOOTENV


# --- 2. the pure mapping over the state machine ---------------------------------------------------------------

NAMES = ("a", "b")  # slot names; boot names A and B (nvbootctrl slots 0 and 1)
MAX = 3  # ROOTFS_RETRY_COUNT_MAX the model device was flashed with, and system.toml's `tries`
TRIES = MAX


@dataclass
class Jetson:
    """NVIDIA's rootfs A/B as a model. Boot: L4TLauncher's `ValidateRootfsStatus` (edk2-nvidia,
    L4TRootfsValidation.c): retry counts live in a scratch register, initialised from the statuses (normal:
    RootfsRetryCountMax, unbootable: 0); the active chain boots if its count is not 0 and loses one; at 0 it
    is marked unbootable and the other chain boots if its count is not 0 (the register is cleared before the
    cold reset that switches chains); both spent: recovery kernel. A watchdog reset keeps the counts (NVIDIA's
    fail-over post: a panicking slot is tried three times). Commands: `verify` refills the running slot's
    count (OE4T PR 1833: "retry count resets"; the fail-over post shows the running slot at 3 with NVIDIA's
    verify service active), `set-active-boot-slot N` makes N the next boot. The factory state is the first
    boot after flashing, before anything ran `verify`."""

    current: int = 0
    active: int = 0
    status: list[Status] = field(default_factory=lambda: [NORMAL, NORMAL])
    retry: list[int] = field(default_factory=lambda: [MAX - 1, MAX])
    max_retry: int = MAX

    def dump(self) -> str:
        lines = [
            f"Current rootfs slot: {'AB'[self.current]}",
            f"Active rootfs slot: {'AB'[self.active]}",
            "num_slots: 2",
        ]
        lines += [
            f"slot: {i},             retry_count: {self.retry[i]},             status: {self.status[i]}" for i in (0, 1)
        ]
        return "\n".join(lines) + "\n"

    def info(self) -> SlotsInfo:
        return parse_dump_slots_info(self.dump())

    def apply(self, cmd: tuple[str, ...]) -> None:
        if cmd == VERIFY:
            self.retry[self.current] = self.max_retry
        elif cmd[0] == "set-active-boot-slot":
            self.active = int(cmd[1])
        else:
            raise AssertionError(f"not an nvbootctrl command the model knows: {cmd}")

    def boot(self, broken: Collection[int] = ()) -> int | None:
        """Power on; a broken slot panics and the watchdog resets (the scratch register survives). Returns the
        slot that came up, None for the recovery kernel."""
        for _ in range(4 * (self.max_retry + 1)):
            if all(s == UNBOOTABLE for s in self.status):
                return None
            chain = self.active
            if self.retry[chain] > 0:
                self.retry[chain] -= 1
                self.current = chain
                if chain in broken:
                    continue
                return chain
            self.status[chain] = UNBOOTABLE
            other = 1 - chain
            if self.retry[other] == 0:
                self.status[other] = UNBOOTABLE
                return None
            self.active = other
            self.retry = [0 if s == UNBOOTABLE else self.max_retry for s in self.status]
        raise AssertionError("the boot model did not settle")

    def to_json(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "active": self.active,
            "status": [str(s) for s in self.status],
            "retry": list(self.retry),
            "max": self.max_retry,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Jetson:
        return cls(d["current"], d["active"], [Status(s) for s in d["status"]], list(d["retry"]), d["max"])


def test_model_reproduces_nvidias_failover_post() -> None:
    """The model against NVIDIA's own flow (forum post 247290): flash, boot, verify (nv-l4t-bootloader-config
    does it in stock L4T); corrupt A; reset; three failed tries of A; B; verify."""
    j = Jetson()
    j.apply(VERIFY)
    assert j.info() == parse_dump_slots_info(R35_2_FRESH)
    assert j.boot(broken={0}) == 1
    j.apply(VERIFY)
    assert j.info() == parse_dump_slots_info(R35_2_FAILED_OVER)


def read(j: Jetson) -> BootEnv:
    return env_from_info(j.info(), NAMES)


def write(j: Jetson, want: BootEnv) -> list[tuple[str, ...]]:
    cmds = plan(j.info(), want, NAMES)
    for c in cmds:
        j.apply(c)
    return cmds


def bundle(v: int) -> dict[str, Any]:
    return {"version": f"{v}.0.0", "security_version": v}


def factory() -> tuple[Jetson, Record]:
    j = Jetson()
    return j, ss.initial_record(read(j), NAMES)


def test_update_then_commit() -> None:
    j, rec = factory()
    target, env, rec = ss.begin_install(read(j), rec, "a")
    # B loses its OK flag in pitstop's terms; nvbootctrl cannot say so and A stays the next boot: nothing to run.
    assert target == "b" and write(j, env) == []
    rec = ss.finish_install(rec, "b", bundle(2))
    env, rec = ss.activate(read(j), rec, "b", TRIES, "boot-1")
    # The fallback A is committed (its count refilled) before the one command that moves the next boot.
    assert write(j, env) == [VERIFY, ("set-active-boot-slot", "1")]
    assert ss.phase(read(j), rec, "a", "boot-1") == Phase.ACTIVATED
    assert j.boot() == 1 and ss.phase(read(j), rec, "b", "boot-2") == Phase.TRIAL
    env, rec = ss.mark_good(read(j), rec, "b", TRIES, "boot-2")
    assert write(j, env) == [VERIFY]
    assert j.info() == SlotsInfo(1, 1, (SlotInfo(MAX, NORMAL), SlotInfo(MAX, NORMAL)))
    assert rec.pending is None and rec.slots["b"].content == Content.GOOD
    assert write(j, ss.mark_good(read(j), rec, "b", TRIES, "boot-2")[0]) == []  # nothing left to do


def test_failed_update_rolls_back_and_the_failed_slot_cannot_be_reactivated() -> None:
    j, rec = factory()
    _, env, rec = ss.begin_install(read(j), rec, "a")
    write(j, env)
    env, rec = ss.activate(read(j), ss.finish_install(rec, "b", bundle(2)), "b", TRIES, "boot-1")
    write(j, env)
    assert j.boot(broken={1}) == 0  # B panics on each of its tries, UEFI goes back to A
    assert j.info() == SlotsInfo(0, 0, (SlotInfo(MAX - 1, NORMAL), SlotInfo(0, UNBOOTABLE)))
    assert ss.phase(read(j), rec, "a", "boot-2") == Phase.ROLLED_BACK
    env, rec = ss.mark_good(read(j), rec, "a", TRIES, "boot-2")
    assert write(j, env) == [VERIFY] and rec.slots["b"].content == Content.BAD
    # The next install goes to B again; activating it needs B's status back to normal, which no documented
    # nvbootctrl command does: refused before anything runs, the running slot untouched.
    _, env, rec = ss.begin_install(read(j), rec, "a")
    write(j, env)
    env, rec = ss.activate(read(j), ss.finish_install(rec, "b", bundle(3)), "b", TRIES, "boot-2")
    before = copy.deepcopy(j)
    with pytest.raises(BootEnvError, match=r"rootfs slot B \(b\) is marked unbootable by UEFI .* UEFI menu"):
        write(j, env)
    assert j == before


def test_mark_bad_during_trial_goes_back() -> None:
    j, rec = factory()
    _, env, rec = ss.begin_install(read(j), rec, "a")
    write(j, env)
    env, rec = ss.activate(read(j), ss.finish_install(rec, "b", bundle(2)), "b", TRIES, "boot-1")
    write(j, env)
    assert j.boot() == 1
    env, rec = ss.mark_bad(read(j), rec, "b", "b")
    # No verify: the slot on trial is never committed by a mark-bad.
    assert write(j, env) == [("set-active-boot-slot", "0")]
    assert j.boot() == 0 and j.status == [NORMAL, NORMAL]


def test_waiting_activation_survives_routine_commit_and_a_new_install_cancels_it() -> None:
    j, rec = factory()
    _, env, rec = ss.begin_install(read(j), rec, "a")
    write(j, env)
    env, rec = ss.activate(read(j), ss.finish_install(rec, "b", bundle(2)), "b", TRIES, "boot-1")
    write(j, env)
    j.retry[0] = 1  # pretend A's count ran low; the daemon's health commit on A refills it, B stays next
    env, rec = ss.mark_good(read(j), rec, "a", TRIES, "boot-1")
    assert write(j, env) == [VERIFY] and j.active == 1 and rec.pending == "b"
    _, env, rec = ss.begin_install(read(j), rec, "a")
    assert write(j, env) == [("set-active-boot-slot", "0")]


def test_running_slot_without_retries_is_refilled_when_it_stays_next() -> None:
    j, rec = factory()
    j.retry[0] = 0  # A booted on its last try since its last verify
    _, env, rec = ss.begin_install(read(j), rec, "a")
    # UEFI would mark A unbootable at the next boot and fall back to B, now being written.
    assert write(j, env) == [VERIFY] and j.retry[0] == MAX


def test_plan_refusals() -> None:
    info = FRESH
    with pytest.raises(BootEnvError, match="cannot write boot order"):
        plan(info, BootEnv((), {}, {}), NAMES)
    with pytest.raises(BootEnvError, match=r"cannot write boot order \['c'\]"):
        plan(info, BootEnv(("c",), {}, {}), NAMES)
    spent = SlotsInfo(0, 0, (SlotInfo(2, NORMAL), SlotInfo(0, NORMAL)))
    with pytest.raises(BootEnvError, match=r"slot B \(b\) has retry_count 0"):
        plan(spent, BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 2, "b": 3}), NAMES)


# Exploration: every state reachable from the factory by these operations (a state reached twice is explored once).
MAX_DEPTH = 100
OPS = ("install", "install-failing", "install-interrupted", "reboot", "mark-good", "mark-bad-booted", "mark-bad-other")
NEVER_BOOTS = (Content.WRITING, Content.EMPTY)


@dataclass(frozen=True)
class World:
    jetson: Jetson
    rec: Record
    booted: str
    boot: int
    broken: frozenset[str]  # slots whose content cannot boot (half-written, or a failing image)

    @property
    def boot_id(self) -> str:
        return f"boot-{self.boot}"

    def key(self) -> str:
        act = self.rec.activated_boot
        rel = None if act is None else act == self.boot_id
        return repr((self.jetson, replace(self.rec, activated_boot=None), rel, self.booted, sorted(self.broken)))


def boot_checked(j: Jetson, w: World) -> str:
    """Power on `j` (changed in place): it must come up on a slot whose content boots, never in recovery."""
    got = j.boot({NAMES.index(s) for s in w.broken})
    assert got is not None, f"recovery kernel: {j}"
    slot = NAMES[got]
    assert slot not in w.broken and w.rec.slots[slot].content not in NEVER_BOOTS, (slot, w.rec)
    return slot


def lands(j: Jetson, w: World) -> str:
    return boot_checked(copy.deepcopy(j), w)


def checked_write(w: World, want: BootEnv, op: str) -> Jetson:
    """Run `plan` on a copy of `w`'s device, checking the next boot after every prefix of its commands (an
    interruption) and what the device reads back after all of them. `w` is the world before the operation."""
    j = copy.deepcopy(w.jetson)
    cmds = plan(j.info(), want, NAMES)
    assert len(cmds) <= 2 and cmds.count(VERIFY) <= 1 and (VERIFY not in cmds or cmds[0] == VERIFY), cmds
    trial = w.rec.pending == w.booted
    assert VERIFY not in cmds or not trial or op == "mark-good", (op, cmds)  # only mark-good commits a trial
    lands(j, w)
    for c in cmds:
        if c != VERIFY:
            assert w.rec.slots[NAMES[int(c[1])]].content not in NEVER_BOOTS, (c, w.rec)
        j.apply(c)
        lands(j, w)
    got = read(j)
    assert got.primary == want.primary
    assert all(got.ok[s] for s in NAMES if want.ok.get(s))
    return j


def step(w: World, op: str, seen: dict[str, int]) -> World | None:
    """One operation as the installer, the daemon and the CLI perform it (record first where they do)."""
    env = read(w.jetson)
    try:
        if op.startswith("install"):
            if w.rec.slots[w.booted].content in (Content.BAD, Content.WRITING):
                # refused by begin_install: test_install_over_the_only_good_slot_after_mark_bad_of_the_running_one
                return None
            target, env2, rec = ss.begin_install(env, w.rec, w.booted)
            j = checked_write(w, env2, op) if env2 != env else w.jetson
            w = replace(w, jetson=j, rec=rec, broken=w.broken | {target})  # being overwritten from here on
            if op == "install-interrupted":
                return w
            rec = ss.finish_install(w.rec, target, bundle(2))
            env3, rec = ss.activate(read(w.jetson), rec, target, TRIES, w.boot_id)
            w = replace(w, rec=rec, broken=w.broken - {target} if op == "install" else w.broken)
            try:
                return replace(w, jetson=checked_write(w, env3, op))
            except BootEnvError:
                # Only where UEFI gave up on the target (unbootable), or would at once (retry count spent while
                # it ran); nothing ran, the installer's record stays.
                t = w.jetson.info().slots[NAMES.index(target)]
                assert t.unbootable or t.retry_count == 0, t
                seen["activation refused"] += 1
                return w
        if op == "reboot":
            j = copy.deepcopy(w.jetson)
            slot = boot_checked(j, w)
            w = replace(w, jetson=j, booted=slot, boot=w.boot + 1)
            ph = ss.phase(read(j), w.rec, slot, w.boot_id)
            seen[f"booted in phase {ph.value}"] += 1
            if ph != Phase.TRIAL:
                w = step(w, "mark-good", seen) or w  # the daemon commits every healthy boot not on trial
            return w
        if op == "mark-good":
            env2, rec = ss.mark_good(env, w.rec, w.booted, TRIES, w.boot_id)
            return replace(w, jetson=checked_write(replace(w, rec=rec), env2, op), rec=rec)
        slot = w.booted if op == "mark-bad-booted" else NAMES[1 - NAMES.index(w.booted)]
        env2, rec = ss.mark_bad(env, w.rec, w.booted, slot)
        return replace(w, jetson=checked_write(replace(w, rec=rec), env2, op), rec=rec)
    except StateError:
        return None


def test_every_reachable_state_keeps_a_bootable_slot() -> None:
    """Every state reachable from the factory by OPS (a fixpoint: the exploration stops when no operation leads
    anywhere new), each write checked by `checked_write` and each state by `lands`."""
    j, rec = factory()
    start = World(j, rec, "a", 1, frozenset())
    keys = {start.key()}
    seen: dict[str, int] = dict.fromkeys(["activation refused"] + [f"booted in phase {p.value}" for p in Phase], 0)
    frontier = [start]
    for _ in range(MAX_DEPTH):
        nxt = []
        for w in frontier:
            for op in OPS:
                w2 = step(w, op, seen)
                if w2 is None or w2.key() in keys:
                    continue
                keys.add(w2.key())
                lands(w2.jetson, w2)
                nxt.append(w2)
        frontier = nxt
        if not frontier:
            break
    assert not frontier, f"no fixpoint within {MAX_DEPTH} operations"
    # It reached the places that matter: trials, rollbacks, refused re-activations.
    assert len(keys) > 200, len(keys)
    for event in ("activation refused", "booted in phase trial", "booted in phase rolled-back"):
        assert seen[event] > 0, seen


def test_install_over_the_only_good_slot_after_mark_bad_of_the_running_one() -> None:
    """nvbootctrl cannot clear the running slot's OK flag after mark-bad; the state machine's record still
    refuses an install that would overwrite the only good slot (as GRUB's cleared flag does)."""
    j, rec = factory()
    env, rec = ss.mark_bad(read(j), rec, "a", "a")
    assert write(j, env) == [("set-active-boot-slot", "1")]
    with pytest.raises(StateError):
        ss.begin_install(read(j), rec, "a")


# --- 3. the backend class against an executable stand-in ------------------------------------------------------

STANDIN = '''\
#!{python}
"""Stand-in for NVIDIA's nvbootctrl (-t rootfs only): the commands pitstop uses, on a JSON state file."""
import json, os, sys

args = sys.argv[1:]
if args[:1] != ["--state"]:
    sys.exit("usage: nvbootctrl --state FILE [-t rootfs] COMMAND [SLOT]")
path = args[1]
args = args[2:]
target = "bootloader"
if "-t" in args:
    i = args.index("-t")
    target = args[i + 1]
    del args[i:i + 2]
with open(path) as f:
    st = json.load(f)
st["calls"].append(" ".join(args))
fail = st.get("fail_at") == len(st["calls"])


def save():
    with open(path + ".tmp", "w") as f:
        json.dump(st, f)
    os.replace(path + ".tmp", path)


save()
if fail:
    sys.exit("nvbootctrl: simulated failure")
if target != "rootfs":
    sys.exit("the stand-in models -t rootfs only")
cmd = args[0] if args else ""
if cmd == "dump-slots-info":
    if st.get("dump_text") is not None:
        sys.stdout.write(st["dump_text"])
        sys.exit(0)
    print("Current rootfs slot: " + "AB"[st["current"]])
    print("Active rootfs slot: " + "AB"[st["active"]])
    print("num_slots: 2")
    for i in (0, 1):
        print("slot: %d,             retry_count: %d,             status: %s" % (i, st["retry"][i], st["status"][i]))
elif cmd == "get-current-slot":
    print(st["current"])
elif cmd == "set-active-boot-slot" and args[1:] in (["0"], ["1"]):
    if not st.get("ignore_set_active"):
        st["active"] = int(args[1])
    save()
elif cmd == "verify":
    st["retry"][st["current"]] = st["max"]
    save()
    print({verify!r}, end="")
else:
    sys.exit("nvbootctrl: unknown command: " + " ".join(args))
'''


@dataclass(frozen=True)
class StandIn:
    script: Path
    state: Path

    @property
    def command(self) -> str:
        return f"{self.script} --state {self.state}"

    def load(self) -> dict[str, Any]:
        d: dict[str, Any] = json.loads(self.state.read_text())
        return d

    def save(self, d: dict[str, Any]) -> None:
        self.state.write_text(json.dumps(d))

    def jetson(self) -> Jetson:
        return Jetson.from_json(self.load())

    def set(self, j: Jetson | None = None, **extra: Any) -> None:
        d = self.load()
        d.update(j.to_json() if j else {}, **extra)
        self.save(d)

    @property
    def calls(self) -> list[str]:
        calls: list[str] = self.load()["calls"]
        return calls

    def reboot(self, broken: Collection[int] = ()) -> int | None:
        """What UEFI does at power-on (the model above), on the stand-in's state."""
        j = self.jetson()
        got = j.boot(broken)
        self.set(j)
        return got


def make_standin(root: Path, j: Jetson | None = None) -> StandIn:
    root.mkdir(parents=True, exist_ok=True)
    script = root / "nvbootctrl"
    script.write_text(STANDIN.replace("{python}", sys.executable).replace("{verify!r}", repr(R36_4_VERIFY)))
    script.chmod(0o755)
    s = StandIn(script, root / "state.json")
    s.save({**(j or Jetson()).to_json(), "calls": []})
    return s


@pytest.fixture
def standin(tmp_path: Path) -> StandIn:
    return make_standin(tmp_path / "jetson")


def nvb(s: StandIn, names: dict[str, str] | None = None) -> NvbootctrlBackend:
    return NvbootctrlBackend(s.command, names or {"a": "A", "b": "B"})


def test_reads_through_the_command(standin: StandIn) -> None:
    assert nvb(standin).read() == BootEnv(("a", "b"), {"a": True, "b": True}, {"a": MAX - 1, "b": MAX})
    assert standin.calls == ["dump-slots-info"]
    # Numeric boot names, and slot names that differ from them, map the same way.
    assert nvb(standin, {"rootfs_b": "1", "rootfs_a": "0"}).read().order == ("rootfs_a", "rootfs_b")


def test_quoted_output_through_the_command(standin: StandIn) -> None:
    standin.set(dump_text=R36_3_FAILED_OVER)
    assert nvb(standin).read() == BootEnv(("b", "a"), {"a": False, "b": True}, {"a": 0, "b": 3})


def test_activate_runs_verify_then_switch_and_reads_back(standin: StandIn) -> None:
    b = nvb(standin)
    b.write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": MAX, "b": MAX}))
    assert standin.calls == ["dump-slots-info", "verify", "set-active-boot-slot 1", "dump-slots-info"]
    assert b.read().primary == "b"
    assert standin.reboot() == 1


def test_write_of_what_is_there_runs_nothing(standin: StandIn) -> None:
    b = nvb(standin)
    b.write(b.read())
    assert standin.calls == ["dump-slots-info", "dump-slots-info"]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_interrupted_write_leaves_the_running_slot_bootable(standin: StandIn, k: int) -> None:
    """The stand-in fails its k-th call of an activation (dump, verify, set-active, read-back)."""
    standin.set(fail_at=k)
    with pytest.raises(BootEnvError, match=r"failed .*simulated failure"):
        nvb(standin).write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": MAX, "b": MAX}))
    j = standin.jetson()
    assert j.status == [NORMAL, NORMAL] and j.retry[0] > 0
    # Before the switch ran, A boots next; after it (only the read-back failed), B does. Never anything else.
    assert standin.reboot() == (1 if k == 4 else 0)


def test_switch_that_does_not_read_back_is_an_error(standin: StandIn) -> None:
    standin.set(ignore_set_active=True)  # exits 0 and changes nothing
    with pytest.raises(
        BootEnvError, match=r"set-active-boot-slot 1 did not take effect: the active rootfs slot is still A$"
    ):
        nvb(standin).write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": MAX, "b": MAX}))


def test_refusal_runs_nothing(standin: StandIn) -> None:
    standin.set(Jetson(1, 1, [UNBOOTABLE, NORMAL], [0, 2]))
    with pytest.raises(BootEnvError, match=r"slot A .* marked unbootable"):
        nvb(standin).write(BootEnv(("a", "b"), {"a": True, "b": True}, {"a": MAX, "b": MAX}))
    assert standin.calls == ["dump-slots-info"]


def test_command_failures_are_boot_env_errors(standin: StandIn, tmp_path: Path) -> None:
    standin.set(fail_at=1)
    with pytest.raises(
        BootEnvError,
        match=r"nvbootctrl --state \S+ -t rootfs dump-slots-info failed \(exit status "
        r"1\): nvbootctrl: simulated failure",
    ):
        nvb(standin).read()
    standin.set(fail_at=None, dump_text=R35_4_BOOTLOADER)
    with pytest.raises(BootEnvError, match=r"-t rootfs dump-slots-info: no 'Current rootfs slot' line"):
        nvb(standin).read()
    with pytest.raises(CommandError, match="no-such-nvbootctrl: command not found"):
        NvbootctrlBackend(str(tmp_path / "no-such-nvbootctrl"), {"a": "A", "b": "B"}).read()


@pytest.mark.parametrize(
    "names, message",
    [
        ({"a": "A", "b": "C"}, "slot b: boot name: 'C' is not a rootfs slot"),
        ({"a": "A", "b": "0"}, "slots a and b are both nvbootctrl slot A"),
        ({"a": "A"}, "needs two slots"),
    ],
)
def test_backend_checks_boot_names(names: dict[str, str], message: str) -> None:
    with pytest.raises(BootEnvError, match=message):
        NvbootctrlBackend("nvbootctrl", names)
    assert NvbootctrlBackend("nvbootctrl", {"x": "b", "y": "a"}).names == ("y", "x")  # letters in either case
    with pytest.raises(BootEnvError, match="empty command"):
        NvbootctrlBackend("  ", {"a": "A", "b": "B"})


# --- configuration --------------------------------------------------------------------------------------------

JETSON_TOML = """
compatible = "acme-orin"
[bootloader]
backend = "nvbootctrl"
[[slot]]
name = "a"
device = "/dev/disk/by-partlabel/APP"
boot_name = "A"
[[slot]]
name = "b"
device = "/dev/disk/by-partlabel/APP_b"
boot_name = "B"
"""
WHERE = Path("/etc/pitstop/system.toml")


def test_config_selects_the_backend() -> None:
    cfg = system_config.parse(JETSON_TOML, WHERE)
    assert cfg.bootloader == system_config.BootloaderConfig("nvbootctrl", 3, None, nvbootctrl="nvbootctrl")
    b = backend(cfg)
    assert isinstance(b, NvbootctrlBackend) and b.command == ["nvbootctrl"] and b.names == ("a", "b")
    cfg = system_config.parse(
        JETSON_TOML.replace(
            'backend = "nvbootctrl"', 'backend = "nvbootctrl"\ntries = 2\nnvbootctrl = "chroot /host nvbootctrl"'
        )
        .replace('"A"', '"0"')
        .replace('"B"', '"1"'),
        WHERE,
    )
    b = backend(cfg)
    assert isinstance(b, NvbootctrlBackend) and b.command == ["chroot", "/host", "nvbootctrl"]
    assert cfg.bootloader.tries == 2 and b.names == ("a", "b")


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('boot_name = "B"', 'boot_name = "b"', "boot names must be 'A' and 'B' (or '0' and '1')"),
        ('boot_name = "B"', 'boot_name = "1"', "boot names must be 'A' and 'B'"),
        ('boot_name = "A"\n', "", "boot names must be 'A' and 'B'"),
        (
            'backend = "nvbootctrl"',
            'backend = "nvbootctrl"\ntries = 4',
            "with the nvbootctrl backend tries must be 1..3",
        ),
        ('backend = "nvbootctrl"', 'backend = "nvbootctrl"\nnvbootctrl = " "', "nvbootctrl must name a command"),
        ('backend = "nvbootctrl"', 'backend = "nvbootctrl"\nnvbootctrl = 1', "'nvbootctrl' must be a string"),
        ('backend = "nvbootctrl"', 'backend = "nvbootctrl"\ngrubenv = "/x"', "unknown key(s) grubenv"),
        ('backend = "nvbootctrl"', 'backend = "grub"\nnvbootctrl = "x"', "unknown key(s) nvbootctrl"),
    ],
)
def test_config_refusals(old: str, new: str, message: str) -> None:
    assert old in JETSON_TOML
    with pytest.raises(system_config.ConfigError) as e:
        system_config.parse(JETSON_TOML.replace(old, new, 1), WHERE)
    assert message in e.value.message and e.value.message.startswith(str(WHERE)), e.value.message


# --- end to end through the CLI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JetsonDevice:
    root: Path
    config: Path
    nvb: StandIn

    def set_booted(self, slot: str, boot_id: str) -> None:
        text = self.config.read_text()
        self.config.write_text(
            "\n".join(f'booted_slot = "{slot}"' if ln.startswith("booted_slot") else ln for ln in text.splitlines())
            + "\n"
        )
        (self.root / "boot_id").write_text(boot_id + "\n")

    def reboot(self, n: int, broken: Collection[int] = ()) -> str:
        got = self.nvb.reboot(broken)
        assert got is not None
        self.set_booted(NAMES[got], f"boot-{n}")
        return NAMES[got]


@pytest.fixture
def jetson_dev(tmp_path: Path, keys: Keys) -> JetsonDevice:
    root = tmp_path / "dev"
    nvb = make_standin(root / "firmware")
    (root / "data").mkdir()
    for s in NAMES:
        (root / f"slot_{s}.img").write_bytes(b"\0" * (4 << 20))
    (root / "boot_id").write_text("boot-0\n")
    cfg = root / "system.toml"
    cfg.write_text(f'''compatible = "pitstop-test"
data_dir = "{root / "data"}"
keyring = "{keys.keyring}"
booted_slot = "a"
boot_id = "{root / "boot_id"}"

[bootloader]
backend = "nvbootctrl"
nvbootctrl = "{nvb.command}"
tries = {TRIES}

[[slot]]
name = "a"
device = "{root / "slot_a.img"}"
boot_name = "A"

[[slot]]
name = "b"
device = "{root / "slot_b.img"}"
boot_name = "B"
''')
    return JetsonDevice(root, cfg, nvb)


def cli(capsys: Any, dev: JetsonDevice, *args: str | os.PathLike[str]) -> Any:
    return run_cli(capsys, *args, "--config", dev.config)


def status(capsys: Any, dev: JetsonDevice) -> dict[str, Any]:
    r = cli(capsys, dev, "status", "--json")
    assert r.rc == 0, r.err
    st: dict[str, Any] = json.loads(r.out)
    return st


def test_update_rollback_and_refused_reactivation_through_the_cli(
    capsys: Any, tmp_path: Path, keys: Keys, jetson_dev: JetsonDevice
) -> None:
    dev = jetson_dev

    def mk(v: int) -> Path:
        payload = rootfs_payload(tmp_path / f"v{v}.img", mixed_data(300_000, v))
        return make_bundle(tmp_path / f"v{v}.pitb", [payload], keys, version=f"{v}.0.0", security_version=v)

    # Install into B from A, reboot into B, commit.
    r = cli(capsys, dev, "-q", "install", mk(2))
    assert r.rc == 0, r.err
    calls = dev.nvb.calls
    assert "set-active-boot-slot 1" in calls and "set-active-boot-slot 0" not in calls
    assert calls.index("verify") < calls.index("set-active-boot-slot 1")  # the fallback refilled first
    assert status(capsys, dev)["phase"] == "activated"
    assert dev.reboot(1) == "b" and status(capsys, dev)["phase"] == "trial"
    assert cli(capsys, dev, "mark-good").rc == 0
    assert "verify" in dev.nvb.calls and dev.nvb.jetson().retry[1] == MAX
    st = status(capsys, dev)
    assert st["phase"] == "none" and st["primary"] == "b" and st["committed_security_version"] == 2
    # A failing update into A: three tries, UEFI goes back to B; mark-good settles the rollback.
    assert cli(capsys, dev, "-q", "install", mk(3)).rc == 0
    assert dev.reboot(2, broken={0}) == "b"
    assert status(capsys, dev)["phase"] == "rolled-back"
    assert cli(capsys, dev, "mark-good").rc == 0
    st = status(capsys, dev)
    assert st["primary"] == "b" and st["committed_security_version"] == 2
    assert [(s["name"], s["bootable"], s["content"]) for s in st["slots"]] == [("a", False, "bad"), ("b", True, "good")]
    # A third install writes A, but UEFI has A unbootable and nvbootctrl cannot clear that: refused, B stays.
    r = cli(capsys, dev, "-q", "install", mk(4))
    assert_refused(r, BOOTENV)
    assert "rootfs slot A (a) is marked unbootable by UEFI" in r.err
    assert dev.nvb.jetson().active == 1 and dev.reboot(3) == "b"
