"""Named points where a crash test may kill this process (SIGKILL), to prove on-disk state survives.

`PITSTOP_CRASHPOINT=NAME:N` kills the process at the N-th time `hit(NAME)` runs (N from 1). Unset, a hit
costs one dictionary lookup. Tests use it to land kills inside each phase; random-time kills cover the rest.
"""

from __future__ import annotations

import os
import signal

_target: tuple[str, int] | None = None
_counts: dict[str, int] = {}


def _parse() -> tuple[str, int] | None:
    spec = os.environ.get("PITSTOP_CRASHPOINT", "")
    name, _, n = spec.rpartition(":")
    return (name, int(n)) if name and n.isdigit() else None


_target = _parse()


def hit(name: str) -> None:
    if _target is None or _target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
