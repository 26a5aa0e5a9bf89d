"""pitstop's record on the data partition: `<data_dir>/pitstop/state.json`, replaced atomically.

Together with the bootloader environment it is the device's whole update state (ota/slot_state.py);
the chunk index and manifest of each installed bundle sit beside it under `slots/<slot>/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pitstop import crashpoint
from pitstop.atomic import atomic_write
from pitstop.errors import PitstopError
from pitstop.ota.manifest import format_time
from pitstop.ota.slot_state import BootEnv, Content, Record, SlotRecord, initial_record

STATE_FORMAT = 1


class StateFileError(PitstopError):
    """pitstop's state file on the data partition cannot be read."""

    exit_code = 25


@dataclass(frozen=True)
class Versions:
    """Installed versions of one model/files target: `current` is committed, `pending` awaits commit,
    `previous` is kept for rollback. Values are directory names under the target's versions directory."""

    current: str | None = None
    previous: str | None = None
    pending: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"current": self.current, "previous": self.previous, "pending": self.pending}


@dataclass(frozen=True)
class DeviceState:
    record: Record
    time_floor: datetime | None = None
    payloads: dict[str, Versions] = field(default_factory=dict)
    pending_rootfs: bool = False   # the pending install has a rootfs (payload versions follow the boot)
    pending_bundle: dict[str, Any] | None = None  # a pending install without a rootfs: what it was

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "format": STATE_FORMAT,
            "slots": {s: {"content": v.content.value, "bundle": v.bundle} for s, v in sorted(r.slots.items())},
            "pending": r.pending,
            "activated_boot": r.activated_boot,
            "switch_from": list(r.switch_from) if r.switch_from is not None else None,
            "committed_security_version": r.committed_security_version,
            "time_floor": format_time(self.time_floor) if self.time_floor else None,
            "payloads": {t: v.to_json() for t, v in sorted(self.payloads.items())},
            "pending_rootfs": self.pending_rootfs,
            "pending_bundle": self.pending_bundle,
        }


def _opt_str(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise ValueError("expected a string or null")
    return v


def _switch_from(v: Any) -> tuple[bool, int] | None:
    if v is None:
        return None  # also a state file written before this field existed
    if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], bool) and type(v[1]) is int and v[1] >= 0):
        raise ValueError("switch_from must be [ok, tries] or null")
    return v[0], v[1]


def from_json(d: Any, slots: tuple[str, str]) -> DeviceState:
    if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
        raise ValueError(f"not a format-{STATE_FORMAT} state file")
    raw_slots = d["slots"]
    if not isinstance(raw_slots, dict) or set(raw_slots) != set(slots):
        raise ValueError(f"slots must be exactly {', '.join(slots)} (did system.toml's slot names change?)")
    recs = {s: SlotRecord(Content(v["content"]), dict(v["bundle"])) for s, v in raw_slots.items()}
    pending = _opt_str(d["pending"])
    if pending is not None and pending not in slots:
        raise ValueError(f"pending slot {pending!r} unknown")
    floor_s = _opt_str(d["time_floor"])
    floor = datetime.strptime(floor_s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) if floor_s else None
    csv = d["committed_security_version"]
    if not isinstance(csv, int) or csv < 0:
        raise ValueError("committed_security_version must be a non-negative integer")
    payloads = {str(t): Versions(_opt_str(v["current"]), _opt_str(v["previous"]), _opt_str(v["pending"]))
                for t, v in dict(d["payloads"]).items()}
    record = Record(recs, pending, _opt_str(d["activated_boot"]), csv, _switch_from(d.get("switch_from")))
    pb = d.get("pending_bundle")
    if pb is not None and not isinstance(pb, dict):
        raise ValueError("pending_bundle must be an object or null")
    return DeviceState(record, floor, payloads, bool(d["pending_rootfs"]), pb)


class StateStore:
    def __init__(self, state_dir: Path, slots: tuple[str, str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "state.json"
        self.slots = slots

    def exists(self) -> bool:
        return self.path.exists()

    def load(self, env: BootEnv) -> DeviceState:
        """The recorded state, or the factory state derived from the boot configuration if none yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return DeviceState(initial_record(env, self.slots))
        except (OSError, UnicodeDecodeError) as e:
            raise StateFileError(f"{self.path}: cannot read: {e}") from None
        try:
            return from_json(json.loads(text), self.slots)
        except (ValueError, KeyError, TypeError) as e:
            raise StateFileError(f"{self.path}: not a valid pitstop state file: {e}") from None

    def save(self, state: DeviceState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        crashpoint.hit("state-write")
        atomic_write(self.path, (json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n").encode())
        crashpoint.hit("state-write")

