"""How the management commands show devices, bundles and rollouts: short text for tables, dicts for --json."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from pitstop.ota.server.records import Action, Device, Distribution, Rollout, StatusEntry
from pitstop.progress import human_size


def ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0, int(now - t))
    if s < 90:
        return f"{s}s ago"
    if s < 90 * 60:
        return f"{s // 60}m ago"
    if s < 36 * 3600:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pct(v: object) -> str:
    return f"{float(v) * 100:.0f}%" if isinstance(v, int | float) else "?"


def health_text(h: dict[str, Any] | None, t: float | None, now: float, stale_s: float = 600) -> str:
    """'cpu 12% mem 40% disk 55% 61°C det 29.5/s'; '-' without reports; '(… ago)' when old."""
    if not h:
        return "-"
    parts = []
    if "cpu" in h:
        parts.append(f"cpu {_pct(h['cpu'])}")
    if "memory" in h:
        parts.append(f"mem {_pct(h['memory'])}")
    disks = h.get("disk")
    if isinstance(disks, dict) and disks:
        parts.append(f"disk {_pct(max(float(v) for v in disks.values()))}")
    if "temperature_max" in h:
        parts.append(f"{h['temperature_max']:.0f}°C")
    if "gpu" in h:
        parts.append(f"gpu {_pct(h['gpu'])}")
    loops = h.get("loops")
    if isinstance(loops, dict):
        parts += [f"{name} {fps:.1f}/s" for name, fps in sorted(loops.items())]
    text = " ".join(parts) or "reporting"
    if t is not None and now - t > stale_s:
        text += f" ({ago(t, now)})"
    return text


def deployment_text(a: Action | None, versions: dict[int, str]) -> str:
    if a is None:
        return "-"
    where = f"a{a.id}" + (f" r{a.rollout_id}" if a.rollout_id is not None else "")
    version = versions.get(a.distribution_id, "?")
    if a.status.open:
        text = f"{where} {version} {a.status.value}"
        if a.last_execution:
            text += f": {a.last_execution}"
            if a.progress is not None and a.progress[1]:
                text += f" {a.progress[0] * 100 // a.progress[1]}%"
        return text
    return f"{where} {version} {a.status.value}"


def device_json(d: Device, a: Action | None, versions: dict[int, str], now: float) -> dict[str, Any]:
    return {
        "id": d.id,
        "group": d.group,
        "version": d.version,
        "booted_slot": d.booted_slot,
        "last_seen": iso(d.last_seen),
        "last_seen_s_ago": None if d.last_seen is None else round(now - d.last_seen, 1),
        "address": d.last_address,
        "registered_by": d.registered_by,
        "has_token": d.token_hash is not None,
        "attributes": d.attributes,
        "health": d.health,
        "health_time": iso(d.health_time),
        "deployment": None if a is None else action_json(a, versions),
    }


def action_json(a: Action, versions: dict[int, str]) -> dict[str, Any]:
    return {
        "action": a.id,
        "rollout": a.rollout_id,
        "wave": a.wave + 1 if a.rollout_id is not None else None,
        "bundle": a.distribution_id,
        "version": versions.get(a.distribution_id),
        "status": a.status.value,
        "last_execution": a.last_execution,
        "last_message": a.last_message,
        "progress": list(a.progress) if a.progress else None,
        "updated": iso(a.updated),
        "finished": iso(a.finished),
    }


def history_json(e: StatusEntry) -> dict[str, Any]:
    return {
        "time": iso(e.time),
        "channel": e.channel,
        "execution": e.execution,
        "finished": e.finished,
        "code": e.code,
        "progress": list(e.progress) if e.progress else None,
        "details": e.details,
    }


def bundle_json(d: Distribution) -> dict[str, Any]:
    return {
        "id": d.id,
        "name": d.name,
        "version": d.version,
        "security_version": d.security_version,
        "compatible": d.compatible,
        "filename": d.filename,
        "size": d.size,
        "sha256": d.sha256,
        "signer": d.signer,
        "verified": d.verified,
        "uploaded": iso(d.created),
    }


def bundle_row(d: Distribution) -> list[str]:
    return [
        str(d.id),
        d.name,
        d.version,
        str(d.security_version),
        human_size(d.size),
        "verified" if d.verified else "not verified",
        d.signer or "unsigned",
    ]


def rollout_state(r: Rollout) -> str:
    if r.status.value == "running":
        return f"running, wave {r.current_wave + 1}/{len(r.wave_sizes)}"
    return r.status.value


def rollout_json(r: Rollout, d: Distribution, totals: dict[str, int]) -> dict[str, Any]:
    return {
        "id": f"r{r.id}",
        "bundle": d.id,
        "name": d.name,
        "version": d.version,
        "target": r.target,
        "status": r.status.value,
        "wave": r.current_wave + 1,
        "waves": list(r.wave_sizes),
        "max_failure": r.max_failure,
        "advance_at": r.advance_at,
        "download": r.download,
        "update": r.update,
        "maintenance_window": r.window,
        "reason": r.reason,
        "actions": totals,
        "created": iso(r.created),
        "updated": iso(r.updated),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)
