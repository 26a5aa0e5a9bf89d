"""The boot-slot state machine (ota/slot_state.py), exhaustively over a small domain. Pure: no I/O.

Domain: ORDER in every arrangement of a subset of (a, b); each slot's OK flag and tries 0..3; each slot's
recorded content; pending in {None, a, b}; activated_boot in {None, boot-1}; booted in {a, b, None};
boot id in {boot-1, boot-2}. Every operation on every state either raises StateError or lands in a state
that satisfies the invariants below; a bootloader simulation then checks rollback and commit end to end.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from pitstop.ota import slot_state as ss
from pitstop.ota.slot_state import BootEnv, Content, Phase, Record, SlotRecord, StateError

SLOTS = ("a", "b")
ORDERS: tuple[tuple[str, ...], ...] = ((), ("a",), ("b",), ("a", "b"), ("b", "a"))
TRIES = range(4)
N = 3                        # configured tries
FLOOR = 5                    # committed security_version in every record of the domain
SV = {"a": 2, "b": 9}        # security_version of what each slot holds: one below the floor, one above
BOOT_IDS = ("boot-1", "boot-2")
UNBOOTABLE = (Content.WRITING, Content.BAD)

T = TypeVar("T")


def other(s: str) -> str:
    return "b" if s == "a" else "a"


def bundle(slot: str) -> dict[str, Any]:
    return {"version": f"1.0.{SV[slot]}", "security_version": SV[slot]}


def all_envs(tries: range = TRIES) -> Iterator[BootEnv]:
    for order in ORDERS:
        for ok_a, ok_b in itertools.product((False, True), repeat=2):
            for t_a, t_b in itertools.product(tries, repeat=2):
                yield BootEnv(order, {"a": ok_a, "b": ok_b}, {"a": t_a, "b": t_b})


def slot_record(slot: str, content: Content) -> SlotRecord:
    # What the installer leaves: no bundle while empty or being written, the bundle's facts otherwise.
    return SlotRecord(content, {} if content in (Content.EMPTY, Content.WRITING) else bundle(slot))


def all_records() -> Iterator[Record]:
    for c_a, c_b in itertools.product(Content, repeat=2):
        for pending in (None, "a", "b"):
            for activated in (None, "boot-1"):
                yield Record({"a": slot_record("a", c_a), "b": slot_record("b", c_b)}, pending, activated, FLOOR)


ENVS = tuple(all_envs())
RECORDS = tuple(all_records())
BOOTED: tuple[str | None, ...] = ("a", "b", None)


def attempt(fn: Callable[..., T], *args: Any) -> T | None:
    try:
        return fn(*args)
    except StateError as e:
        assert e.exit_code == 24 and e.message
        return None


def bootable(env: BootEnv) -> set[str]:
    return {s for s in SLOTS if env.bootable(s)}


def check_common(env: BootEnv, rec: Record, env2: BootEnv, rec2: Record, running: str | None = None) -> None:
    """What no operation may do, whatever it is. `running`: begin_install's booted slot, which it puts first
    in ORDER so that a reboot mid-write returns to it, whatever its record says."""
    assert set(rec2.slots) == set(SLOTS)
    assert rec2.committed_security_version >= rec.committed_security_version
    assert rec2.pending is None or rec2.slots[rec2.pending].content == Content.INSTALLED or rec2.pending == rec.pending
    assert rec2.activated_boot is None or rec2.pending is not None
    assert set(env2.order) <= set(SLOTS) and len(set(env2.order)) == len(env2.order)
    assert all(0 <= env2.tries.get(s, 0) <= max(N, *env.tries.values()) for s in SLOTS)
    for s in SLOTS:
        # A slot being written or recorded bad is never made bootable (activate after finish_install
        # makes a slot bootable, but its content is INSTALLED by then); nor is its OK flag ever set.
        if rec2.slots[s].content in UNBOOTABLE and env2.ok[s]:
            assert env.ok[s], (s, env, rec, env2, rec2)
        if rec2.slots[s].content in UNBOOTABLE and env2.bootable(s) and s != running:
            assert env.bootable(s), (s, env, rec, env2, rec2)
    if bootable(env):
        assert bootable(env2), ("left nothing bootable", env, rec, env2, rec2)


# --- the bootloader model ----------------------------------------------------------------------------


def reference_next_boot(env: BootEnv) -> tuple[str | None, bool]:
    """docs/grub.md in other words: (slot, whether a try is spent)."""
    with_tries = [s for s in env.order if env.ok.get(s) and env.tries.get(s, 0) > 0]
    if with_tries:
        return with_tries[0], True
    ok = [s for s in env.order if env.ok.get(s)]
    if ok:
        return ok[0], False
    return (env.order[0] if env.order else None), False


def test_next_boot_and_after_boot_model() -> None:
    for env in all_envs(range(10)):
        slot, spends = reference_next_boot(env)
        assert env.next_boot() == slot
        picked, after = env.after_boot()
        assert picked == slot
        assert after.order == env.order and after.ok == env.ok
        for s in SLOTS:
            assert after.tries[s] == env.tries[s] - (1 if spends and s == slot else 0)
        assert env.primary == (env.order[0] if env.order else None)
        assert bootable(env) == {s for s in env.order if env.ok[s]}


def test_repeated_boots_never_go_below_zero_and_end_on_a_last_resort() -> None:
    for env in ENVS:
        e = env
        for _ in range(2 * N + 2):
            _, e = e.after_boot()
            assert all(t >= 0 for t in e.tries.values())
        assert all(e.tries[s] == 0 for s in bootable(env))  # every try spent ...
        assert e.next_boot() == reference_next_boot(e)[0]    # ... and the choice is the last resort's


# --- operations, every state ---------------------------------------------------------------------------


def test_begin_install_every_state() -> None:
    for env, rec, booted in itertools.product(ENVS, RECORDS, BOOTED):
        res = attempt(ss.begin_install, env, rec, booted)
        if res is None:
            # Refused only when the target is the one slot left to boot: the running one is not bootable by the
            # bootloader's flags or by its record (nvbootctrl cannot clear a flag; the record says bad or writing).
            running_ok = booted is not None and env.bootable(booted) and rec.slots[booted].content not in (
                Content.WRITING, Content.BAD)
            assert (booted is None or rec.pending == booted
                    or (env.bootable(other(booted)) and not running_ok)), (env, rec, booted)
            continue
        assert booted is not None
        target, env2, rec2 = res
        check_common(env, rec, env2, rec2, running=booted)
        assert target == other(booted), "begin_install targets the booted slot"
        assert rec2.slots[target] == SlotRecord(Content.WRITING)
        assert rec2.slots[booted] == rec.slots[booted]
        assert (rec2.pending, rec2.activated_boot, rec2.committed_security_version) == (None, None, FLOOR)
        if env.next_boot() == booted and not env.ok[target]:
            assert env2 == env, "boot configuration changed although the running slot was next and the target not OK"
        else:
            # the next boot (an activated install not booted yet) or the fallback: deactivated, so neither a
            # reboot mid-write nor a fallback from the running slot boots the half-written slot
            assert not env2.ok[target] and env2.tries[target] == 0 and env2.order == (booted, target)
            assert env2.ok[booted] == env.ok[booted] and env2.tries[booted] == env.tries[booted]
            if env.next_boot() == booted:
                assert env2.next_boot() == booted, "the next boot changed although the target was not next"
        assert env2.next_boot() == booted, "a reboot during the write would not boot the running slot"
        assert not env2.ok[target], "the half-written slot could be booted"
        # The state it leaves is one finish_install accepts.
        assert ss.finish_install(rec2, target, bundle(target)).pending == target


def test_finish_install_every_state() -> None:
    for rec, target in itertools.product(RECORDS, SLOTS):
        rec2 = attempt(ss.finish_install, rec, target, bundle(target))
        if rec2 is None:
            assert rec.slots[target].content != Content.WRITING
            continue
        assert rec.slots[target].content == Content.WRITING
        assert rec2.slots[target] == SlotRecord(Content.INSTALLED, bundle(target))
        assert rec2.slots[other(target)] == rec.slots[other(target)]
        assert (rec2.pending, rec2.activated_boot, rec2.committed_security_version) == (target, None, FLOOR)


def test_activate_every_state() -> None:
    for env, rec, target, boot_id in itertools.product(ENVS, RECORDS, SLOTS, BOOT_IDS):
        res = attempt(ss.activate, env, rec, target, N, boot_id)
        if res is None:
            assert rec.pending != target or rec.slots[target].content != Content.INSTALLED
            continue
        assert rec.pending == target and rec.slots[target].content == Content.INSTALLED
        env2, rec2 = res
        check_common(env, rec, env2, rec2)
        old = other(target)
        assert env2.primary == target and env2.ok[target] and env2.tries[target] == N
        assert env2.next_boot() == target
        assert env2.order == (target, old)
        # The fallback keeps its OK flag; if it has one, it gets tries to fall back with (else GRUB's last
        # resort, the first OK slot in ORDER, would be the failing new slot forever). A slot recorded as
        # being written or bad is no fallback: a stale OK flag is cleared.
        if rec.slots[old].content in UNBOOTABLE:
            assert not env2.ok[old] and env2.tries[old] == 0
        else:
            assert env2.ok[old] == env.ok[old]
            assert env2.tries[old] == (max(env.tries[old], N) if env.ok[old] else env.tries[old])
        before = None if env.primary == target else (env.ok[target], env.tries[target])
        assert rec2 == replace(rec, activated_boot=boot_id, switch_from=before)
        assert ss.phase(env2, rec2, old, boot_id) == Phase.ACTIVATED
        # A power cut between the record and the boot switch: after the reboot, still only installed.
        if before is not None:
            assert ss.phase(env, rec2, old, "boot-3") == Phase.INSTALLED
        assert ss.phase(env2, rec2, target, "boot-3") == Phase.TRIAL


def test_mark_good_every_state() -> None:
    for env, rec, booted, boot_id in itertools.product(ENVS, RECORDS, BOOTED, BOOT_IDS):
        res = attempt(ss.mark_good, env, rec, booted, N, boot_id)
        if res is None:
            assert booted is None or rec.slots[booted].content in UNBOOTABLE
            continue
        assert booted is not None and rec.slots[booted].content not in UNBOOTABLE
        env2, rec2 = res
        check_common(env, rec, env2, rec2)
        old = other(booted)
        assert env2.ok[booted] and env2.tries[booted] == N
        assert rec2.slots[booted].content == Content.GOOD
        assert rec2.slots[booted].bundle == rec.slots[booted].bundle
        ph = ss.phase(env, rec, booted, boot_id)
        if rec.pending == old and rec.slots[old].content == Content.INSTALLED and ph in (Phase.INSTALLED,
                                                                                       Phase.ACTIVATED):
            # An update waiting for its reboot is not cancelled by the running slot's routine commit.
            assert rec2.pending == old and rec2.activated_boot == rec.activated_boot
            assert rec2.slots[old] == rec.slots[old]
            assert rec2.committed_security_version == FLOOR
            assert env2.ok[old] == env.ok[old] and env2.tries[old] == env.tries[old]
            assert ss.phase(env2, rec2, booted, boot_id) == ph
            if ph == Phase.ACTIVATED or (env.primary == old and env.bootable(old)):
                assert env2.order == env.order and env2.primary == old  # the switch stays as it is
            else:
                assert env2.primary == booted
            continue
        assert env2.primary == booted and env2.next_boot() == booted
        assert rec2.pending is None and rec2.activated_boot is None
        sv = int(rec.slots[booted].bundle.get("security_version", 0))
        want_floor = max(FLOOR, sv) if rec.pending == booted else FLOOR
        assert rec2.committed_security_version == want_floor
        if rec.pending == old:  # a rollback settled: the install that failed never boots again
            assert rec2.slots[old].content == Content.BAD and not env2.ok[old] and env2.tries[old] == 0
        elif rec.slots[old].content in UNBOOTABLE:  # e.g. an interrupted install's slot: a stale OK flag goes
            assert rec2.slots[old] == rec.slots[old] and not env2.ok[old] and env2.tries[old] == 0
        else:
            assert rec2.slots[old] == rec.slots[old]
            assert env2.ok[old] == env.ok[old] and env2.tries[old] == env.tries[old]
        assert ss.phase(env2, rec2, booted, "boot-1") == Phase.NONE


def test_mark_bad_every_state() -> None:
    for env, rec, booted, slot in itertools.product(ENVS, RECORDS, BOOTED, SLOTS):
        res = attempt(ss.mark_bad, env, rec, booted, slot)
        fallback = other(slot)
        if res is None:
            assert (not env.bootable(fallback) or rec.slots[fallback].content in UNBOOTABLE
                    or rec.pending == fallback), (env, rec, booted, slot)
            continue
        env2, rec2 = res
        check_common(env, rec, env2, rec2)
        assert env2.bootable(fallback), "mark_bad left nothing bootable"
        assert rec2.slots[fallback].content not in UNBOOTABLE
        assert rec.pending != fallback, "mark_bad dropped the fallback of an install not committed yet"
        assert not env2.bootable(slot) and env2.tries[slot] == 0
        assert env2.next_boot() == fallback
        assert env2.ok[fallback] == env.ok[fallback] and env2.tries[fallback] == env.tries[fallback]
        assert rec2.slots[slot] == replace(rec.slots[slot], content=Content.BAD)
        assert rec2.slots[fallback] == rec.slots[fallback]
        assert rec2.committed_security_version == FLOOR
        if rec.pending == slot:
            assert rec2.pending is None and rec2.activated_boot is None
        else:
            assert rec2.pending == rec.pending and rec2.activated_boot == (rec.activated_boot if rec.pending else None)


def test_bad_slot_names_are_refused() -> None:
    env, rec = ENVS[-1], RECORDS[0]
    with pytest.raises(StateError, match="no slot named"):
        ss.mark_bad(env, rec, "a", "c")
    with pytest.raises(StateError, match="booted"):
        ss.begin_install(env, rec, "c")
    with pytest.raises(StateError, match="booted"):
        ss.mark_good(env, rec, "c", N)
    with pytest.raises(StateError, match="exactly two"):
        ss.begin_install(env, Record({"a": SlotRecord()}), "a")


# --- phase and status ----------------------------------------------------------------------------------


def expected_phase(env: BootEnv, rec: Record, booted: str | None, boot_id: str) -> Phase:
    p = rec.pending
    if p is None:
        return Phase.NONE
    if booted == p:
        return Phase.TRIAL
    if rec.activated_boot is None:
        return Phase.INSTALLED
    switched = env.primary == p and env.bootable(p)
    if boot_id == rec.activated_boot and not switched:
        return Phase.INSTALLED  # the switch never landed
    if boot_id == rec.activated_boot and env.tries[p] > 0:
        return Phase.ACTIVATED
    return Phase.ROLLED_BACK


def test_phase_every_state() -> None:
    for env, rec, booted, boot_id in itertools.product(ENVS, RECORDS, BOOTED, BOOT_IDS):
        assert ss.phase(env, rec, booted, boot_id) == expected_phase(env, rec, booted, boot_id), (env, rec, booted)


def test_status_every_state() -> None:
    for env in ENVS:
        nxt, primary = env.next_boot(), env.primary
        for rec, booted in itertools.product(RECORDS, BOOTED):
            st = ss.status(env, rec, booted, "boot-2")
            assert (st.booted, st.primary, st.next_boot, st.pending, st.committed_security_version) == (
                booted, primary, nxt, rec.pending, FLOOR)
            assert st.phase == ss.phase(env, rec, booted, "boot-2")
            assert [v.name for v in st.slots] == list(SLOTS)
            for v in st.slots:
                r = rec.slots[v.name]
                assert (v.booted, v.primary, v.next_boot, v.bootable, v.tries_left, v.content, v.pending_commit,
                        v.bundle) == (v.name == booted, v.name == primary, v.name == nxt, env.bootable(v.name),
                                      env.tries[v.name], r.content, v.name == rec.pending, r.bundle)


def factory() -> tuple[BootEnv, Record]:
    env = BootEnv(("a", "b"), {"a": True, "b": False}, {"a": N, "b": 0})
    return env, ss.initial_record(env, ("a", "b"))


def test_initial_record() -> None:
    env, rec = factory()
    assert rec == Record({"a": SlotRecord(Content.GOOD), "b": SlotRecord(Content.EMPTY)})
    both = ss.initial_record(replace(env, ok={"a": True, "b": True}), ("a", "b"))
    assert {s: r.content for s, r in both.slots.items()} == {"a": Content.GOOD, "b": Content.GOOD}
    assert ss.initial_record(BootEnv((), {}, {}), ("a", "b")).slots["a"].content == Content.EMPTY


def test_each_documented_phase() -> None:
    env, rec = factory()
    assert ss.phase(env, rec, "a", "boot-1") == Phase.NONE
    target, env, rec = ss.begin_install(env, rec, "a")
    assert ss.phase(env, rec, "a", "boot-1") == Phase.NONE  # being written: nothing awaits commit yet
    rec = ss.finish_install(rec, target, bundle(target))
    assert ss.phase(env, rec, "a", "boot-1") == Phase.INSTALLED  # written, not switched (--no-activate)
    env_on, rec_on = ss.activate(env, rec, target, N, "boot-1")
    assert ss.phase(env, rec_on, "a", "boot-1") == Phase.INSTALLED  # recorded, but the switch never landed
    _, env_a = env.after_boot()  # ... and the power failed there: the next boot is a again
    assert ss.phase(env_a, rec_on, "a", "boot-2") == Phase.INSTALLED
    assert ss.phase(env_on, rec_on, "a", "boot-1") == Phase.ACTIVATED
    picked, env_b = env_on.after_boot()
    assert picked == "b" and ss.phase(env_b, rec_on, "b", "boot-2") == Phase.TRIAL
    assert ss.phase(env_b, rec_on, "a", "boot-2") == Phase.ROLLED_BACK  # GRUB's fallback entry booted a
    spent = replace(env_on, tries={**env_on.tries, "b": 0})
    assert ss.phase(spent, rec_on, "a", "boot-1") == Phase.ROLLED_BACK
    assert {p.value for p in Phase} == {"none", "installed", "activated", "trial", "rolled-back"}


# --- simulation: the bootloader boots, the daemon marks good (or never does) -------------------------


def activated_states() -> Iterator[tuple[BootEnv, Record, str]]:
    """Every state right after a successful activate whose fallback slot has its OK flag (and its N tries:
    activate gives them)."""
    for env, rec in itertools.product(ENVS, RECORDS):
        for target in SLOTS:
            if rec.pending != target or rec.slots[target].content != Content.INSTALLED:
                continue
            env2, rec2 = ss.activate(env, rec, target, N, "boot-1")
            if env2.ok[other(target)]:
                yield env2, rec2, target


def test_failing_new_slot_falls_back_within_n_plus_one_boots_and_stays() -> None:
    count = 0
    for env, rec, target in activated_states():
        count += 1
        old = other(target)
        booted: str | None = None
        boots = 0
        while booted != old:
            booted, env = env.after_boot()
            boots += 1
            assert boots <= N + 1, "never fell back to the old slot"
            ph = ss.phase(env, rec, booted, f"boot-{boots + 1}")
            assert ph == (Phase.TRIAL if booted == target else Phase.ROLLED_BACK)
            if booted == target:
                # the new slot is broken: it may not even get to mark itself bad; a try is spent anyway
                with pytest.raises(StateError):
                    ss.begin_install(env, rec, booted)
        assert boots == N + 1
        # Healthy again on the old slot: the daemon marks it good, which settles the rollback.
        env, rec = ss.mark_good(env, rec, old, N)
        assert rec.slots[target].content == Content.BAD and rec.committed_security_version == FLOOR
        for _ in range(3 * N):
            booted, env = env.after_boot()
            assert booted == old
            env, rec = ss.mark_good(env, rec, old, N)
    assert count > 100


def test_failing_new_slot_without_any_mark_good() -> None:
    """If nothing is ever marked good, the old slot boots for its own N tries after the new slot's; then
    GRUB's last resort (the first OK slot in ORDER) is the new slot again, for good. So the daemon must mark
    the old slot good once it is back on it (the test above)."""
    for env, _rec, target in activated_states():
        seen = []
        for _ in range(3 * N + 1):
            booted, env = env.after_boot()
            seen.append(booted)
        old = other(target)
        assert seen[:N] == [target] * N and seen[N] == old
        assert set(seen[N:2 * N]) == {old} and set(seen[-N:]) == {target}


def test_healthy_new_slot_commits() -> None:
    for env, rec, target in activated_states():
        booted, env = env.after_boot()
        assert booted == target
        assert ss.phase(env, rec, booted, "boot-2") == Phase.TRIAL
        env, rec = ss.mark_good(env, rec, booted, N)
        assert rec.pending is None and rec.slots[target].content == Content.GOOD
        assert rec.committed_security_version == max(FLOOR, SV[target])
        assert ss.phase(env, rec, booted, "boot-2") == Phase.NONE
        for _ in range(2 * N):
            booted, env = env.after_boot()
            assert booted == target
            env, rec = ss.mark_good(env, rec, booted, N)
        # the old slot is the fallback: the next install goes there, and it stops being one while written
        t2, env2, _ = ss.begin_install(env, rec, booted)
        assert t2 == other(target) and env2.next_boot() == target and not env2.ok[t2]
        assert env2.primary == target and env2.tries[target] == env.tries[target]


def test_mark_bad_on_trial_goes_back_to_old_slot() -> None:
    env, rec = factory()
    target, env, rec = ss.begin_install(env, rec, "a")
    rec = ss.finish_install(rec, target, bundle(target))
    env, rec = ss.activate(env, rec, target, N, "boot-1")
    # refused: dropping the fallback of an install not committed yet
    with pytest.raises(StateError, match="settle b first"):
        ss.mark_bad(env, rec, "a", "a")
    booted, env = env.after_boot()
    with pytest.raises(StateError, match="settle b first"):
        ss.mark_bad(env, rec, booted, "a")
    env, rec = ss.mark_bad(env, rec, booted, "b")
    assert env.next_boot() == "a" and rec.pending is None and rec.slots["b"].content == Content.BAD
    assert env.after_boot()[0] == "a"
    # and now a is the only bootable slot: marking it bad too is refused
    with pytest.raises(StateError, match="leave nothing to boot"):
        ss.mark_bad(env, rec, "a", "a")


def test_install_from_a_slot_marked_bad_does_not_overwrite_the_only_good_slot() -> None:
    env, rec = factory()
    env = replace(env, ok={"a": True, "b": True}, tries={"a": N, "b": N})
    rec = ss.initial_record(env, ("a", "b"))
    env, rec = ss.mark_bad(env, rec, "a", "a")  # running a, marked it bad: b boots next
    with pytest.raises(StateError, match="reboot into b"):
        ss.begin_install(env, rec, "a")


def test_second_install_over_activated_slot() -> None:
    env, rec = factory()
    target, env, rec = ss.begin_install(env, rec, "a")
    env, rec = ss.activate(env, ss.finish_install(rec, target, bundle(target)), target, N, "boot-1")
    assert env.next_boot() == "b"
    target2, env2, rec2 = ss.begin_install(env, rec, "a")
    assert target2 == "b" and env2.next_boot() == "a" and not env2.bootable("b")
    assert rec2.pending is None and rec2.slots["b"].content == Content.WRITING
    rec2 = ss.finish_install(rec2, "b", {"security_version": 11})
    env3, rec3 = ss.activate(env2, rec2, "b", N, "boot-1")
    assert env3.next_boot() == "b" and rec3.pending == "b"
