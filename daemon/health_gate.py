"""The health gate an update passes before it is committed; pure, no clock or systemd read here.

After booting a new slot (or switching a model/files payload) the agent feeds the gate, every few seconds, the
state of the required systemd units and each loop's figures. The gate passes once every check has held for
`hold_s` without a break; it fails when the checks do not hold by `deadline_s`, or at once when something
has failed for good (a required unit in systemd's "failed" state). docs/update-agent.md describes the rules.

Which loops are gated: each loop that was producing results before the update (it has a baseline) and is
still configured. Its throughput now, over the last `hold_s` of its run (or the run so far, when shorter), must
be at least `fraction` times its baseline. A configured, enabled loop
without a baseline (new with this update, or stopped before it) must run and produce results, at any rate:
there is nothing to compare it with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Verdict(StrEnum):
    WAIT = "wait"
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"


@dataclass(frozen=True)
class GatePolicy:
    required_units: tuple[str, ...] = ()
    fraction: float = 0.8
    deadline_s: float = 300.0
    hold_s: float = 15.0


@dataclass(frozen=True)
class LoopReading:
    """One loop as the supervisor reports it now."""

    state: str  # the supervisor's LoopState value: "running", "backoff", "failed", …
    frames_out: int = 0  # results delivered in the current run
    elapsed_s: float = 0.0  # the run's own clock (the child's), for rates between two readings
    throughput_fps: float = 0.0  # the run's average, used until a second reading gives a recent rate
    cause: str = ""  # why the last run ended, if it did


@dataclass(frozen=True)
class Result:
    verdict: Verdict
    reason: str  # one line: what is missing, or what passed
    details: tuple[str, ...] = ()  # one line per check, for the server's action history
    rates: Mapping[str, float] = field(default_factory=dict)  # each gated loop's recent rate


def recent_rate(prev: LoopReading | None, cur: LoopReading) -> float:
    """Results per second between two readings of the same run; the run's average without a usable earlier one."""
    if prev is not None and cur.elapsed_s > prev.elapsed_s and cur.frames_out >= prev.frames_out:
        return (cur.frames_out - prev.frames_out) / (cur.elapsed_s - prev.elapsed_s)
    return cur.throughput_fps


def window_anchor(readings: list[LoopReading], window_s: float) -> LoopReading | None:
    """The reading to measure the latest one's rate from: the newest at least `window_s` older than it, else the
    oldest of the run. A window of several figures keeps a slow loop's rate from swinging with the one result
    more or less that falls into a single interval between figures (at 1/s, 4 or 6 in 5 s: ±20%)."""
    if len(readings) < 2:
        return None
    cur = readings[-1]
    older = [r for r in readings[:-1] if r.elapsed_s <= cur.elapsed_s - window_s]
    return older[-1] if older else readings[0]


class Gate:
    """The gate for one update. `step` with each new reading; it remembers since when all checks held."""

    def __init__(self, policy: GatePolicy, baseline: Mapping[str, float], loops: tuple[str, ...]) -> None:
        """`baseline`: each loop's results per second before the update; `loops`: the enabled loops configured now."""
        self.policy = policy
        self.baseline = {k: v for k, v in baseline.items() if v > 0}
        self.loops = loops
        self._held_since: float | None = None
        self._runs: dict[str, list[LoopReading]] = {}  # each loop's readings in its current run, within the window

    def step(self, elapsed_s: float, units: Mapping[str, str], loops: Mapping[str, LoopReading]) -> Result:
        """`elapsed_s`: seconds since the gate started; `units`: ActiveState of each required unit."""
        p = self.policy
        ok: list[str] = []
        unmet: list[str] = []
        fatal: list[str] = []
        for unit in p.required_units:
            state = units.get(unit, "unknown")
            line = f"unit {unit} is {state}"
            (ok if state == "active" else fatal if state == "failed" else unmet).append(line)
        rates: dict[str, float] = {}
        for name in self.loops:
            cur = loops.get(name)
            if cur is None:
                unmet.append(f"loop {name} is not supervised")
                continue
            run = self._runs.setdefault(name, [])
            # A new run (restarted child) starts its counters again: no rate across runs.
            if run and (cur.elapsed_s < run[-1].elapsed_s or cur.frames_out < run[-1].frames_out):
                run.clear()
            if not run or cur != run[-1]:
                run.append(cur)
            anchor = window_anchor(run, p.hold_s)
            if anchor is not None:
                del run[: run.index(anchor)]
            rate = recent_rate(anchor, cur) if cur.state == "running" else 0.0
            rates[name] = rate
            base = self.baseline.get(name)
            if cur.state != "running":
                why = f" ({cur.cause})" if cur.cause else ""
                unmet.append(f"loop {name} is {cur.state}{why}")
            elif base is None:
                (ok if cur.frames_out > 0 else unmet).append(
                    f"loop {name}: {cur.frames_out} results, {rate:.1f}/s (no figure from before the update)"
                )
            else:
                need = p.fraction * base
                line = f"loop {name}: {rate:.1f}/s, needs {need:.1f}/s ({p.fraction:.0%} of {base:.1f}/s before)"
                (ok if rate >= need and cur.frames_out > 0 else unmet).append(line)
        for name in sorted(set(self.baseline) - set(self.loops)):
            ok.append(f"loop {name} is no longer configured (not gated)")
        details = tuple(fatal + unmet + ok)
        if fatal:
            self._held_since = None
            return Result(Verdict.FAIL, "; ".join(fatal), details, rates)
        if unmet:
            self._held_since = None
            if elapsed_s >= p.deadline_s:
                return Result(
                    Verdict.FAIL, f"not healthy after {p.deadline_s:g} s: " + "; ".join(unmet), details, rates
                )
            return Result(Verdict.WAIT, "; ".join(unmet), details, rates)
        if self._held_since is None:
            self._held_since = elapsed_s
        held = elapsed_s - self._held_since
        if held >= p.hold_s:
            return Result(Verdict.PASS, f"every check held for {held:.0f} s", details, rates)
        if elapsed_s >= p.deadline_s:
            return Result(
                Verdict.FAIL, f"the checks held only {held:.0f} s of {p.hold_s:g} s by the deadline", details, rates
            )
        return Result(Verdict.WAIT, f"every check holds; {p.hold_s - held:.0f} s to go", details, rates)
