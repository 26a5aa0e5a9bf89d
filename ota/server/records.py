"""What the server stores, as frozen dataclasses read from its SQLite rows (store.py has the schema)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ActionStatus(StrEnum):
    SCHEDULED = "scheduled"  # in a wave not released yet: the device does not see it
    RUNNING = "running"  # the device is asked to run it
    CANCELING = "canceling"  # the device is asked to cancel it
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELED = "canceled"

    @property
    def open(self) -> bool:
        return self in (ActionStatus.RUNNING, ActionStatus.CANCELING)

    @property
    def final(self) -> bool:
        return self in (ActionStatus.SUCCESS, ActionStatus.FAILURE, ActionStatus.CANCELED)


OPEN_STATUSES = ("running", "canceling")
FINAL_STATUSES = ("success", "failure", "canceled")


class RolloutStatus(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"  # the failure threshold was passed: nobody else is assigned until it is resumed
    FINISHED = "finished"
    CANCELED = "canceled"


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


@dataclass(frozen=True)
class Device:
    id: str
    group: str | None
    token_hash: str | None
    registered_by: str  # "operator" or "auto"
    created: float
    last_seen: float | None
    last_address: str | None
    attributes: dict[str, str]
    want_attributes: bool
    version: str | None  # the bundle version it runs, as last told (attributes, a closed action, health)
    booted_slot: str | None
    installed_action: int | None
    health: dict[str, Any] | None
    health_time: float | None

    SELECT = (
        "SELECT id, grp, token_hash, registered_by, created, last_seen, last_address, attributes, "
        "want_attributes, version, booted_slot, installed_action, health, health_time FROM devices"
    )

    @classmethod
    def from_row(cls, r: sqlite3.Row | tuple[Any, ...]) -> Device:
        return cls(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            json.loads(r[7]),
            bool(r[8]),
            r[9],
            r[10],
            r[11],
            _json(r[12]),
            r[13],
        )

    @property
    def compatible(self) -> str | None:
        return self.attributes.get("compatible")


@dataclass(frozen=True)
class Distribution:
    """An uploaded bundle (hawkBit: a distribution set with one software module and one artifact)."""

    id: int
    name: str  # the bundle's compatible string
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
    verified: bool  # the signature was checked against a keyring at upload
    created: float

    SELECT = (
        "SELECT d.id, d.name, d.version, d.security_version, d.compatible, d.filename, d.sha256, a.sha1, "
        "a.md5, a.size, d.description, d.signer, d.verified, d.created "
        "FROM distributions d JOIN artifacts a ON a.sha256 = d.sha256"
    )

    @classmethod
    def from_row(cls, r: sqlite3.Row | tuple[Any, ...]) -> Distribution:
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], bool(r[12]), r[13])

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Action:
    id: int
    device_id: str
    distribution_id: int
    rollout_id: int | None
    wave: int
    status: ActionStatus
    download: str  # forced | attempt | skip
    update: str  # forced | attempt | skip
    window: str | None  # maintenance window (window.Window text), None: none
    created: float
    updated: float
    finished: float | None
    last_execution: str | None
    last_message: str | None
    progress: tuple[int, int] | None

    SELECT = (
        "SELECT id, device_id, distribution_id, rollout_id, wave, status, download, update_, window, created, "
        "updated, finished, last_execution, last_message, progress_cnt, progress_of FROM actions"
    )

    @classmethod
    def from_row(cls, r: sqlite3.Row | tuple[Any, ...]) -> Action:
        progress = (r[14], r[15]) if r[14] is not None and r[15] is not None else None
        return cls(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            ActionStatus(r[5]),
            r[6],
            r[7],
            r[8],
            r[9],
            r[10],
            r[11],
            r[12],
            r[13],
            progress,
        )

    @property
    def download_only(self) -> bool:
        return self.update == "skip" and self.window is None


@dataclass(frozen=True)
class StatusEntry:
    """One line of an action's history: a device's feedback, or what the server did."""

    id: int
    action_id: int
    time: float
    channel: str  # deployment | cancel | server
    execution: str
    finished: str | None
    code: int | None
    progress: tuple[int, int] | None
    details: list[str]

    SELECT = (
        "SELECT id, action_id, time, channel, execution, finished, code, progress_cnt, progress_of, details "
        "FROM action_status"
    )

    @classmethod
    def from_row(cls, r: sqlite3.Row | tuple[Any, ...]) -> StatusEntry:
        progress = (r[7], r[8]) if r[7] is not None and r[8] is not None else None
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], r[6], progress, json.loads(r[9]))


@dataclass(frozen=True)
class Rollout:
    id: int
    distribution_id: int
    created: float
    target: str  # how the targets were chosen, for people: "group lab, 50%"
    wave_sizes: tuple[int, ...]
    max_failure: float
    advance_at: float
    download: str
    update: str
    window: str | None
    status: RolloutStatus
    current_wave: int
    checked_from: int  # waves before this one no longer stop the rollout (resumed)
    reason: str | None
    updated: float

    SELECT = (
        "SELECT id, distribution_id, created, target, waves, max_failure, advance_at, download, update_, "
        "window, status, current_wave, checked_from, reason, updated FROM rollouts"
    )

    @classmethod
    def from_row(cls, r: sqlite3.Row | tuple[Any, ...]) -> Rollout:
        return cls(
            r[0],
            r[1],
            r[2],
            r[3],
            tuple(json.loads(r[4])),
            r[5],
            r[6],
            r[7],
            r[8],
            r[9],
            RolloutStatus(r[10]),
            r[11],
            r[12],
            r[13],
            r[14],
        )
