"""The update in progress, kept on the data partition so that it outlives reboots, crashes and power cuts.

One JSON file, `<state_dir>/update.json`, replaced atomically (pitstop.atomic) at each stage. It says where
the update came from (a DDI action or a local bundle), what it installs, each loop's throughput before it
(the health gate's baseline), how far it got, and the result still to be reported upstream. The agent reads
it at start and carries on from there (docs/update-agent.md, "Across reboots").
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from pitstop.atomic import atomic_write, fsync_dir
from pitstop.daemon.errors import DaemonError

log = logging.getLogger(__name__)

RECORD_FILE = "update.json"
OUTBOX_FILE = "update-result.json"  # a finished DDI update whose result the server has not got yet
FORMAT = 1


class Origin(StrEnum):
    DDI = "ddi"  # a deployment action of the update server
    LOCAL = "local"  # Install() over D-Bus: a path or URL given on the device


class Stage(StrEnum):
    INSTALLING = "installing"  # written before the first byte goes to the slot
    INSTALLED = "installed"  # written and activated; a rootfs update waits for its reboot
    VERIFYING = "verifying"  # the health gate runs (after the reboot, or at once for models/files)
    ROLLING_BACK = "rolling-back"  # the gate failed: marked bad, rebooting into the previous slot
    DONE = "done"  # finished; only the report upstream may be left


class Kind(StrEnum):
    ROOTFS = "rootfs"  # a new slot: reboot, then the gate
    PAYLOADS = "payloads"  # models/files only: loops restart on the new version, then the gate
    UNKNOWN = "unknown"  # not known yet (the install has not finished)


@dataclass(frozen=True)
class UpdateRecord:
    origin: Origin
    source: str  # what was installed from (URL without credentials, or a path)
    action_id: str | None = None  # the DDI action, for feedback
    stage: Stage = Stage.INSTALLING
    kind: Kind = Kind.UNKNOWN
    version: str = ""  # the bundle's version, once known
    target_slot: str | None = None  # the slot written (rootfs updates)
    from_slot: str | None = None  # the slot that ran when the update began
    baseline: dict[str, float] = field(default_factory=dict)  # loop -> results/s before the update
    gate_boot_id: str | None = None  # the boot the gate's clock belongs to
    gate_started: float | None = None  # CLOCK_BOOTTIME seconds when the gate began in that boot
    success: bool | None = None  # DONE: the outcome
    message: str = ""  # DONE: one line for the report; ROLLING_BACK: why
    details: tuple[str, ...] = ()  # the gate's checks, for the report
    reported: bool = False  # DONE: the server has the final feedback (always true for LOCAL)
    attempts: int = 1  # installs begun for this action (a crash or a power cut starts one over)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["details"] = list(self.details)
        return {"format": FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UpdateRecord:
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
        return cls(
            origin=Origin(d["origin"]),
            source=str(d["source"]),
            action_id=None if d["action_id"] is None else str(d["action_id"]),
            stage=Stage(d["stage"]),
            kind=Kind(d["kind"]),
            version=str(d["version"]),
            target_slot=d["target_slot"],
            from_slot=d["from_slot"],
            baseline={str(k): float(v) for k, v in dict(d["baseline"]).items()},
            gate_boot_id=d["gate_boot_id"],
            gate_started=None if d["gate_started"] is None else float(d["gate_started"]),
            success=d["success"],
            message=str(d["message"]),
            details=tuple(str(x) for x in d["details"]),
            reported=bool(d["reported"]),
            attempts=int(d.get("attempts", 1)),
        )

    def done(self, success: bool, message: str, details: tuple[str, ...] = ()) -> UpdateRecord:
        return replace(
            self,
            stage=Stage.DONE,
            success=success,
            message=message,
            details=details,
            reported=self.origin is Origin.LOCAL,
        )


class RecordStore:
    """Load, save and clear the record; every change is atomic and durable before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> UpdateRecord | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DaemonError(f"update record {self.path}: {e.strerror}") from None
        try:
            return UpdateRecord.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            # Unreadable means not written by this code (atomic replace never leaves half a file). Keep it
            # aside for a person and go on without it: the slot state machine still protects the device.
            aside = self.path.with_name(self.path.name + ".unreadable")
            log.error("update record %s is unreadable (%s); moved to %s", self.path, e, aside.name)
            self.path.replace(aside)
            fsync_dir(self.path.parent)
            return None

    def save(self, rec: UpdateRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(rec.to_json(), indent=1).encode() + b"\n", 0o600)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.path.parent)
