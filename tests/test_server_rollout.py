"""The pure parts of `pitstop server`: waves (rollout.py) exhaustively over small fleets, maintenance windows
(window.py), HTTP ranges and conditions (ranges.py)."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import random

import pytest

from pitstop.ota.server import ranges
from pitstop.ota.server import rollout as w
from pitstop.ota.server.errors import DeployError
from pitstop.ota.server.window import Window

MAX_FAILURES = (0.0, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.99, 1.0)
ADVANCE_AT = (0.5, 0.8, 1.0)


# -- plans ------------------------------------------------------------------------------------------------------


def test_parse_waves() -> None:
    assert w.parse_waves("10,50,100") == (10.0, 50.0, 100.0)
    assert w.parse_waves(" 5% , 100% ") == (5.0, 100.0)
    assert w.parse_waves("100") == (100.0,)
    for bad in ("", "10,5,100", "10,50", "0,100", "50,50,100", "10,150", "a,100", "nan,100", "-5,100"):
        with pytest.raises(DeployError):
            w.parse_waves(bad)


def test_parse_fraction() -> None:
    assert w.parse_fraction("0.2", "x") == 0.2
    assert w.parse_fraction("20%", "x") == 0.2
    assert w.parse_fraction("0", "x") == 0.0
    for bad in ("1.5", "-0.1", "120%", "lots", "inf"):
        with pytest.raises(DeployError):
            w.parse_fraction(bad, "x")


PLANS = [(100.0,), (10.0, 100.0), (10.0, 50.0, 100.0), (1.0, 2.0, 3.0, 100.0), (33.3, 66.6, 100.0), (99.0, 100.0)]


@pytest.mark.parametrize("percents", PLANS)
@pytest.mark.parametrize("first", [None, 1, 3, 50])
def test_wave_sizes_cover_every_device_once(percents: tuple[float, ...], first: int | None) -> None:
    for n in range(0, 120):
        sizes = w.wave_sizes(n, percents, first)
        assert sum(sizes) == n
        assert all(s > 0 for s in sizes)
        assert len(sizes) <= len(percents) + (first is not None)
        if first is not None and n:
            assert sizes[0] == min(first, n)
        # Each percentage is reached by the end of some wave, never overshot by more than one wave's rounding.
        cums = list(itertools.accumulate(sizes))
        for p in percents:
            target = math.ceil(n * p / 100 - 1e-9)
            assert target in cums or target <= (first or 0) or target == 0


def test_wave_sizes_examples() -> None:
    assert w.wave_sizes(40, (10.0, 50.0, 100.0), 2) == [2, 2, 16, 20]
    assert w.wave_sizes(10, (10.0, 50.0, 100.0)) == [1, 4, 5]
    assert w.wave_sizes(3, (10.0, 50.0, 100.0)) == [1, 1, 1]
    assert w.wave_sizes(1, (10.0, 50.0, 100.0)) == [1]
    assert w.wave_sizes(5, (100.0,), 10) == [5]
    with pytest.raises(DeployError):
        w.wave_sizes(5, (100.0,), 0)


def test_order_and_split() -> None:
    ids = [f"dev-{i:03d}" for i in range(50)]
    a = w.order(ids, "seed-a")
    assert sorted(a) == ids and a == w.order(list(reversed(ids)), "seed-a")
    assert a != w.order(ids, "seed-b") and a != ids
    waves = w.split(a, w.wave_sizes(50, (10.0, 50.0, 100.0)))
    assert [len(x) for x in waves] == [5, 20, 25] and [d for wave in waves for d in wave] == a
    with pytest.raises(ValueError):
        w.split(a, [1, 2])


def test_take_percent() -> None:
    ids = [str(i) for i in range(10)]
    assert w.take_percent(ids, 10) == ["0"]
    assert w.take_percent(ids, 1) == ["0"]  # above 0 % is at least one device
    assert w.take_percent(ids, 25) == ["0", "1", "2"]
    assert w.take_percent(ids, 100) == ids
    assert w.take_percent([], 50) == []
    for bad in (0, -1, 101, math.nan):
        with pytest.raises(DeployError):
            w.take_percent(ids, bad)


# -- judging a wave ----------------------------------------------------------------------------------------


def all_counts(max_total: int) -> list[w.WaveCounts]:
    out = []
    for total in range(max_total + 1):
        for s, f, c in itertools.product(range(total + 1), repeat=3):
            if s + f + c <= total:
                out.append(w.WaveCounts(total, s, f, c))
    return out


def completions(c: w.WaveCounts) -> list[w.WaveCounts]:
    """Every way the open actions of `c` can still end."""
    out = []
    for s, f in itertools.product(range(c.open + 1), repeat=2):
        if s + f <= c.open:
            out.append(w.WaveCounts(c.total, c.success + s, c.failure + f, c.canceled + c.open - s - f))
    return out


COUNTS = all_counts(7)


@pytest.mark.parametrize("max_failure", MAX_FAILURES)
@pytest.mark.parametrize("advance_at", ADVANCE_AT)
def test_judge_exhaustively(max_failure: float, advance_at: float) -> None:
    for c in COUNTS:
        verdict, reason = w.judge(c, max_failure, advance_at)
        assert reason
        if c.open == 0:
            # A wave through: stop exactly when the failed share of the finished passes the threshold.
            expect_stop = c.finished > 0 and c.failure / c.finished > max_failure + 1e-12
            assert verdict is (w.Verdict.STOP if expect_stop else w.Verdict.ADVANCE), (c, max_failure)
        elif verdict is w.Verdict.STOP:
            # Before the wave is through, a stop is either the verdict at the advance point (the failed share of
            # those finished so far) or certain: however the open ones end, the wave would be stopped.
            at_advance = c.finished >= advance_at * c.decided - 1e-9 and c.failure / c.finished > max_failure
            certain = all(w.judge(final, max_failure, 1.0)[0] is w.Verdict.STOP for final in completions(c))
            assert at_advance or certain, (c, max_failure, advance_at)
            if advance_at == 1.0:
                assert certain, (c, max_failure)
        elif verdict is w.Verdict.ADVANCE:
            assert c.finished >= advance_at * c.decided - 1e-9
            assert not (c.finished and c.failure / c.finished > max_failure + 1e-12)
        else:
            assert c.finished < advance_at * c.decided
        if max_failure == 1.0:
            assert verdict is not w.Verdict.STOP
        assert w.judge(c, max_failure, advance_at, check=False)[0] is not w.Verdict.STOP


def test_judge_stops_as_soon_as_it_is_certain() -> None:
    # 10 devices, 20 % allowed: the third failure makes 3/10 > 20 % whatever the other 7 do.
    assert w.judge(w.WaveCounts(10, 0, 2), 0.2)[0] is w.Verdict.WAIT
    assert w.judge(w.WaveCounts(10, 0, 3), 0.2)[0] is w.Verdict.STOP
    # Canceled ones count for nothing: 1 of 4 decided failed = 25 %.
    assert w.judge(w.WaveCounts(5, 3, 1, 1), 0.2)[0] is w.Verdict.STOP
    assert w.judge(w.WaveCounts(5, 3, 1, 1), 0.25)[0] is w.Verdict.ADVANCE
    assert w.judge(w.WaveCounts(3, 0, 0, 3), 0.0)[0] is w.Verdict.ADVANCE
    assert w.judge(w.WaveCounts(0), 0.0)[0] is w.Verdict.ADVANCE
    with pytest.raises(ValueError):
        w.WaveCounts(2, 2, 1)


# -- a rollout step by step ------------------------------------------------------------------------------------


def test_next_step_basics() -> None:
    waves = [w.WaveCounts(1), w.WaveCounts(4), w.WaveCounts(5)]
    assert w.next_step(waves, 0, 0.2).kind is w.StepKind.WAIT
    waves[0] = w.WaveCounts(1, 1)
    assert w.next_step(waves, 0, 0.2) == w.Step(w.StepKind.START, 1, "1 of 1 finished, 0 failed")
    waves[0] = w.WaveCounts(1, 0, 1)
    step = w.next_step(waves, 0, 0.2)
    assert (step.kind, step.wave) == (w.StepKind.STOP, 0)
    assert w.next_step(waves, 0, 0.2, checked_from=1).kind is w.StepKind.START  # resumed
    done = [w.WaveCounts(1, 1), w.WaveCounts(4, 3, 0, 1), w.WaveCounts(5, 5)]
    assert w.next_step(done, 2, 0.2).kind is w.StepKind.FINISH
    # Advanced at 80 %: the last wave is through, an earlier one still has an open action: not finished yet.
    late = [w.WaveCounts(5, 4), w.WaveCounts(5, 5)]
    assert w.next_step(late, 1, 0.2, 0.8).kind is w.StepKind.WAIT
    with pytest.raises(ValueError):
        w.next_step(done, 3, 0.2)


@pytest.mark.parametrize("seed", range(40))
def test_simulated_rollouts(seed: int) -> None:
    """Random fleets where each device fails with some probability, its outcome arriving in random order:
    waves are released one after the other, never beyond a stop, and the rollout ends finished or stopped
    exactly as judging each wave's final counts says."""
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    percents = rng.choice(PLANS)
    sizes = w.wave_sizes(n, percents, rng.choice([None, 1, 2]))
    p_fail = rng.choice([0.0, 0.05, 0.3, 0.8])
    max_failure = rng.choice(MAX_FAILURES)
    outcome = [[rng.random() < p_fail for _ in range(size)] for size in sizes]
    reported = [[False] * size for size in sizes]
    current, state = 0, "running"
    while state == "running":
        counts = [
            w.WaveCounts(
                len(o),
                sum(1 for x, r in zip(o, rep, strict=True) if r and not x),
                sum(1 for x, r in zip(o, rep, strict=True) if r and x),
            )
            for o, rep in zip(outcome, reported, strict=True)
        ]
        step = w.next_step(counts, current, max_failure)
        if step.kind is w.StepKind.START:
            assert step.wave == current + 1
            current = step.wave
            continue
        if step.kind is w.StepKind.STOP:
            state = "stopped"
            final = [w.WaveCounts(len(o), o.count(False), o.count(True)) for o in outcome]
            assert w.judge(final[current], max_failure)[0] is w.Verdict.STOP  # certain, not premature
            break
        if step.kind is w.StepKind.FINISH:
            state = "finished"
            break
        pending = [i for i, r in enumerate(reported[current]) if not r]
        assert pending, "waiting on a wave with nothing open"
        reported[current][rng.choice(pending)] = True
    if state == "finished":
        assert current == len(sizes) - 1
        for o in outcome:
            assert w.judge(w.WaveCounts(len(o), o.count(False), o.count(True)), max_failure)[0] is w.Verdict.ADVANCE
    assert all(not any(r) for r in reported[current + 1 :])  # nothing beyond the last released wave


# -- maintenance windows ----------------------------------------------------------------------------------------


def at(hour: int, minute: int = 0, tz: dt.tzinfo = dt.UTC) -> dt.datetime:
    return dt.datetime(2026, 11, 23, hour, minute, tzinfo=tz)


def test_window() -> None:
    night = Window.parse("22:00-04:00")
    assert [night.is_open(at(h)) for h in (21, 22, 23, 0, 3, 4, 12)] == [False, True, True, True, True, False, False]
    assert night.is_open(at(3, 59)) and not night.is_open(at(21, 59))
    day = Window.parse("09:30-17:00")
    assert day.is_open(at(9, 30)) and not day.is_open(at(9, 29)) and not day.is_open(at(17, 0))
    berlin = Window.parse("22:00-23:00@Europe/Berlin")
    assert berlin.is_open(at(21, 30)) and not berlin.is_open(at(22, 30))  # CET is UTC+1 in November
    summer = dt.datetime(2026, 7, 1, 20, 30, tzinfo=dt.UTC)  # CEST, UTC+2: 22:30 in Berlin
    assert berlin.is_open(summer)
    assert str(berlin) == "22:00-23:00@Europe/Berlin" and str(night) == "22:00-04:00"
    for bad in ("22:00", "25:00-01:00", "10:00-10:00", "1:00-2:00", "22:00-04:00@Mars/Olympus", "22:00-04:60"):
        with pytest.raises(DeployError):
            Window.parse(bad)
    with pytest.raises(ValueError):
        night.is_open(dt.datetime(2026, 1, 1))  # naive on purpose


# -- ranges ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "kind", "spans"), [
    (None, "full", ()),
    ("bytes=0-99", "partial", ((0, 99),)),
    ("bytes=100-", "partial", ((100, 999),)),
    ("bytes=-100", "partial", ((900, 999),)),
    ("bytes=-5000", "partial", ((0, 999),)),
    ("bytes=990-5000", "partial", ((990, 999),)),
    ("bytes=0-9,5-19,100-109", "partial", ((0, 19), (100, 109))),
    ("bytes=0-9,10-19", "partial", ((0, 19),)),
    ("bytes=1000-", "unsatisfiable", ()),
    ("bytes=1000-,2000-2001", "unsatisfiable", ()),
    ("bytes=-0", "unsatisfiable", ()),
    ("bytes=1000-,0-0", "partial", ((0, 0),)),
    ("bytes=5-2", "full", ()),
    ("bytes=abc", "full", ()),
    ("items=0-9", "full", ()),
    ("bytes=-", "full", ()),
    ("bytes=" + ",".join(f"{i}-{i}" for i in range(0, 40, 2)), "full", ()),
])  # fmt: skip
def test_parse_range(header: str | None, kind: str, spans: tuple[tuple[int, int], ...]) -> None:
    plan = ranges.parse_range(header, 1000)
    assert (plan.kind.value, plan.ranges) == (kind, spans)


def test_conditions() -> None:
    tag = '"abc"'
    assert ranges.none_match('"abc"', tag) and ranges.none_match('W/"abc", "x"', tag) and ranges.none_match("*", tag)
    assert not ranges.none_match('"x"', tag) and not ranges.none_match(None, tag)
    t = 1_795_000_000.0
    assert ranges.if_range_holds(None, tag, t)
    assert ranges.if_range_holds('"abc"', tag, t) and not ranges.if_range_holds('W/"abc"', tag, t)
    assert ranges.if_range_holds(ranges.http_date(t), tag, t)
    assert not ranges.if_range_holds(ranges.http_date(t - 60), tag, t)
    assert not ranges.if_range_holds("yesterday", tag, t)
