"""The device registry: ids, groups, tokens, attributes (configData), what each runs, last poll and health.
Functions over an open transaction (store.py); none commits."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping
from typing import Any

from pitstop.errors import UsageError
from pitstop.ota.server.errors import ConflictError, UnknownDeviceError
from pitstop.ota.server.records import Device

# The daemon's own rule for a device id (daemon/config.py): it names the device in URLs and file names.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY = 128  # hawkBit's limits for a target attribute
MAX_ATTRIBUTE_VALUE = 128
GATEWAY_META = "gateway_token_hash"


def check_id(device_id: str, what: str = "device id") -> str:
    if not DEVICE_ID.fullmatch(device_id):
        raise UsageError(f"{what} {device_id!r}: 1-64 letters, digits, '.', '_', '-', starting with a letter or digit")
    return device_id


def add(
    conn: sqlite3.Connection,
    now: float,
    device_id: str,
    *,
    group: str | None,
    token_hash: str | None,
    registered_by: str = "operator",
) -> Device:
    check_id(device_id)
    if group is not None:
        check_id(group, "group")
    try:
        conn.execute(
            "INSERT INTO devices (id, grp, token_hash, registered_by, created) VALUES (?, ?, ?, ?, ?)",
            (device_id, group, token_hash, registered_by, now),
        )
    except sqlite3.IntegrityError:
        raise ConflictError(f"device {device_id!r} already exists") from None
    return require(conn, device_id)


def get(conn: sqlite3.Connection, device_id: str) -> Device | None:
    row = conn.execute(Device.SELECT + " WHERE id = ?", (device_id,)).fetchone()
    return None if row is None else Device.from_row(row)


def require(conn: sqlite3.Connection, device_id: str) -> Device:
    dev = get(conn, device_id)
    if dev is None:
        raise UnknownDeviceError(f"no device {device_id!r} (pitstop server device list)")
    return dev


def token_hash(conn: sqlite3.Connection, device_id: str) -> tuple[bool, str | None]:
    """(known, token hash) for the authentication of one request: one indexed lookup."""
    row = conn.execute("SELECT token_hash FROM devices WHERE id = ?", (device_id,)).fetchone()
    return (False, None) if row is None else (True, row[0])


def remove(conn: sqlite3.Connection, device_id: str) -> list[int]:
    """Delete a device with its actions and health; the ids of the rollouts it was part of (to advance)."""
    require(conn, device_id)
    rollouts = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT rollout_id FROM actions WHERE device_id = ? AND rollout_id IS NOT NULL", (device_id,)
        )
    ]
    conn.execute("DELETE FROM devices WHERE id = ?", (device_id,))
    return rollouts


def set_token(conn: sqlite3.Connection, device_id: str, token_hash: str | None) -> None:
    require(conn, device_id)
    conn.execute("UPDATE devices SET token_hash = ? WHERE id = ?", (token_hash, device_id))


def set_group(conn: sqlite3.Connection, device_id: str, group: str | None) -> None:
    require(conn, device_id)
    if group is not None:
        check_id(group, "group")
    conn.execute("UPDATE devices SET grp = ? WHERE id = ?", (group, device_id))


def request_attributes(conn: sqlite3.Connection, device_id: str) -> None:
    """Ask the device for its attributes at its next poll (the configData link)."""
    conn.execute("UPDATE devices SET want_attributes = 1 WHERE id = ?", (device_id,))


def list_devices(conn: sqlite3.Connection, group: str | None = None) -> list[Device]:
    if group is None:
        rows = conn.execute(Device.SELECT + " ORDER BY id").fetchall()
    else:
        rows = conn.execute(Device.SELECT + " WHERE grp = ? ORDER BY id", (group,)).fetchall()
    return [Device.from_row(r) for r in rows]


def ids(conn: sqlite3.Connection, group: str | None = None) -> list[str]:
    if group is None:
        return [r[0] for r in conn.execute("SELECT id FROM devices ORDER BY id")]
    return [r[0] for r in conn.execute("SELECT id FROM devices WHERE grp = ? ORDER BY id", (group,))]


def check_attributes(data: object, mode: str) -> dict[str, str]:
    """configData's `data` as hawkBit validates it: an object of string values within its size limits
    (`remove` takes the keys only)."""
    if not isinstance(data, dict) or (not data and mode != "replace"):
        raise ValueError("data must be a non-empty object of attributes")
    if len(data) > MAX_ATTRIBUTES:
        raise ValueError(f"more than {MAX_ATTRIBUTES} attributes")
    out: dict[str, str] = {}
    for k, v in data.items():
        if not k or len(k) > MAX_ATTRIBUTE_KEY:
            raise ValueError(f"attribute name {k[:40]!r}: 1 to {MAX_ATTRIBUTE_KEY} characters")
        if mode != "remove" and (not isinstance(v, str) or len(v) > MAX_ATTRIBUTE_VALUE):
            raise ValueError(f"attribute {k!r}: the value must be a string of at most {MAX_ATTRIBUTE_VALUE} characters")
        out[k] = v if isinstance(v, str) else ""
    return out


def put_attributes(conn: sqlite3.Connection, device_id: str, data: Mapping[str, str], mode: str) -> None:
    """Merge, replace or remove attributes (PUT configData); what the device runs is taken from the ones the
    pitstop daemon sends (`bundle_version`, `booted_slot`)."""
    dev = require(conn, device_id)
    attrs = dict(dev.attributes)
    if mode == "replace":
        attrs = dict(data)
    elif mode == "remove":
        for k in data:
            attrs.pop(k, None)
    else:
        attrs.update(data)
    if len(attrs) > MAX_ATTRIBUTES:
        raise ValueError(f"more than {MAX_ATTRIBUTES} attributes in all")
    version = _known(data.get("bundle_version")) if mode != "remove" else None
    slot = _known(data.get("booted_slot")) if mode != "remove" else None
    conn.execute(
        "UPDATE devices SET attributes = ?, want_attributes = 0, version = coalesce(?, version), "
        "booted_slot = coalesce(?, booted_slot) WHERE id = ?",
        (json.dumps(attrs, sort_keys=True), version, slot, device_id),
    )


def _known(value: str | None) -> str | None:
    return None if value in (None, "", "unknown") else value


def gateway_token_hash(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (GATEWAY_META,)).fetchone()
    return None if row is None else str(row[0])


# -- health ---------------------------------------------------------------------------------------------------


def record_health(
    conn: sqlite3.Connection,
    now: float,
    device_id: str,
    summary: Mapping[str, Any],
    *,
    sample_time: float,
    spool: str | None,
    seq: int | None,
    keep: int,
) -> bool:
    """Keep a health summary as the device's latest and in its history (the newest `keep`). False, and
    nothing stored, when it is a report already received (same spool, seq not above the last one)."""
    row = conn.execute("SELECT health_spool, health_seq FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is None:
        return False
    if spool is not None and seq is not None and row[0] == spool and row[1] is not None and seq <= row[1]:
        return False
    text = json.dumps(summary, sort_keys=True)
    slot = summary.get("slot")
    version = summary.get("version")
    conn.execute(
        "UPDATE devices SET health = ?, health_time = ?, health_spool = coalesce(?, health_spool), "
        "health_seq = coalesce(?, health_seq), booted_slot = coalesce(?, booted_slot), "
        "version = coalesce(?, version) WHERE id = ?",
        (
            text,
            now,  # when it arrived: a device that booted without a clock may stamp its samples 1970
            spool,
            seq,
            slot if isinstance(slot, str) else None,
            version if isinstance(version, str) else None,
            device_id,
        ),
    )
    cur = conn.execute(
        "INSERT INTO health (device_id, time, received, summary) VALUES (?, ?, ?, ?)",
        (device_id, sample_time, now, text),
    )
    if cur.lastrowid is not None and cur.lastrowid % 16 == 0:
        # Trimmed every few reports: the history is a bounded ring, not an exact count.
        conn.execute(
            "DELETE FROM health WHERE device_id = ? AND id <= (SELECT id FROM health WHERE device_id = ? "
            "ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (device_id, device_id, keep),
        )
    return True


def health_history(conn: sqlite3.Connection, device_id: str, limit: int) -> list[tuple[float, dict[str, Any]]]:
    rows = conn.execute(
        "SELECT time, summary FROM health WHERE device_id = ? ORDER BY id DESC LIMIT ?", (device_id, limit)
    ).fetchall()
    return [(r[0], json.loads(r[1])) for r in reversed(rows)]
