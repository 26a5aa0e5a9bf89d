"""The restart policy (daemon/restart_policy.py): states and back-off, driven with explicit times, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pitstop.daemon.restart_policy import Decision, ExitKind, LoopState, PolicyError, RestartPolicy

S = LoopState


class Clock:
    """The policy's time, moved by hand: `spawned` is when the current child started."""

    def __init__(self) -> None:
        self.spawned = 0.0


def crash_cycle(p: RestartPolicy, clock: Clock, ran_s: float = 1.0, kind: ExitKind = ExitKind.CRASHED) -> Decision:
    """The current child runs `ran_s` and exits; its delay passes and the next one spawns."""
    p.running(clock.spawned + min(0.1, ran_s))
    d = p.exited(clock.spawned + ran_s, kind)
    assert d.delay_s is not None
    clock.spawned += ran_s + d.delay_s
    p.backoff_over(clock.spawned)
    return d


def test_crash_delays_double_up_to_the_maximum() -> None:
    p = RestartPolicy(1.0, 60.0)
    p.start(0.0)
    clock = Clock()
    delays = []
    for _ in range(9):
        d = crash_cycle(p, clock)
        assert d.state is S.BACKOFF
        delays.append(d.delay_s)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert p.restarts == 9
    assert p.failures_in_row == 9


def test_a_stable_run_resets_the_back_off() -> None:
    p = RestartPolicy(0.5, 8.0, stable_s=60.0)
    p.start(0.0)
    clock = Clock()
    assert [crash_cycle(p, clock).delay_s for _ in range(3)] == [0.5, 1.0, 2.0]
    assert crash_cycle(p, clock, ran_s=59.9).delay_s == 4.0  # just short of stable
    d = crash_cycle(p, clock, ran_s=60.0)
    assert d.delay_s == 0.5
    assert p.failures_in_row == 1
    assert p.next_delay_s == 1.0


def test_the_stable_run_counts_from_the_spawn_not_from_running() -> None:
    p = RestartPolicy(1.0, 60.0, stable_s=10.0)
    p.start(0.0)
    clock = Clock()
    crash_cycle(p, clock)  # delay 1, respawn at 2
    crash_cycle(p, clock)  # delay 2, respawn at 5
    assert clock.spawned == 5.0
    # Up at 5 + 9 (long model load), exits at 5 + 11: 11 s since the spawn, a stable run.
    p.running(14.0)
    assert p.exited(16.0, ExitKind.CRASHED).delay_s == 1.0


def test_config_errors_wait_the_longest_delay_and_are_still_retried() -> None:
    p = RestartPolicy(1.0, 30.0)
    p.start(0.0)
    d = p.exited(0.5, ExitKind.CONFIG)  # never got up
    assert d == Decision(S.FAILED, 30.0)
    assert p.wanted
    p.backoff_over(30.5)
    assert p.state is S.STARTING
    assert p.restarts == 1
    assert p.exited(31.0, ExitKind.CONFIG) == Decision(S.FAILED, 30.0)
    # Fixed, it then crashes: no fast restart after a run of failures either.
    p.backoff_over(61.0)
    p.running(62.0)
    assert p.exited(63.0, ExitKind.CRASHED) == Decision(S.BACKOFF, 30.0)


def test_a_finished_source_stops_the_loop() -> None:
    p = RestartPolicy(1.0, 60.0)
    p.start(0.0)
    p.running(1.0)
    assert p.exited(5.0, ExitKind.FINISHED) == Decision(S.STOPPED, None)
    assert not p.wanted
    assert p.restarts == 0


@pytest.mark.parametrize("kind", list(ExitKind))
def test_an_exit_after_a_stop_leaves_it_stopped_whatever_the_kind(kind: ExitKind) -> None:
    p = RestartPolicy(1.0, 60.0)
    p.start(0.0)
    p.running(1.0)
    assert p.stop() is S.RUNNING  # the child is still there until it exits
    assert p.exited(2.0, kind) == Decision(S.STOPPED, None)


@pytest.mark.parametrize("kind", [ExitKind.CRASHED, ExitKind.CONFIG])
def test_a_stop_while_waiting_takes_effect_at_once(kind: ExitKind) -> None:
    p = RestartPolicy(1.0, 60.0)
    p.start(0.0)
    p.exited(1.0, kind)
    assert p.stop() is S.STOPPED
    with pytest.raises(PolicyError):
        p.backoff_over(100.0)


def test_a_start_asked_for_resets_the_back_off_but_not_the_restart_count() -> None:
    p = RestartPolicy(1.0, 60.0)
    p.start(0.0)
    clock = Clock()
    for _ in range(3):
        crash_cycle(p, clock)
    p.exited(clock.spawned + 1.0, ExitKind.CRASHED)
    p.stop()
    p.start(400.0)
    assert p.state is S.STARTING
    assert p.next_delay_s == 1.0
    assert p.failures_in_row == 0
    assert p.restarts == 3
    assert p.exited(401.0, ExitKind.CRASHED).delay_s == 1.0


def _in(state: LoopState) -> RestartPolicy:
    """A policy brought into `state` by legal events."""
    p = RestartPolicy(1.0, 60.0)
    if state is S.STOPPED:
        return p
    p.start(0.0)
    if state is S.RUNNING:
        p.running(1.0)
    elif state is S.BACKOFF:
        p.exited(1.0, ExitKind.CRASHED)
    elif state is S.FAILED:
        p.exited(1.0, ExitKind.CONFIG)
    assert p.state is state
    return p


EVENTS: dict[str, Callable[[RestartPolicy], object]] = {
    "start": lambda p: p.start(10.0),
    "running": lambda p: p.running(10.0),
    "exited": lambda p: p.exited(10.0, ExitKind.CRASHED),
    "backoff_over": lambda p: p.backoff_over(10.0),
    "stop": lambda p: p.stop(),
}

# state -> event -> the state after it, or None where the event is a caller's bug.
TRANSITIONS: dict[LoopState, dict[str, LoopState | None]] = {
    S.STOPPED: {"start": S.STARTING, "running": None, "exited": None, "backoff_over": None, "stop": S.STOPPED},
    S.STARTING: {"start": None, "running": S.RUNNING, "exited": S.BACKOFF, "backoff_over": None, "stop": S.STARTING},
    S.RUNNING: {"start": None, "running": None, "exited": S.BACKOFF, "backoff_over": None, "stop": S.RUNNING},
    S.BACKOFF: {"start": S.STARTING, "running": None, "exited": None, "backoff_over": S.STARTING, "stop": S.STOPPED},
    S.FAILED: {"start": S.STARTING, "running": None, "exited": None, "backoff_over": S.STARTING, "stop": S.STOPPED},
}


@pytest.mark.parametrize("state", list(LoopState))
@pytest.mark.parametrize("event", list(EVENTS))
def test_every_event_in_every_state(state: LoopState, event: str) -> None:
    p = _in(state)
    after = TRANSITIONS[state][event]
    if after is None:
        with pytest.raises(PolicyError):
            EVENTS[event](p)
        assert p.state is state  # a refused event changes nothing
    else:
        EVENTS[event](p)
        assert p.state is after


def test_state_names_are_the_documented_ones() -> None:
    assert [s.value for s in LoopState] == ["starting", "running", "backoff", "stopped", "failed"]


@pytest.mark.parametrize(
    ("lo", "hi", "stable"), [(0.0, 1.0, 60.0), (-1.0, 1.0, 60.0), (2.0, 1.0, 60.0), (1.0, 2.0, 0.0)]
)
def test_nonsense_back_off_is_refused(lo: float, hi: float, stable: float) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(lo, hi, stable)


@given(
    lo=st.floats(0.01, 10.0),
    factor=st.floats(1.0, 100.0),
    runs=st.lists(st.tuples(st.floats(0.0, 200.0), st.sampled_from([ExitKind.CRASHED, ExitKind.CONFIG])), max_size=30),
)
def test_delays_stay_within_bounds_and_reset_after_stable_runs(
    lo: float, factor: float, runs: list[tuple[float, ExitKind]]
) -> None:
    hi = lo * factor
    p = RestartPolicy(lo, hi, stable_s=60.0)
    now = 0.0
    p.start(now)
    previous: float | None = None
    for ran_s, kind in runs:
        now += ran_s
        d = p.exited(now, kind)
        assert d.delay_s is not None
        assert lo <= d.delay_s <= hi
        if kind is ExitKind.CONFIG:
            assert d.delay_s == hi
        elif ran_s >= 60.0:
            assert d.delay_s == lo
        elif previous is not None:
            assert d.delay_s == min(hi, previous * 2)
        previous = d.delay_s
        now += d.delay_s
        p.backoff_over(now)
    assert p.restarts == len(runs)
