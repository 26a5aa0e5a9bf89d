"""Per-device timelines: what the rig did to a device and what the device said, on one clock.

Every time is seconds since the run started (monotonic, so a clock step on the rig host cannot reorder events),
with the wall-clock time kept beside it for matching against logs elsewhere (the update server, the device's
journal). Events come from three sources: the rig (power on/cut, network down/up, flash), the serial console
(markers the rig recognises: GRUB's slot choice, `PITSTOP-READY`, `PITSTOP-BOOT-FAILED`, a kernel panic) and the
scenario itself (`target.timeline.event("install started")`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pitstop.hil.console import Console, Line


@dataclass(frozen=True)
class Clock:
    """The run's time origin. `now()` is seconds since it; `wall(t)` the wall-clock time of run time `t`."""

    mono0: float = field(default_factory=time.monotonic)
    wall0: float = field(default_factory=time.time)

    def now(self) -> float:
        return time.monotonic() - self.mono0

    def wall(self, t: float) -> float:
        return self.wall0 + t

    def at(self, monotonic: float) -> float:
        """Run time of a `time.monotonic()` reading."""
        return monotonic - self.mono0


RIG = "rig"
CONSOLE = "console"
SCENARIO = "scenario"


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the run started
    wall: float  # Unix time
    kind: str  # power-on, power-cut, grub, ready, ... (a short identifier; the report groups by it)
    text: str  # for people
    source: str  # RIG, CONSOLE or SCENARIO
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "wall": round(self.wall, 3),
            "kind": self.kind,
            "text": self.text,
            "source": self.source,
            "data": dict(self.data),
        }


@dataclass(frozen=True)
class Marker:
    """A console line the rig recognises: `pattern` searched in each line, `text` formatted with its groups."""

    kind: str
    pattern: re.Pattern[str]
    text: str

    def event_text(self, m: re.Match[str]) -> str:
        return self.text.format(*m.groups(), line=m.string.strip())


def _marker(kind: str, pattern: str, text: str) -> Marker:
    return Marker(kind, re.compile(pattern), text)


# The first one that matches a line wins. GRUB's lines come from ota/grub/grub.cfg, READY from the daemon's
# unit, BOOT-FAILED from a test rootfs whose init exits (tests/vm/initramfs.py).
MARKERS: tuple[Marker, ...] = (
    _marker("grub", r"pitstop-grub: booting slot (\w+)", "GRUB: booting slot {0}"),
    _marker("grub-last-resort", r"pitstop-grub: no slot has tries left", "GRUB: no slot has tries left"),
    _marker("kernel", r"Linux version (\S+)", "kernel {0} starting"),
    _marker("ready", r"PITSTOP-READY slot=(\w+)", "PITSTOP-READY slot={0}"),
    _marker("boot-failed", r"PITSTOP-BOOT-FAILED slot=(\w+)", "PITSTOP-BOOT-FAILED slot={0}"),
    _marker("panic", r"Kernel panic - not syncing", "kernel panic: {line}"),
    _marker("reboot", r"reboot: Restarting system", "kernel: restarting"),
    _marker("poweroff", r"reboot: Power down", "kernel: power down"),
)


class Timeline:
    """The ordered events of one device. Thread-safe: the console's reader thread adds markers while the
    scenario adds its own."""

    def __init__(self, device: str, clock: Clock | None = None) -> None:
        self.device = device
        self.clock = clock or Clock()
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []

    def event(self, kind: str, text: str = "", *, source: str = SCENARIO, t: float | None = None, **data: Any) -> Event:
        """Record an event now (or at run time `t`). Scenarios use the default source."""
        at = self.clock.now() if t is None else t
        ev = Event(at, self.clock.wall(at), kind, text or kind, source, data)
        with self._lock:
            # Console lines are stamped when read, rig events when done: keep the list ordered all the same.
            i = len(self._events)
            while i > 0 and self._events[i - 1].t > at:
                i -= 1
            self._events.insert(i, ev)
            listeners = list(self._listeners)
        for fn in listeners:
            fn(ev)
        return ev

    def rig(self, kind: str, text: str = "", **data: Any) -> Event:
        return self.event(kind, text, source=RIG, **data)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def of(self, kind: str, *, after: float = float("-inf")) -> list[Event]:
        return [e for e in self.events if e.kind == kind and e.t > after]

    def first(self, kind: str, *, after: float = float("-inf")) -> Event | None:
        found = self.of(kind, after=after)
        return found[0] if found else None

    def last(self, kind: str) -> Event | None:
        found = self.of(kind)
        return found[-1] if found else None

    def watch(self, console: Console, markers: Iterable[Marker] = MARKERS) -> None:
        """Turn the console's recognised lines into events, stamped with the line's time."""
        table = tuple(markers)

        def on_line(line: Line) -> None:
            for mk in table:
                m = mk.pattern.search(line.text)
                if m is not None:
                    self.event(mk.kind, mk.event_text(m), source=CONSOLE, t=line.t, line=line.text.strip())
                    return

        console.subscribe(on_line)

    def as_json(self) -> list[dict[str, Any]]:
        return [e.as_json() for e in self.events]
