"""Bundles, rollouts and the actions they give each device, with the device's feedback. Functions over an
open write or read transaction (store.py); none commits.

Every deployment is a rollout, even to one device: its targets in waves (rollout.py), one action per device.
Actions of waves not released yet are `scheduled` and invisible to the device. A device runs one action at a
time, the oldest open one; releasing a newer action for a device asks it to cancel the older ones it has not
begun (hawkBit's behaviour with multi-assignment off). Every change to an action's outcome re-judges its
rollout in the same transaction, so waves advance and stop exactly when the feedback that decides it is
stored, whichever process stored it.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pitstop.ota.server import rollout as waves
from pitstop.ota.server.errors import ConflictError, DeployError, NotFoundError
from pitstop.ota.server.records import (
    FINAL_STATUSES,
    Action,
    ActionStatus,
    Distribution,
    Rollout,
    RolloutStatus,
    StatusEntry,
)

_JSON_LIST = "(SELECT value FROM json_each(?))"  # `x IN` a list passed as one JSON parameter
MAX_STATUS_ENTRIES = 200  # history kept per action (hawkBit's quota is 1000; the agent sends about a dozen)


# -- distributions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewDistribution:
    name: str
    version: str
    security_version: int
    compatible: str
    filename: str
    sha256: str
    sha1: str
    md5: str
    size: int
    description: str
    signer: str | None
    verified: bool
    manifest: dict[str, Any]


def add_distribution(conn: sqlite3.Connection, now: float, d: NewDistribution) -> tuple[Distribution, bool]:
    """Record an uploaded bundle (its file already in place); (the distribution, whether it is new). The same
    bytes uploaded again give the distribution already there."""
    row = conn.execute(Distribution.SELECT + " WHERE d.sha256 = ?", (d.sha256,)).fetchone()
    if row is not None:
        old = Distribution.from_row(row)
        if d.verified and not old.verified:
            conn.execute("UPDATE distributions SET verified = 1, signer = ? WHERE id = ?", (d.signer, old.id))
            return get_distribution(conn, old.id), False
        return old, False
    conn.execute(
        "INSERT OR IGNORE INTO artifacts (sha256, size, sha1, md5, created) VALUES (?, ?, ?, ?, ?)",
        (d.sha256, d.size, d.sha1, d.md5, now),
    )
    cur = conn.execute(
        "INSERT INTO distributions (name, version, security_version, compatible, filename, sha256, description, "
        "signer, verified, manifest, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            d.name,
            d.version,
            d.security_version,
            d.compatible,
            d.filename,
            d.sha256,
            d.description,
            d.signer,
            int(d.verified),
            json.dumps(d.manifest, sort_keys=True),
            now,
        ),
    )
    assert cur.lastrowid is not None
    return get_distribution(conn, cur.lastrowid), True


def get_distribution(conn: sqlite3.Connection, dist_id: int) -> Distribution:
    row = conn.execute(Distribution.SELECT + " WHERE d.id = ?", (dist_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no bundle {dist_id} (pitstop server bundles)")
    return Distribution.from_row(row)


def find_distribution(conn: sqlite3.Connection, ref: str) -> Distribution:
    """A bundle by id (`3`), version (`2.0.0`) or `name:version`; NotFoundError, or DeployError when a
    version names several."""
    if ref.isdigit():
        return get_distribution(conn, int(ref))
    name, _, version = ref.rpartition(":")
    if name:
        rows = conn.execute(
            Distribution.SELECT + " WHERE d.version = ? AND d.name = ? ORDER BY d.id", (version, name)
        ).fetchall()
    else:
        rows = conn.execute(Distribution.SELECT + " WHERE d.version = ? ORDER BY d.id", (version,)).fetchall()
    if not rows:
        raise NotFoundError(f"no bundle {ref!r} (pitstop server bundles lists them by id, name and version)")
    if len(rows) > 1:
        ids = ", ".join(str(r[0]) for r in rows)
        raise DeployError(f"{ref!r} names several bundles ({ids}): give the id")
    return Distribution.from_row(rows[0])


def list_distributions(conn: sqlite3.Connection) -> list[Distribution]:
    rows = conn.execute(Distribution.SELECT + " ORDER BY d.id").fetchall()
    return [Distribution.from_row(r) for r in rows]


def distribution_by_name(conn: sqlite3.Connection, name: str, version: str) -> Distribution | None:
    row = conn.execute(
        Distribution.SELECT + " WHERE d.name = ? AND d.version = ? ORDER BY d.id DESC LIMIT 1", (name, version)
    ).fetchone()
    return None if row is None else Distribution.from_row(row)


def manifest(conn: sqlite3.Connection, dist_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT manifest FROM distributions WHERE id = ?", (dist_id,)).fetchone()
    return {} if row is None else dict(json.loads(row[0]))


# -- rollouts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutSpec:
    target: str  # for people: "group lab", "2 devices", "all devices, 10%"
    devices: Sequence[str]  # every candidate, before filtering
    percent: float | None = None  # of the candidates left after filtering
    waves: Sequence[float] = (100.0,)
    first_wave: int | None = None
    max_failure: float = 1.0
    advance_at: float = 1.0
    download: str = "forced"
    update: str = "forced"
    window: str | None = None
    reinstall: bool = False  # also devices that already run or are given this bundle
    strict: bool = False  # a device that cannot take it is an error (named devices), not a skip


@dataclass(frozen=True)
class Created:
    rollout: Rollout
    waves: list[list[str]]
    skipped: list[tuple[str, str]]  # (device, why)


def create_rollout(conn: sqlite3.Connection, now: float, dist: Distribution, spec: RolloutSpec) -> Created:
    if not 0 <= spec.max_failure <= 1 or not 0 < spec.advance_at <= 1:
        raise DeployError("max failure must lie in 0..1 and the advance threshold in 0 < t <= 1")
    skipped: list[tuple[str, str]] = []
    eligible: list[str] = []
    for dev in dict.fromkeys(spec.devices):
        why = _unfit(conn, dev, dist, spec.reinstall)
        if why is None:
            eligible.append(dev)
        elif spec.strict:
            raise DeployError(f"device {dev!r}: {why}")
        else:
            skipped.append((dev, why))
    seed = secrets.token_hex(8)
    ordered = waves.order(eligible, seed)
    if spec.percent is not None:
        ordered = waves.take_percent(ordered, spec.percent)
    if not ordered:
        why = (
            f" ({len(skipped)} skipped: {skipped[0][0]}: {skipped[0][1]}{', …' if len(skipped) > 1 else ''})"
            if skipped
            else ""
        )
        raise DeployError(f"no device to deploy {dist.label} to: {spec.target}{why}")
    sizes = waves.wave_sizes(len(ordered), spec.waves, spec.first_wave)
    plan = waves.split(ordered, sizes)
    cur = conn.execute(
        "INSERT INTO rollouts (distribution_id, created, target, waves, max_failure, advance_at, download, update_, "
        "window, status, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
        (
            dist.id,
            now,
            spec.target,
            json.dumps(sizes),
            spec.max_failure,
            spec.advance_at,
            spec.download,
            spec.update,
            spec.window,
            now,
        ),
    )
    rollout_id = cur.lastrowid
    assert rollout_id is not None
    conn.executemany(
        "INSERT INTO actions (device_id, distribution_id, rollout_id, wave, status, download, update_, window, "
        "created, updated) VALUES (?, ?, ?, ?, 'scheduled', ?, ?, ?, ?, ?)",
        [
            (dev, dist.id, rollout_id, w, spec.download, spec.update, spec.window, now, now)
            for w, devs in enumerate(plan)
            for dev in devs
        ],
    )
    _release(conn, now, rollout_id, 0)
    advance(conn, now, rollout_id)
    return Created(get_rollout(conn, rollout_id), plan, skipped)


def _unfit(conn: sqlite3.Connection, device_id: str, dist: Distribution, reinstall: bool) -> str | None:
    row = conn.execute("SELECT attributes, installed_action FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is None:
        return "no such device"
    compatible = json.loads(row[0]).get("compatible")
    if compatible is not None and compatible != dist.compatible:
        return f"it is a {compatible!r} device, the bundle is for {dist.compatible!r}"
    if reinstall:
        return None
    if row[1] is not None:
        installed = conn.execute("SELECT distribution_id FROM actions WHERE id = ?", (row[1],)).fetchone()
        if installed is not None and installed[0] == dist.id:
            return f"it runs {dist.label} already"
    busy = conn.execute(
        "SELECT id FROM actions WHERE device_id = ? AND distribution_id = ? AND status IN "
        "('scheduled', 'running', 'canceling') LIMIT 1",
        (device_id, dist.id),
    ).fetchone()
    if busy is not None:
        return f"action {busy[0]} gives it {dist.label} already"
    return None


def _release(conn: sqlite3.Connection, now: float, rollout_id: int, wave: int) -> None:
    """Hand wave `wave` to its devices; each device's older open actions of other bundles are asked to cancel."""
    rows = conn.execute(
        "SELECT id, device_id FROM actions WHERE rollout_id = ? AND wave = ? AND status = 'scheduled'",
        (rollout_id, wave),
    ).fetchall()
    for action_id, device_id in rows:
        older = conn.execute(
            "SELECT id FROM actions WHERE device_id = ? AND status = 'running' AND id < ?", (device_id, action_id)
        ).fetchall()
        for (old,) in older:
            _set_status(conn, now, old, ActionStatus.CANCELING)
            _server_note(conn, now, old, "canceling", f"superseded by action {action_id} (rollout {rollout_id})")
    conn.execute(
        "UPDATE actions SET status = 'running', updated = ? WHERE rollout_id = ? AND wave = ? AND status = 'scheduled'",
        (now, rollout_id, wave),
    )
    conn.execute("UPDATE rollouts SET current_wave = ?, updated = ? WHERE id = ?", (wave, now, rollout_id))


def wave_counts(conn: sqlite3.Connection, rollout_id: int, n_waves: int) -> list[waves.WaveCounts]:
    counts = [dict.fromkeys(("total", "success", "failure", "canceled"), 0) for _ in range(n_waves)]
    for wave, status, n in conn.execute(
        "SELECT wave, status, count(*) FROM actions WHERE rollout_id = ? GROUP BY wave, status", (rollout_id,)
    ):
        if 0 <= wave < n_waves:
            counts[wave]["total"] += n
            if status in FINAL_STATUSES:
                counts[wave][status] += n
    return [waves.WaveCounts(**c) for c in counts]


def advance(conn: sqlite3.Connection, now: float, rollout_id: int) -> Rollout:
    """Judge a running rollout's current wave and act on it: release the next wave, stop, or finish."""
    r = get_rollout(conn, rollout_id)
    while r.status is RolloutStatus.RUNNING:
        step = waves.next_step(
            wave_counts(conn, r.id, len(r.wave_sizes)),
            r.current_wave,
            r.max_failure,
            r.advance_at,
            checked_from=r.checked_from,
        )
        if step.kind is waves.StepKind.START:
            _release(conn, now, r.id, step.wave)
        elif step.kind is waves.StepKind.STOP:
            reason = f"stopped in wave {step.wave + 1} of {len(r.wave_sizes)}: {step.reason}"
            conn.execute(
                "UPDATE rollouts SET status = 'stopped', reason = ?, updated = ? WHERE id = ?", (reason, now, r.id)
            )
        elif step.kind is waves.StepKind.FINISH:
            conn.execute(
                "UPDATE rollouts SET status = 'finished', reason = ?, updated = ? WHERE id = ?",
                (step.reason, now, r.id),
            )
        else:
            break
        r = get_rollout(conn, rollout_id)
    return r


def advance_all(conn: sqlite3.Connection, now: float) -> list[Rollout]:
    """Every running rollout judged again (at start: what was stored while the server was down)."""
    ids = [row[0] for row in conn.execute("SELECT id FROM rollouts WHERE status = 'running' ORDER BY id")]
    return [advance(conn, now, i) for i in ids]


def get_rollout(conn: sqlite3.Connection, rollout_id: int) -> Rollout:
    row = conn.execute(Rollout.SELECT + " WHERE id = ?", (rollout_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no rollout r{rollout_id} (pitstop server rollouts)")
    return Rollout.from_row(row)


def list_rollouts(conn: sqlite3.Connection) -> list[Rollout]:
    return [Rollout.from_row(r) for r in conn.execute(Rollout.SELECT + " ORDER BY id")]


def rollout_totals(conn: sqlite3.Connection, rollout_id: int) -> dict[str, int]:
    out = {s.value: 0 for s in ActionStatus}
    for status, n in conn.execute(
        "SELECT status, count(*) FROM actions WHERE rollout_id = ? GROUP BY status", (rollout_id,)
    ):
        out[status] = n
    return out


def cancel_rollout(conn: sqlite3.Connection, now: float, rollout_id: int, *, force: bool = False) -> int:
    """Cancel what the rollout has not finished: scheduled actions at once, open ones through their device
    (or at once with `force`). Returns the number of actions canceled or being canceled."""
    r = get_rollout(conn, rollout_id)
    if r.status in (RolloutStatus.FINISHED, RolloutStatus.CANCELED):
        raise ConflictError(f"rollout r{rollout_id} is {r.status.value} already")
    rows = conn.execute(
        "SELECT id FROM actions WHERE rollout_id = ? AND status IN ('scheduled', 'running', 'canceling')", (rollout_id,)
    ).fetchall()
    for (action_id,) in rows:
        _cancel(conn, now, get_action(conn, action_id), force=force)
    conn.execute(
        "UPDATE rollouts SET status = 'canceled', reason = 'canceled by an operator', updated = ? WHERE id = ?",
        (now, rollout_id),
    )
    return len(rows)


def resume_rollout(conn: sqlite3.Connection, now: float, rollout_id: int) -> Rollout:
    """Go on with a stopped rollout: the waves judged so far no longer stop it."""
    r = get_rollout(conn, rollout_id)
    if r.status is not RolloutStatus.STOPPED:
        raise ConflictError(f"rollout r{rollout_id} is {r.status.value}, not stopped")
    conn.execute(
        "UPDATE rollouts SET status = 'running', checked_from = ?, reason = NULL, updated = ? WHERE id = ?",
        (r.current_wave + 1, now, rollout_id),
    )
    return advance(conn, now, rollout_id)


# -- actions --------------------------------------------------------------------------------------------------


def get_action(conn: sqlite3.Connection, action_id: int) -> Action:
    row = conn.execute(Action.SELECT + " WHERE id = ?", (action_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no action {action_id}")
    return Action.from_row(row)


def device_action(conn: sqlite3.Connection, device_id: str, action_id: int) -> Action | None:
    """The device's action `action_id` as the device may see it (released); None otherwise."""
    row = conn.execute(
        Action.SELECT + " WHERE id = ? AND device_id = ? AND status != 'scheduled'", (action_id, device_id)
    ).fetchone()
    return None if row is None else Action.from_row(row)


def current_action(conn: sqlite3.Connection, device_id: str) -> Action | None:
    """The action the device is asked about now: its oldest open one."""
    row = conn.execute(
        Action.SELECT + " WHERE device_id = ? AND status IN ('running', 'canceling') ORDER BY id LIMIT 1", (device_id,)
    ).fetchone()
    return None if row is None else Action.from_row(row)


def latest_actions(conn: sqlite3.Connection) -> dict[str, Action]:
    """Each device's action that tells its deployment status best: its oldest open one, else its newest."""
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT coalesce((SELECT min(o.id) FROM actions o WHERE o.device_id = d.id AND o.status IN "
            "('running', 'canceling')), (SELECT max(n.id) FROM actions n WHERE n.device_id = d.id)) FROM devices d"
        )
        if r[0] is not None
    ]
    rows = conn.execute(Action.SELECT + " WHERE id IN " + _JSON_LIST, (json.dumps(ids),)).fetchall()
    return {a.device_id: a for a in map(Action.from_row, rows)}


def device_actions(conn: sqlite3.Connection, device_id: str, limit: int = 20) -> list[Action]:
    rows = conn.execute(Action.SELECT + " WHERE device_id = ? ORDER BY id DESC LIMIT ?", (device_id, limit)).fetchall()
    return [Action.from_row(r) for r in rows]


def history(conn: sqlite3.Connection, action_id: int, limit: int | None = None) -> list[StatusEntry]:
    rows = conn.execute(
        StatusEntry.SELECT + " WHERE action_id = ? ORDER BY id DESC LIMIT ?",
        (action_id, -1 if limit is None else limit),
    ).fetchall()
    return [StatusEntry.from_row(r) for r in reversed(rows)]


def cancel_action(conn: sqlite3.Connection, now: float, action_id: int, *, force: bool = False) -> Action:
    a = get_action(conn, action_id)
    if a.status.final:
        raise ConflictError(f"action {action_id} is {a.status.value} already")
    if a.status is ActionStatus.CANCELING and not force:
        raise ConflictError(
            f"action {action_id} is being canceled already (waiting for device {a.device_id!r}; "
            "--force ends it without the device)"
        )
    _cancel(conn, now, a, force=force)
    if a.rollout_id is not None:
        advance(conn, now, a.rollout_id)
    return get_action(conn, action_id)


def _cancel(conn: sqlite3.Connection, now: float, a: Action, *, force: bool) -> None:
    if a.status is ActionStatus.SCHEDULED or force:
        _finish(conn, now, a, ActionStatus.CANCELED)
        _server_note(conn, now, a.id, "canceled", "canceled by an operator" + (" (forced)" if force else ""))
    elif a.status is ActionStatus.RUNNING:
        _set_status(conn, now, a.id, ActionStatus.CANCELING)
        _server_note(conn, now, a.id, "canceling", "cancel requested by an operator")


def _set_status(conn: sqlite3.Connection, now: float, action_id: int, status: ActionStatus) -> None:
    conn.execute("UPDATE actions SET status = ?, updated = ? WHERE id = ?", (status.value, now, action_id))


def _finish(conn: sqlite3.Connection, now: float, a: Action, status: ActionStatus) -> None:
    conn.execute(
        "UPDATE actions SET status = ?, updated = ?, finished = ? WHERE id = ?", (status.value, now, now, a.id)
    )
    if status is ActionStatus.SUCCESS:
        version = conn.execute("SELECT version FROM distributions WHERE id = ?", (a.distribution_id,)).fetchone()[0]
        conn.execute("UPDATE devices SET installed_action = ?, version = ? WHERE id = ?", (a.id, version, a.device_id))
    if status is not ActionStatus.CANCELED:
        # hawkBit asks for the attributes again after an action ends: they tell what now runs.
        conn.execute("UPDATE devices SET want_attributes = 1 WHERE id = ?", (a.device_id,))


def _server_note(conn: sqlite3.Connection, now: float, action_id: int, execution: str, detail: str) -> None:
    conn.execute(
        "INSERT INTO action_status (action_id, time, channel, execution, details) VALUES (?, ?, 'server', ?, ?)",
        (action_id, now, execution, json.dumps([detail])),
    )


# -- what the device reports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """A DdiActionFeedback as received (ddi_api.py validates it)."""

    execution: str
    finished: str
    details: tuple[str, ...] = ()
    code: int | None = None
    progress: tuple[int, int] | None = None


class FeedbackResult(StrEnum):
    STORED = "stored"
    NOT_FOUND = "not_found"  # not this device's action, or not released to it: 404
    GONE = "gone"  # the action is over: 410, as hawkBit answers


def _record(conn: sqlite3.Connection, now: float, a: Action, channel: str, fb: Feedback) -> None:
    cnt, of = fb.progress if fb.progress is not None else (None, None)
    cur = conn.execute(
        "INSERT INTO action_status (action_id, time, channel, execution, finished, code, progress_cnt, progress_of, "
        "details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (a.id, now, channel, fb.execution, fb.finished, fb.code, cnt, of, json.dumps(list(fb.details))),
    )
    message = fb.details[-1] if fb.details else None
    conn.execute(
        "UPDATE actions SET last_execution = ?, last_message = coalesce(?, last_message), "
        "progress_cnt = coalesce(?, progress_cnt), progress_of = coalesce(?, progress_of), updated = ? WHERE id = ?",
        (fb.execution if channel == "deployment" else f"cancel {fb.execution}", message, cnt, of, now, a.id),
    )
    if cur.lastrowid is not None:
        conn.execute(
            "DELETE FROM action_status WHERE action_id = ? AND id <= (SELECT id FROM action_status WHERE "
            "action_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (a.id, a.id, MAX_STATUS_ENTRIES),
        )


def deployment_feedback(
    conn: sqlite3.Connection, now: float, device_id: str, action_id: int, fb: Feedback
) -> FeedbackResult:
    """POST …/deploymentBase/{id}/feedback. `closed` ends the action (hawkBit reads `none` as success), as does
    `canceled`, and `downloaded` for a download-only action; the rest is history."""
    a = device_action(conn, device_id, action_id)
    if a is None:
        return FeedbackResult.NOT_FOUND
    if a.status.final:
        return FeedbackResult.GONE
    _record(conn, now, a, "deployment", fb)
    outcome: ActionStatus | None = None
    if fb.execution == "closed":
        outcome = ActionStatus.FAILURE if fb.finished == "failure" else ActionStatus.SUCCESS
    elif fb.execution == "canceled":
        outcome = ActionStatus.CANCELED
    elif fb.execution == "downloaded" and a.download_only:
        outcome = ActionStatus.SUCCESS
    if outcome is not None:
        _finish(conn, now, a, outcome)
        if a.rollout_id is not None:
            advance(conn, now, a.rollout_id)
    return FeedbackResult.STORED


def cancel_feedback(
    conn: sqlite3.Connection, now: float, device_id: str, action_id: int, fb: Feedback
) -> FeedbackResult:
    """POST …/cancelAction/{id}/feedback: `closed` with success (or none) confirms the cancellation; `rejected`,
    or `closed` with failure, leaves the action running (the device went on with it)."""
    a = device_action(conn, device_id, action_id)
    if a is None:
        return FeedbackResult.NOT_FOUND
    if a.status.final:
        return FeedbackResult.GONE
    if a.status is not ActionStatus.CANCELING:
        return FeedbackResult.NOT_FOUND
    _record(conn, now, a, "cancel", fb)
    if fb.execution == "closed" and fb.finished != "failure":
        _finish(conn, now, a, ActionStatus.CANCELED)
        if a.rollout_id is not None:
            advance(conn, now, a.rollout_id)
    elif fb.execution in ("rejected", "closed"):
        _set_status(conn, now, a.id, ActionStatus.RUNNING)
    return FeedbackResult.STORED


def installed_offline(conn: sqlite3.Connection, now: float, device_id: str, name: str, version: str) -> int | None:
    """PUT …/installedBase: the device runs bundle (name, version), installed without the server. Recorded as a
    finished action of no rollout; None when no such bundle was uploaded."""
    dist = distribution_by_name(conn, name, version)
    if dist is None:
        conn.execute("UPDATE devices SET version = ? WHERE id = ?", (version, device_id))
        return None
    cur = conn.execute(
        "INSERT INTO actions (device_id, distribution_id, status, download, update_, created, updated, finished, "
        "last_execution, last_message) VALUES (?, ?, 'success', 'skip', 'skip', ?, ?, ?, 'closed', ?)",
        (device_id, dist.id, now, now, now, "installed without the server (installedBase)"),
    )
    assert cur.lastrowid is not None
    _server_note(conn, now, cur.lastrowid, "closed", f"the device reports {dist.label} installed offline")
    conn.execute(
        "UPDATE devices SET installed_action = ?, version = ? WHERE id = ?", (cur.lastrowid, version, device_id)
    )
    return cur.lastrowid


def device_has_distribution(conn: sqlite3.Connection, device_id: str, dist_id: int) -> bool:
    """Whether the device was given this bundle (released to it, whatever became of it): it may download it."""
    row = conn.execute(
        "SELECT 1 FROM actions WHERE device_id = ? AND distribution_id = ? AND status != 'scheduled' LIMIT 1",
        (device_id, dist_id),
    ).fetchone()
    return row is not None
