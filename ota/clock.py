"""What a device believes about time, for certificate checks. Its own module so that commands which only read
the system configuration (`pitstop mark-good` at every boot) do not load the X.509 stack."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

# The earliest time any pitstop release can believe it is: the date this version was released.
# A device without a real-time clock that boots in 1970 uses at least this as "now".
RELEASE_TIME_FLOOR = datetime(2026, 11, 23, tzinfo=UTC)


class ClockPolicy(enum.Enum):
    SYSTEM = "system"
    FLOOR = "floor"
    NONE = "none"


@dataclass(frozen=True)
class Clock:
    """What the device believes about time: its clock reading and the floor it knows time is past."""

    policy: ClockPolicy
    now: datetime
    floor: datetime = RELEASE_TIME_FLOOR

    @property
    def effective_now(self) -> datetime:
        return max(self.now, self.floor)
