"""What the update agent does with a deployment, and when it polls next; pure, no clock read here.

`decide` turns the server's handling (download/update skip|attempt|forced, the server-side maintenance
window) and the device's reboot policy ([update] reboot = immediate|window|manual, maintenance_window =
"HH:MM-HH:MM") into: download now?, install now?, reboot now, at a given time, or only by hand?
Times are the device's local wall clock as naive datetimes; a DST jump moves the window with the clock.

`poll_delay` is the time to the next poll: the server's sleep (never below 30 s) with jitter, and an
exponential back-off from 30 s after failed polls. docs/ddi.md explains both.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum

from pitstop.daemon.ddi_model import Handling, MaintenanceWindow

MIN_POLL_S = 30.0          # hawkBit's default minPollingTime; polling faster only loads the server
MAX_BACKOFF_S = 3600.0     # failed polls back off up to an hour, or the regular interval if longer
JITTER = 0.1               # ±10 %: devices that booted together do not poll together

_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


class RebootPolicy(StrEnum):
    IMMEDIATE = "immediate"   # reboot as soon as the install is done
    WINDOW = "window"         # reboot inside the local maintenance window
    MANUAL = "manual"         # never reboot by itself; an operator does


class RebootWhen(StrEnum):
    NONE = "none"             # nothing installed, nothing to reboot into
    NOW = "now"
    AT = "at"                 # at RebootPlan.at (the window's next start)
    MANUAL = "manual"         # left to an operator


@dataclass(frozen=True)
class Window:
    """A daily local-time window [start, end); start > end wraps midnight (22:00-04:00)."""

    start: dt.time
    end: dt.time

    def contains(self, t: dt.time) -> bool:
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_start(self, now: dt.datetime) -> dt.datetime:
        """The first start of the window strictly after `now` (today's if still ahead, else tomorrow's)."""
        today = dt.datetime.combine(now.date(), self.start)
        return today if today > now else today + dt.timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_window(text: str) -> Window:
    """'HH:MM-HH:MM' (00:00..23:59) to a Window; ValueError for anything else, or an empty window."""
    m = _WINDOW.fullmatch(text.strip())
    if not m:
        raise ValueError(f"maintenance window {text!r}: expected HH:MM-HH:MM in 24-hour local time, e.g. 02:00-04:30")
    start, end = dt.time(int(m[1]), int(m[2])), dt.time(int(m[3]), int(m[4]))
    if start == end:
        raise ValueError(f"maintenance window {text!r}: start and end are equal (an empty window)")
    return Window(start, end)


@dataclass(frozen=True)
class RebootPlan:
    when: RebootWhen
    at: dt.datetime | None = None   # set for RebootWhen.AT


@dataclass(frozen=True)
class Decision:
    download: bool
    install: bool
    reboot: RebootPlan
    reason: str   # why the install waits (for the "scheduled" feedback and the log); "" when it does not
    # The server wants the download only (hawkBit's download-only assignment): its "downloaded" feedback
    # ends the action there, and later feedback on it is answered 410.
    download_only: bool = False


def decide(*, download: Handling, update: Handling, maintenance_window: MaintenanceWindow | None,
           reboot: RebootPolicy, window: Window | None, now: dt.datetime, inhibited: bool = False) -> Decision:
    """The agent's next steps for a deployment.

    - Download unless the server says skip; downloading disturbs nothing, so nothing local holds it back.
    - Install when the server says attempt or forced, its maintenance window (if the action has one) is
      open and the download is allowed. `inhibited` (a local inhibitor is held, e.g. a loop in a job that
      must not be interrupted) postpones an "attempt" but not a "forced" update: that is what DDI's
      attempt/forced distinction means.
    - Reboot by the device's policy; "window" reboots now inside the window, else at its next start.
      A forced update does not override the local reboot policy: it is about when to install, while the
      reboot policy is the site's own constraint on when the machine may stop.
    Raises ValueError when reboot is "window" without a window.
    """
    if reboot is RebootPolicy.WINDOW and window is None:
        raise ValueError("reboot policy 'window' needs a maintenance window")
    get = download is not Handling.SKIP
    # hawkBit also answers update=skip while its maintenance window is closed: that is a wait, not download-only.
    download_only = get and update is Handling.SKIP and maintenance_window is not MaintenanceWindow.UNAVAILABLE
    reason = ""
    if not get:
        reason = "the server asks not to download yet"
    elif maintenance_window is MaintenanceWindow.UNAVAILABLE:
        reason = "the server's maintenance window is closed"
    elif update is Handling.SKIP:
        reason = "the server asks to download only"
    elif update is Handling.ATTEMPT and inhibited:
        reason = "a local inhibitor holds the update back"
    if reason:
        return Decision(download=get, install=False, reboot=RebootPlan(RebootWhen.NONE), reason=reason,
                        download_only=download_only)
    return Decision(download=True, install=True, reboot=reboot_plan(reboot, window, now), reason="")


def reboot_plan(policy: RebootPolicy, window: Window | None, now: dt.datetime) -> RebootPlan:
    """When to reboot into an installed update (also for an install that finished while the agent was down)."""
    if policy is RebootPolicy.IMMEDIATE:
        return RebootPlan(RebootWhen.NOW)
    if policy is RebootPolicy.MANUAL:
        return RebootPlan(RebootWhen.MANUAL)
    if window is None:
        raise ValueError("reboot policy 'window' needs a maintenance window")
    if window.contains(now.time()):
        return RebootPlan(RebootWhen.NOW)
    return RebootPlan(RebootWhen.AT, window.next_start(now))


def poll_delay(server_sleep_s: float | None, *, default_s: float, failures: int, rand: float) -> float:
    """Seconds until the next poll.

    `server_sleep_s`: the sleep of the last good poll (None: none yet, use `default_s`). `failures`: polls
    failed in a row since (0: the last one succeeded). `rand`: a uniform draw in [0, 1), passed in so the
    rule stays deterministic under test. After a failure: 30 s, 60 s, 120 s … up to the larger of one hour
    and the regular interval, so a failing server is not hammered yet a device is back soon after an outage.
    Jitter is ±10 %; the result is never below 30 s.
    """
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand}")
    if failures < 0:
        raise ValueError(f"failures must be >= 0, got {failures}")
    regular = max(MIN_POLL_S, server_sleep_s if server_sleep_s is not None else default_s)
    # The exponent is capped: 2**failures must not overflow after days offline.
    backoff = min(MIN_POLL_S * 2.0 ** min(failures - 1, 32), max(regular, MAX_BACKOFF_S))
    base = regular if failures == 0 else backoff
    return max(MIN_POLL_S, base * (1.0 - JITTER + 2.0 * JITTER * rand))
