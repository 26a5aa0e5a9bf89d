"""Progress for long operations: a bar on a terminal, a few plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("pitstop.progress")


def human_size(n: float, digits: int = 1) -> str:
    """Bytes in binary units: '512 B', '1.5 MiB', '1.0 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts bytes done out of `total`; draws at most ~10 times a second, logs every 10% off a terminal."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = enabled and self._stream.isatty()
        self._enabled = enabled
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, n: int) -> None:
        self.done += n
        if not self._enabled:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw(now)
        elif self.total:
            decile = min(10, self.done * 10 // self.total)
            if decile != self._last_decile and decile < 10:
                self._last_decile = decile
                log.info("%s: %d%% (%s of %s)", self.label, decile * 10, human_size(self.done), human_size(self.total))

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 30
        frac = min(frac, 1.0)  # an estimated total may be passed
        filled = int(width * frac)
        rate = self.done / max(now - self._start, 1e-6)
        self._stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{human_size(self.done)}/{human_size(self.total)} {human_size(rate)}/s "
        )
        self._stream.flush()

    def finish(self) -> None:
        if not self._enabled:
            return
        elapsed = time.monotonic() - self._start
        if self._tty:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
        else:
            log.info("%s: done, %s in %.1f s", self.label, human_size(self.done), elapsed)
