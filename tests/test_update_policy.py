"""daemon/update_policy.py: every combination of the server's handling, its maintenance window, the local
reboot policy and an inhibitor; the local window at its edges and across midnight; the poll interval rule.
Times are naive local datetimes (DST is out of scope: the window follows the wall clock)."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from pitstop.daemon.ddi_model import Handling, MaintenanceWindow
from pitstop.daemon.update_policy import (
    MAX_BACKOFF_S,
    MIN_POLL_S,
    Decision,
    RebootPlan,
    RebootPolicy,
    RebootWhen,
    Window,
    decide,
    parse_window,
    poll_delay,
    reboot_plan,
)

NIGHT = parse_window("02:00-04:30")
WRAP = parse_window("22:00-04:00")
DAY = dt.date(2024, 3, 14)


def at(hh: int, mm: int, ss: int = 0, day: dt.date = DAY) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hh, mm, ss))


# -- decide: exhaustive --------------------------------------------------------------------------------------

WINDOWS: list[MaintenanceWindow | None] = [None, *MaintenanceWindow]
NOWS = [at(3, 0), at(12, 0)]   # inside and outside the local window


@pytest.mark.parametrize(("download", "update", "server_window", "policy", "inhibited", "now"), list(
    itertools.product(Handling, Handling, WINDOWS, RebootPolicy, [False, True], NOWS)))
def test_decide_every_combination(download: Handling, update: Handling, server_window: MaintenanceWindow | None,
                                  policy: RebootPolicy, inhibited: bool, now: dt.datetime) -> None:
    d = decide(download=download, update=update, maintenance_window=server_window, reboot=policy, window=NIGHT,
               now=now, inhibited=inhibited)
    # Downloading never waits for anything local.
    assert d.download == (download is not Handling.SKIP)
    expect_install = (download is not Handling.SKIP and update is not Handling.SKIP
                      and server_window is not MaintenanceWindow.UNAVAILABLE
                      and not (update is Handling.ATTEMPT and inhibited))
    assert d.install == expect_install
    assert (d.reason == "") == expect_install
    assert d.download_only == (download is not Handling.SKIP and update is Handling.SKIP
                               and server_window is not MaintenanceWindow.UNAVAILABLE)
    if not expect_install:
        assert d.reboot == RebootPlan(RebootWhen.NONE)
        return
    assert d.download
    if policy is RebootPolicy.IMMEDIATE:
        assert d.reboot == RebootPlan(RebootWhen.NOW)
    elif policy is RebootPolicy.MANUAL:
        assert d.reboot == RebootPlan(RebootWhen.MANUAL)
    elif now == at(3, 0):
        assert d.reboot == RebootPlan(RebootWhen.NOW)
    else:
        assert d.reboot == RebootPlan(RebootWhen.AT, at(2, 0, day=DAY + dt.timedelta(days=1)))


@pytest.mark.parametrize(("kwargs", "reason", "download_only"), [
    ({"download": Handling.SKIP, "update": Handling.FORCED}, "the server asks not to download yet", False),
    ({"update": Handling.SKIP}, "the server asks to download only", True),
    ({"update": Handling.SKIP, "maintenance_window": MaintenanceWindow.AVAILABLE},
     "the server asks to download only", True),
    ({"maintenance_window": MaintenanceWindow.UNAVAILABLE}, "the server's maintenance window is closed", False),
    # what hawkBit sends while the window of a normal assignment is closed (deployment_window_closed.json)
    ({"update": Handling.SKIP, "maintenance_window": MaintenanceWindow.UNAVAILABLE},
     "the server's maintenance window is closed", False),
    ({"update": Handling.ATTEMPT, "inhibited": True}, "a local inhibitor holds the update back", False),
])
def test_decide_reasons(kwargs: dict[str, object], reason: str, download_only: bool) -> None:
    args: dict[str, object] = {"download": Handling.FORCED, "update": Handling.FORCED, "maintenance_window": None,
                               "reboot": RebootPolicy.IMMEDIATE, "window": None, "now": at(12, 0), **kwargs}
    d = decide(**args)  # type: ignore[arg-type]
    assert d == Decision(download=args["download"] is not Handling.SKIP, install=False,
                         reboot=RebootPlan(RebootWhen.NONE), reason=reason, download_only=download_only)


def test_forced_installs_despite_inhibitor() -> None:
    d = decide(download=Handling.ATTEMPT, update=Handling.FORCED, maintenance_window=MaintenanceWindow.AVAILABLE,
               reboot=RebootPolicy.WINDOW, window=WRAP, now=at(23, 0), inhibited=True)
    assert d == Decision(download=True, install=True, reboot=RebootPlan(RebootWhen.NOW), reason="")


def test_window_policy_needs_a_window() -> None:
    with pytest.raises(ValueError, match="needs a maintenance window"):
        decide(download=Handling.FORCED, update=Handling.FORCED, maintenance_window=None,
               reboot=RebootPolicy.WINDOW, window=None, now=at(12, 0))
    with pytest.raises(ValueError, match="needs a maintenance window"):
        reboot_plan(RebootPolicy.WINDOW, None, at(12, 0))
    # Other policies ignore the window.
    assert reboot_plan(RebootPolicy.IMMEDIATE, None, at(12, 0)) == RebootPlan(RebootWhen.NOW)
    assert reboot_plan(RebootPolicy.MANUAL, None, at(12, 0)) == RebootPlan(RebootWhen.MANUAL)


# -- the local window --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "start", "end"), [
    ("02:00-04:30", dt.time(2), dt.time(4, 30)), ("22:00-04:00", dt.time(22), dt.time(4)),
    ("00:00-23:59", dt.time(0), dt.time(23, 59)), ("23:59-00:00", dt.time(23, 59), dt.time(0)),
    (" 02:00-04:30 ", dt.time(2), dt.time(4, 30)),
])
def test_parse_window(text: str, start: dt.time, end: dt.time) -> None:
    w = parse_window(text)
    assert (w.start, w.end) == (start, end)
    assert str(w) == text.strip()


@pytest.mark.parametrize("text", ["", "2:00-4:00", "02:00", "02:00-24:00", "24:00-01:00", "02:60-03:00",
                                  "02:00 - 04:00", "02:00-04:00-05:00", "0200-0400", "02:00\u201304:00"])
def test_parse_window_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected HH:MM-HH:MM"):
        parse_window(text)


def test_parse_window_empty_refused() -> None:
    with pytest.raises(ValueError, match="start and end are equal"):
        parse_window("03:00-03:00")


@pytest.mark.parametrize(("window", "t", "inside"), [
    # [start, end): the start minute is in, the end minute is out
    (NIGHT, dt.time(2, 0), True), (NIGHT, dt.time(1, 59, 59), False), (NIGHT, dt.time(4, 29, 59), True),
    (NIGHT, dt.time(4, 30), False), (NIGHT, dt.time(3, 0), True), (NIGHT, dt.time(0, 0), False),
    (NIGHT, dt.time(4, 29, 59, 999999), True),
    # wrapping midnight
    (WRAP, dt.time(22, 0), True), (WRAP, dt.time(21, 59, 59), False), (WRAP, dt.time(23, 59, 59), True),
    (WRAP, dt.time(0, 0), True), (WRAP, dt.time(3, 59, 59), True), (WRAP, dt.time(4, 0), False),
    (WRAP, dt.time(12, 0), False),
    # nearly all day, and one minute across midnight
    (parse_window("00:00-23:59"), dt.time(0, 0), True), (parse_window("00:00-23:59"), dt.time(23, 59), False),
    (parse_window("23:59-00:00"), dt.time(23, 59, 30), True), (parse_window("23:59-00:00"), dt.time(0, 0), False),
    (parse_window("23:59-00:00"), dt.time(23, 58, 59), False),
])
def test_window_contains(window: Window, t: dt.time, inside: bool) -> None:
    assert window.contains(t) is inside


@pytest.mark.parametrize(("window", "now", "plan"), [
    (NIGHT, at(1, 59, 59), RebootPlan(RebootWhen.AT, at(2, 0))),            # later today
    (NIGHT, at(2, 0), RebootPlan(RebootWhen.NOW)),                          # at the start
    (NIGHT, at(4, 29, 59), RebootPlan(RebootWhen.NOW)),                     # just before the end
    (NIGHT, at(4, 30), RebootPlan(RebootWhen.AT, at(2, 0, day=DAY + dt.timedelta(days=1)))),   # at the end
    (NIGHT, at(23, 59, 59), RebootPlan(RebootWhen.AT, at(2, 0, day=DAY + dt.timedelta(days=1)))),
    (WRAP, at(21, 59, 59), RebootPlan(RebootWhen.AT, at(22, 0))),
    (WRAP, at(22, 0), RebootPlan(RebootWhen.NOW)),
    (WRAP, at(0, 30), RebootPlan(RebootWhen.NOW)),                          # after midnight, still inside
    (WRAP, at(4, 0), RebootPlan(RebootWhen.AT, at(22, 0))),                 # just closed: tonight's start
    (WRAP, at(12, 0), RebootPlan(RebootWhen.AT, at(22, 0))),
    # month, year and leap-day rollover
    (NIGHT, at(23, 0, day=dt.date(2024, 12, 31)), RebootPlan(RebootWhen.AT, at(2, 0, day=dt.date(2025, 1, 1)))),
    (NIGHT, at(5, 0, day=dt.date(2024, 2, 28)), RebootPlan(RebootWhen.AT, at(2, 0, day=dt.date(2024, 2, 29)))),
    (NIGHT, at(5, 0, day=dt.date(2023, 2, 28)), RebootPlan(RebootWhen.AT, at(2, 0, day=dt.date(2023, 3, 1)))),
])
def test_reboot_in_window(window: Window, now: dt.datetime, plan: RebootPlan) -> None:
    assert reboot_plan(RebootPolicy.WINDOW, window, now) == plan
    if plan.at is not None:
        assert plan.at > now and window.contains(plan.at.time())


def test_next_start_is_strictly_after_now() -> None:
    assert NIGHT.next_start(at(2, 0)) == at(2, 0, day=DAY + dt.timedelta(days=1))
    assert NIGHT.next_start(at(1, 59, 59)) == at(2, 0)


# -- poll interval ------------------------------------------------------------------------------------------

MID = 0.5   # no jitter


@pytest.mark.parametrize(("sleep", "default", "expected"), [
    (300.0, 60.0, 300.0), (43200.0, 300.0, 43200.0),     # the server's sleep wins
    (None, 300.0, 300.0), (None, 45.0, 45.0),             # none yet: the configured default
    (10.0, 300.0, MIN_POLL_S), (0.0, 300.0, MIN_POLL_S),  # never below 30 s
    (None, 5.0, MIN_POLL_S), (30.0, 300.0, 30.0),
])
def test_poll_delay_regular(sleep: float | None, default: float, expected: float) -> None:
    assert poll_delay(sleep, default_s=default, failures=0, rand=MID) == pytest.approx(expected)


def test_poll_delay_jitter_bounds() -> None:
    assert poll_delay(300.0, default_s=60, failures=0, rand=0.0) == pytest.approx(270.0)
    assert poll_delay(300.0, default_s=60, failures=0, rand=0.999999) == pytest.approx(330.0, rel=1e-5)
    # Jitter never takes a poll below the floor.
    assert poll_delay(30.0, default_s=60, failures=0, rand=0.0) == MIN_POLL_S
    draws = [poll_delay(300.0, default_s=60, failures=0, rand=r / 100) for r in range(100)]
    assert draws == sorted(draws) and min(draws) >= 270.0 and max(draws) < 330.0


def test_poll_delay_backoff() -> None:
    got = [poll_delay(300.0, default_s=60, failures=n, rand=MID) for n in range(1, 10)]
    assert got == pytest.approx([30, 60, 120, 240, 480, 960, 1920, 3600, 3600])
    # A long regular interval raises the cap to it, never beyond.
    got = [poll_delay(43200.0, default_s=60, failures=n, rand=MID) for n in (1, 8, 11, 12, 50)]
    assert got == pytest.approx([30, 3840, 30720, 43200, 43200])
    # Days offline: no overflow.
    assert poll_delay(300.0, default_s=60, failures=100_000, rand=MID) == pytest.approx(MAX_BACKOFF_S)
    # The first retry with the lowest jitter still waits the floor.
    assert poll_delay(300.0, default_s=60, failures=1, rand=0.0) == MIN_POLL_S
    assert poll_delay(None, default_s=60, failures=1, rand=0.999) == pytest.approx(33.0, rel=1e-3)


@pytest.mark.parametrize(("rand", "failures"), [(-0.1, 0), (1.0, 0), (0.5, -1)])
def test_poll_delay_refuses_bad_input(rand: float, failures: int) -> None:
    with pytest.raises(ValueError):
        poll_delay(300.0, default_s=60, failures=failures, rand=rand)
