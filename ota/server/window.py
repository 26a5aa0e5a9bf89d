"""A deployment's maintenance window: a daily `HH:MM-HH:MM` span in a time zone. Pure code, no I/O.

hawkBit schedules windows with a cron expression, a duration and a time zone, and tells the device only
whether the window is `available` now; the device installs when it is. A daily span covers what sites ask
for (nights, a weekend shift is two rollouts) and reads at a glance: `22:00-04:00@Europe/Berlin`. The start
is inside, the end outside; a span whose end is before its start runs over midnight.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pitstop.ota.server.errors import DeployError

_SPAN = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)(?:@(.+))?")


@dataclass(frozen=True)
class Window:
    start_min: int  # minutes after local midnight
    end_min: int
    zone: str = "UTC"

    @classmethod
    def parse(cls, text: str) -> Window:
        m = _SPAN.fullmatch(text.strip())
        if m is None:
            raise DeployError(
                f"maintenance window {text!r}: expected HH:MM-HH:MM, optionally @ZONE (22:00-04:00@Europe/Berlin)"
            )
        start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
        if start == end:
            raise DeployError(f"maintenance window {text!r}: start and end are the same")
        zone = m[5] or "UTC"
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise DeployError(f"maintenance window {text!r}: unknown time zone {zone!r}") from None
        return cls(start, end, zone)

    def is_open(self, now: dt.datetime) -> bool:
        """Whether `now` (timezone-aware) lies in the window, on the window's own wall clock."""
        if now.tzinfo is None:
            raise ValueError("is_open needs a timezone-aware time")
        local = now.astimezone(ZoneInfo(self.zone))
        minute = local.hour * 60 + local.minute
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min

    def __str__(self) -> str:
        def hm(m: int) -> str:
            return f"{m // 60:02d}:{m % 60:02d}"

        return f"{hm(self.start_min)}-{hm(self.end_min)}" + (f"@{self.zone}" if self.zone != "UTC" else "")
