"""Rollouts in waves: which devices go in which wave, and when the next wave starts or the rollout stops.
Pure code, no I/O: the store calls it inside the transaction that changed an action.

A rollout's targets are put in a seeded pseudo-random order (so that a wave is not "every device whose name
starts with lab-") and cut into waves by cumulative percentages, optionally after a canary wave of a fixed
size: `--first-wave 2 --waves 10,50,100` over 40 devices gives waves of 2, 2, 16 and 20 devices.

Only the current wave is judged. Its actions end as success, failure or canceled (by an operator, or by the
device before it began); canceled ones are no verdict on the bundle and count for nothing. The next wave
starts once the finished share (success + failure over those not canceled) reaches `advance_at` (1.0: every
device finished); the rollout stops instead when the failed share of the finished ones is above
`max_failure`. It also stops early, before the wave is through, once so many devices have failed that the
share is certain to end above the threshold whatever the others report.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pitstop.ota.server.errors import DeployError

_EPS = 1e-9


def parse_waves(text: str) -> tuple[float, ...]:
    """'10,50,100' → (10.0, 50.0, 100.0): cumulative percentages, strictly increasing, ending at 100."""
    parts = [p.strip().removesuffix("%") for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise DeployError(f"--waves {text!r}: expected cumulative percentages such as 10,50,100") from None
    check_waves(values)
    return values


def check_waves(percents: Sequence[float]) -> None:
    if not percents:
        raise DeployError("a rollout needs at least one wave")
    last = 0.0
    for p in percents:
        if not math.isfinite(p) or not 0 < p <= 100:
            raise DeployError(f"wave {p:g}%: each wave is a cumulative percentage in 0 < p <= 100")
        if p <= last:
            raise DeployError(f"waves {', '.join(f'{v:g}' for v in percents)}: percentages must increase")
        last = p
    if last != 100:
        raise DeployError(f"waves {', '.join(f'{v:g}' for v in percents)}: the last wave must reach 100 (%)")


def parse_fraction(text: str, what: str) -> float:
    """'0.2' or '20%' → 0.2, within 0..1."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise DeployError(f"{what} {text!r}: expected a fraction (0.2) or a percentage (20%)") from None
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise DeployError(f"{what} {text!r}: must lie between 0 and 1 (0% and 100%)")
    return value


def order(device_ids: Iterable[str], seed: str) -> list[str]:
    """The devices in the rollout's pseudo-random order: the same seed gives the same order."""
    return sorted(device_ids, key=lambda d: (hashlib.sha256(f"{seed}\0{d}".encode()).digest(), d))


def take_percent(ordered: Sequence[str], percent: float) -> list[str]:
    """The first `percent` % of `ordered` (rounded up, so any percentage above 0 takes at least one device)."""
    if not math.isfinite(percent) or not 0 < percent <= 100:
        raise DeployError(f"--percent {percent:g}: must lie in 0 < p <= 100")
    return list(ordered[: math.ceil(len(ordered) * percent / 100 - _EPS)])


def wave_sizes(n: int, percents: Sequence[float], first: int | None = None) -> list[int]:
    """Sizes of the waves for `n` targets; waves that would be empty are left out."""
    check_waves(percents)
    if first is not None and first < 1:
        raise DeployError(f"--first-wave {first}: must be at least 1 device")
    cums = [min(first, n)] if first is not None else []
    cums += [math.ceil(n * p / 100 - _EPS) for p in percents]
    sizes, done = [], 0
    for c in cums:
        if c > done:
            sizes.append(c - done)
            done = c
    return sizes


def split(ordered: Sequence[str], sizes: Sequence[int]) -> list[list[str]]:
    if sum(sizes) != len(ordered):
        raise ValueError(f"wave sizes {list(sizes)} do not add up to {len(ordered)} devices")
    out, at = [], 0
    for s in sizes:
        out.append(list(ordered[at : at + s]))
        at += s
    return out


@dataclass(frozen=True)
class WaveCounts:
    """A wave's actions by outcome; those neither succeeded, failed nor canceled are still open."""

    total: int
    success: int = 0
    failure: int = 0
    canceled: int = 0

    def __post_init__(self) -> None:
        if min(self.total, self.success, self.failure, self.canceled) < 0 or self.open < 0:
            raise ValueError(f"inconsistent wave counts {self}")

    @property
    def finished(self) -> int:
        return self.success + self.failure

    @property
    def open(self) -> int:
        return self.total - self.success - self.failure - self.canceled

    @property
    def decided(self) -> int:
        """Actions that count towards the verdict: all but the canceled ones."""
        return self.total - self.canceled


class Verdict(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"
    STOP = "stop"


def judge(c: WaveCounts, max_failure: float, advance_at: float = 1.0, *, check: bool = True) -> tuple[Verdict, str]:
    """The verdict on one wave and why. `check` False: failures do not stop it (an operator resumed it)."""
    if check and c.decided and c.failure > max_failure * c.decided + _EPS:
        return Verdict.STOP, (
            f"{c.failure} of {c.decided} devices failed: above the {max_failure:.0%} allowed, whatever the "
            f"{c.open} still open report"
            if c.open
            else f"{c.failure} of {c.finished} devices failed, above the {max_failure:.0%} allowed"
        )
    if c.open and c.finished < advance_at * c.decided - _EPS:
        return Verdict.WAIT, f"{c.finished} of {c.decided} finished"
    if check and c.finished and c.failure > max_failure * c.finished + _EPS:
        return Verdict.STOP, f"{c.failure} of {c.finished} finished devices failed, above the {max_failure:.0%} allowed"
    return Verdict.ADVANCE, f"{c.finished} of {c.decided} finished, {c.failure} failed"


class StepKind(StrEnum):
    WAIT = "wait"  # the current wave is not through yet
    START = "start"  # release wave `wave`
    STOP = "stop"  # the failure threshold was passed in wave `wave`: assign no one else
    FINISH = "finish"  # every action of every wave has ended


@dataclass(frozen=True)
class Step:
    kind: StepKind
    wave: int
    reason: str = ""


def next_step(
    waves: Sequence[WaveCounts], current: int, max_failure: float, advance_at: float = 1.0, *, checked_from: int = 0
) -> Step:
    """What a running rollout does next, its waves up to `current` released. Failures in waves before
    `checked_from` (resumed by an operator) no longer stop it."""
    if not 0 <= current < len(waves):
        raise ValueError(f"current wave {current} outside 0..{len(waves) - 1}")
    verdict, reason = judge(waves[current], max_failure, advance_at, check=current >= checked_from)
    if verdict is Verdict.STOP:
        return Step(StepKind.STOP, current, reason)
    if verdict is Verdict.ADVANCE and current + 1 < len(waves):
        return Step(StepKind.START, current + 1, reason)
    if all(w.open == 0 for w in waves):
        return Step(StepKind.FINISH, current, reason)
    return Step(StepKind.WAIT, current, reason)
