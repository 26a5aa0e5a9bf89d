"""When a supervised loop runs again: its states and the restart back-off, as pure code with no I/O.

The supervisor feeds events in (start asked, child up, child exited, stop asked, back-off over) with the
time they happened, and does what the answer says. Nothing here reads a clock or sleeps, so every path
is tested directly.

Back-off: after a crash the delay starts at `min_s` and doubles up to `max_s`; a run that lasted at
least `stable_s` counts as healthy and resets it. A model or configuration error will not go away in a
second, so it waits the longest delay at once, but is still retried: an update may bring the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

STABLE_S = 60.0  # a run this long resets the back-off


class LoopState(StrEnum):
    STARTING = "starting"  # child spawned, model loading
    RUNNING = "running"  # the child reported its loop up
    BACKOFF = "backoff"  # crashed; waiting to restart
    STOPPED = "stopped"  # not wanted (never started, stopped, or its source ended)
    FAILED = "failed"  # model or configuration error; retried after the longest delay


class ExitKind(StrEnum):
    FINISHED = "finished"  # the source ended (exit 0): nothing to restart
    CONFIG = "config"  # the model or configuration cannot work as given
    CRASHED = "crashed"  # anything else: the loop failed, a signal, an unexpected status


class PolicyError(Exception):
    """An event that cannot happen in the current state: a bug in the caller, never a runtime condition."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after an exit: restart after `delay_s`, or (None) leave it stopped."""

    state: LoopState
    delay_s: float | None


class RestartPolicy:
    """The state and back-off of one loop."""

    def __init__(self, min_s: float, max_s: float, stable_s: float = STABLE_S) -> None:
        if min_s <= 0 or max_s < min_s or stable_s <= 0:
            raise ValueError(f"back-off needs 0 < min <= max and stable > 0 (got {min_s}, {max_s}, {stable_s})")
        self.min_s = min_s
        self.max_s = max_s
        self.stable_s = stable_s
        self.state = LoopState.STOPPED
        self.restarts = 0  # automatic restarts over the policy's life; starts asked for do not count
        self.failures_in_row = 0  # exits without a stable run in between
        self._next_delay = min_s
        self._spawned_at: float | None = None
        self._wanted = False

    @property
    def wanted(self) -> bool:
        """Whether the loop should be running (start asked for and not stopped since)."""
        return self._wanted

    @property
    def next_delay_s(self) -> float:
        """The delay the next crash would wait (for status displays)."""
        return self._next_delay

    def start(self, now: float) -> None:
        """A start asked for (daemon start, D-Bus): a fresh back-off, the child spawns now."""
        if self.state in (LoopState.STARTING, LoopState.RUNNING):
            raise PolicyError(f"start while {self.state}")
        self._wanted = True
        self._next_delay = self.min_s
        self.failures_in_row = 0
        self._spawn(now)

    def running(self, now: float) -> None:
        """The child reported its loop up."""
        if self.state is not LoopState.STARTING:
            raise PolicyError(f"running while {self.state}")
        self.state = LoopState.RUNNING

    def exited(self, now: float, kind: ExitKind) -> Decision:
        """The child is gone; say whether and when it runs again."""
        if self.state not in (LoopState.STARTING, LoopState.RUNNING):
            raise PolicyError(f"exit while {self.state}")
        ran = now - self._spawned_at if self._spawned_at is not None else 0.0
        self._spawned_at = None
        if ran >= self.stable_s:
            self._next_delay = self.min_s
            self.failures_in_row = 0
        if not self._wanted or kind is ExitKind.FINISHED:
            self._wanted = False
            self.state = LoopState.STOPPED
            return Decision(self.state, None)
        self.failures_in_row += 1
        if kind is ExitKind.CONFIG:
            delay = self.max_s
            self.state = LoopState.FAILED
        else:
            delay = min(self.max_s, max(self.min_s, self._next_delay))  # within bounds changed since
            self.state = LoopState.BACKOFF
        self._next_delay = min(self.max_s, delay * 2)
        return Decision(self.state, delay)

    def backoff_over(self, now: float) -> None:
        """The delay has passed: the child spawns again."""
        if self.state not in (LoopState.BACKOFF, LoopState.FAILED):
            raise PolicyError(f"restart while {self.state}")
        self.restarts += 1
        self._spawn(now)

    def stop(self) -> LoopState:
        """A stop asked for. Waiting loops stop at once; a live child stays STARTING/RUNNING until its exit."""
        self._wanted = False
        if self.state in (LoopState.BACKOFF, LoopState.FAILED):
            self.state = LoopState.STOPPED
        return self.state

    def _spawn(self, now: float) -> None:
        self.state = LoopState.STARTING
        self._spawned_at = now
