"""Progress of a multi-stage build: a line per stage with its time; while an opaque stage runs (mmdebstrap,
pip, mkfs) a ticking clock on a terminal; byte bars (pitstop.progress) for stages that count bytes. Off a
terminal: plain log lines, no carriage returns."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from pitstop.progress import Progress


class Step:
    def __init__(self, stages: Stages, name: str) -> None:
        self._stages = stages
        self.name = name
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """Something worth saying about this step (a cached stage reused), printed as it happens."""
        self.notes.append(text)
        self._stages.say(f"  {self.name}: {text}")


class Stages:
    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._ticker: str | None = None  # the text of the ticking line, while one is shown
        self._bar: Progress | None = None

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    @contextmanager
    def step(self, name: str, what: str) -> Iterator[Step]:
        self.say(f"{name}: {what}")
        start = time.monotonic()
        st = Step(self, name)
        stop = threading.Event()
        ticker = None
        if self.tty:
            ticker = threading.Thread(target=self._tick, args=(name, start, stop), daemon=True)
            ticker.start()
        try:
            yield st
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            self.end_bars()
        elapsed = time.monotonic() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        self.say(f"{name}: done in {format_duration(elapsed)}")

    def _tick(self, name: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            with self._lock:
                if self._bar is None:
                    self.stream.write(f"\r\x1b[K  {name}: {format_duration(time.monotonic() - start)}")
                    self.stream.flush()

    @contextmanager
    def bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        update = self.bars(label, total)
        try:
            yield update
        finally:
            self.end_bars()

    def bars(self, label: str, total: int) -> Callable[[int], None]:
        """A `sparse.ProgressFactory`: each call starts a new bar and finishes the previous one."""
        self.end_bars()
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K")
            self._bar = Progress(f"  {label}", total, stream=self.stream, enabled=self.enabled)
            return self._locked_update(self._bar)

    def _locked_update(self, bar: Progress) -> Callable[[int], None]:
        def update(n: int) -> None:
            with self._lock:
                bar.update(n)

        return update

    def end_bars(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.finish()
                self._bar = None


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"
