"""`pitstop server check`: SQLite's own checks, then the rules the server's writes keep, then the files.

A crash (a SIGKILL, a power cut) must never leave a state that breaks one of these; tests kill the server
and its uploads at random moments and run this afterwards.
"""

from __future__ import annotations

import sqlite3

from pitstop.ota.server import artifacts
from pitstop.ota.server import rollout as waves
from pitstop.ota.server.deployments import list_rollouts, wave_counts
from pitstop.ota.server.records import FINAL_STATUSES, ActionStatus, RolloutStatus
from pitstop.ota.server.store import Store


def database_problems(conn: sqlite3.Connection) -> list[str]:
    problems = [f"sqlite: {r[0]}" for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
    problems += [
        f"foreign key: {r[0]} row {r[1]} names a missing {r[2]}" for r in conn.execute("PRAGMA foreign_key_check")
    ]
    valid = {s.value for s in ActionStatus}
    for action_id, status, finished in conn.execute("SELECT id, status, finished FROM actions"):
        if status not in valid:
            problems.append(f"action {action_id}: unknown status {status!r}")
        elif (status in FINAL_STATUSES) != (finished is not None):
            problems.append(f"action {action_id}: status {status} with finished time {finished}")
    for (action_id,) in conn.execute(
        "SELECT DISTINCT s.action_id FROM action_status s JOIN actions a ON a.id = s.action_id WHERE "
        "s.channel = 'deployment' AND s.execution IN ('closed', 'canceled') AND a.status NOT IN "
        "('success', 'failure', 'canceled')"
    ):
        problems.append(f"action {action_id}: the device closed it, yet it is still open")
    for dev, action_id in conn.execute(
        "SELECT d.id, d.installed_action FROM devices d LEFT JOIN actions a ON a.id = d.installed_action "
        "WHERE d.installed_action IS NOT NULL AND (a.id IS NULL OR a.status != 'success' OR a.device_id != d.id)"
    ):
        problems.append(f"device {dev}: its installed action {action_id} is not a success of its own")
    for r in list_rollouts(conn):
        counts = {
            (w, s): n
            for w, s, n in conn.execute(
                "SELECT wave, status, count(*) FROM actions WHERE rollout_id = ? GROUP BY wave, status", (r.id,)
            )
        }
        for (w, s), n in counts.items():
            if w <= r.current_wave and s == "scheduled":
                problems.append(f"rollout r{r.id}: wave {w + 1} is released but {n} of its actions are not")
            if w > r.current_wave and s not in ("scheduled", "canceled"):
                problems.append(f"rollout r{r.id}: wave {w + 1} is not released but {n} of its actions are {s}")
            if r.status is RolloutStatus.FINISHED and s not in FINAL_STATUSES:
                problems.append(f"rollout r{r.id}: finished with {n} actions {s}")
            if r.status is RolloutStatus.CANCELED and s == "scheduled":
                problems.append(f"rollout r{r.id}: canceled with {n} actions still scheduled")
        if r.status is RolloutStatus.RUNNING:
            step = waves.next_step(
                wave_counts(conn, r.id, len(r.wave_sizes)),
                r.current_wave,
                r.max_failure,
                r.advance_at,
                checked_from=r.checked_from,
            )
            if step.kind is not waves.StepKind.WAIT:
                problems.append(f"rollout r{r.id}: running, yet its next step ({step.kind.value}) was not taken")
    return problems


def problems(store: Store, *, deep: bool = False) -> list[str]:
    return store.read(database_problems) + artifacts.check_files(store, deep=deep)
