"""hawkBit DDI documents as frozen dataclasses, and the bodies the device sends back; no I/O.

Parsing follows the server's own model classes (hawkbit-ddi-api `org.eclipse.hawkbit.ddi.json.model`):
unknown fields are ignored, as the server's `@JsonIgnoreProperties(ignoreUnknown = true)` does; a field
this client needs that is missing or of the wrong type raises DdiError naming it (`deployment.chunks[0]
.artifacts[1].filename`). docs/ddi.md describes the whole exchange.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from pitstop.daemon.errors import DdiError

BUNDLE_SUFFIX = ".pitb"
MAX_DETAIL_CHARS = 512   # hawkBit stores each message in a 512-character column and splits longer ones
MAX_DETAILS = 50         # hawkBit's default quota of messages per action status (maxMessagesPerActionStatus)

_HHMMSS = re.compile(r"(\d{2,}):([0-5]\d):([0-5]\d)")
# Java's Duration.toString(): hawkBit sends it instead of HH:MM:SS for sleeps of a day or more.
_ISO_DURATION = re.compile(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?")
_HEX_LEN = {"sha256": 64, "sha1": 40, "md5": 32}
_E = TypeVar("_E", bound=StrEnum)


class Handling(StrEnum):
    """deployment.download / deployment.update."""

    SKIP = "skip"          # not yet
    ATTEMPT = "attempt"    # the server asks; local intervention (an inhibitor) may postpone it
    FORCED = "forced"      # now, whatever local intervention says


class MaintenanceWindow(StrEnum):
    """deployment.maintenanceWindow: the server-side schedule; absent when the action has none."""

    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"


class Execution(StrEnum):
    """status.execution of a feedback."""

    CLOSED = "closed"
    PROCEEDING = "proceeding"
    CANCELED = "canceled"
    SCHEDULED = "scheduled"
    REJECTED = "rejected"
    RESUMED = "resumed"
    DOWNLOADED = "downloaded"
    DOWNLOAD = "download"


class Finished(StrEnum):
    """status.result.finished of a feedback."""

    SUCCESS = "success"
    FAILURE = "failure"
    NONE = "none"


class ConfigMode(StrEnum):
    """configData mode: how the attributes sent combine with those the server holds."""

    MERGE = "merge"
    REPLACE = "replace"
    REMOVE = "remove"


@dataclass(frozen=True)
class ControllerBase:
    """GET /{tenant}/controller/v1/{controllerId}: the poll answer. A None href: no such link."""

    sleep_s: float | None          # config.polling.sleep; None: the server gave none
    deployment_href: str | None
    cancel_href: str | None
    config_data_href: str | None   # present when the server wants the device's attributes
    installed_href: str | None
    confirmation_href: str | None  # the confirmation flow, not implemented: the agent can only report it


@dataclass(frozen=True)
class Artifact:
    filename: str
    size: int
    sha256: str | None     # lower-case hex; None where the server sent none (hawkBit before 0.3)
    sha1: str | None
    md5: str | None
    download_url: str      # _links.download (https) when present, else _links.download-http


@dataclass(frozen=True)
class Chunk:
    """One software module of the distribution set."""

    part: str
    version: str
    name: str
    artifacts: tuple[Artifact, ...]
    metadata: tuple[tuple[str, str], ...]   # (key, value) of the module's target-visible metadata


@dataclass(frozen=True)
class Deployment:
    """GET …/deploymentBase/{actionId} (and …/installedBase/{actionId}, same format)."""

    action_id: str
    download: Handling
    update: Handling
    maintenance_window: MaintenanceWindow | None   # None: the action has no maintenance schedule
    chunks: tuple[Chunk, ...]

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return tuple(a for c in self.chunks for a in c.artifacts)


@dataclass(frozen=True)
class CancelAction:
    """GET …/cancelAction/{actionId}: the server asks the device to stop action `stop_id`."""

    action_id: str
    stop_id: str


# -- parsing -----------------------------------------------------------------------------------------------


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    """The JSON object in `body`; DdiError naming `what` (e.g. "GET /DEFAULT/controller/v1/dev") if it is not one."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DdiError(f"{what}: the update server sent malformed JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DdiError(f"{what}: the update server sent JSON that is not an object")
    return doc


def parse_sleep(text: str) -> float:
    """Seconds in a hawkBit polling sleep: "HH:MM:SS", or an ISO-8601 duration ("PT36H") for a day or more."""
    m = _HHMMSS.fullmatch(text)
    if m:
        return float(int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]))
    m = _ISO_DURATION.fullmatch(text)
    if m and text not in ("P", "PT") and not text.endswith("T"):
        days, hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
        return days * 86400 + hours * 3600 + minutes * 60 + seconds
    raise ValueError(f"not HH:MM:SS nor an ISO-8601 duration: {text!r}")


def parse_controller_base(doc: Mapping[str, Any]) -> ControllerBase:
    ctx = "controller base"
    sleep_s = None
    config = _opt(doc, "config", dict, ctx)
    polling = _opt(config, "polling", dict, ctx, "config") if config is not None else None
    if polling is not None:
        sleep = _opt(polling, "sleep", str, ctx, "config.polling")
        if sleep is not None:
            try:
                sleep_s = parse_sleep(sleep)
            except ValueError as e:
                raise DdiError(f"{ctx}: config.polling.sleep: {e}") from None
    links = _opt(doc, "_links", dict, ctx) or {}
    return ControllerBase(
        sleep_s=sleep_s,
        deployment_href=_href(links, "deploymentBase", ctx),
        cancel_href=_href(links, "cancelAction", ctx),
        config_data_href=_href(links, "configData", ctx),
        installed_href=_href(links, "installedBase", ctx),
        confirmation_href=_href(links, "confirmationBase", ctx),
    )


def parse_deployment(doc: Mapping[str, Any]) -> Deployment:
    ctx = "deployment"
    dep = _req(doc, "deployment", dict, ctx)
    chunks = _req(dep, "chunks", list, ctx, "deployment")
    window = _opt(dep, "maintenanceWindow", str, ctx, "deployment")
    return Deployment(
        action_id=_id(doc, "id", ctx),
        download=_enum(Handling, _req(dep, "download", str, ctx, "deployment"), ctx, "deployment.download"),
        update=_enum(Handling, _req(dep, "update", str, ctx, "deployment"), ctx, "deployment.update"),
        maintenance_window=None if window is None else _enum(MaintenanceWindow, window, ctx,
                                                             "deployment.maintenanceWindow"),
        chunks=tuple(_chunk(c, f"deployment.chunks[{i}]", ctx) for i, c in enumerate(chunks)),
    )


def parse_cancel(doc: Mapping[str, Any]) -> CancelAction:
    ctx = "cancel action"
    cancel = _req(doc, "cancelAction", dict, ctx)
    stop_id = _id(cancel, "stopId", ctx, "cancelAction")
    # `id` is optional in the server's model; it is the cancel action's own id, in practice the same as stopId.
    action_id = _id(doc, "id", ctx) if doc.get("id") is not None else stop_id
    return CancelAction(action_id=action_id, stop_id=stop_id)


def bundle_artifact(deployment: Deployment) -> Artifact:
    """The one pitstop bundle (`*.pitb`) of the deployment, else its only artifact; DdiError when there is
    no artifact or the choice is ambiguous (never guess which file to install)."""
    artifacts = deployment.artifacts
    bundles = [a for a in artifacts if a.filename.endswith(BUNDLE_SUFFIX)]
    if len(bundles) == 1:
        return bundles[0]
    if len(bundles) > 1:
        names = ", ".join(a.filename for a in bundles)
        raise DdiError(f"deployment {deployment.action_id}: more than one bundle artifact ({names})")
    if len(artifacts) == 1:
        return artifacts[0]
    if not artifacts:
        raise DdiError(f"deployment {deployment.action_id}: no artifact to install")
    names = ", ".join(a.filename for a in artifacts)
    raise DdiError(f"deployment {deployment.action_id}: no {BUNDLE_SUFFIX} artifact among {len(artifacts)} "
                   f"({names}); cannot tell which one to install")


def _chunk(raw: object, path: str, ctx: str) -> Chunk:
    if not isinstance(raw, dict):
        raise DdiError(f"{ctx}: {path} is not an object")
    artifacts = _opt(raw, "artifacts", list, ctx, path) or []
    metadata = _opt(raw, "metadata", list, ctx, path) or []
    meta: list[tuple[str, str]] = []
    for i, m in enumerate(metadata):
        mp = f"{path}.metadata[{i}]"
        if not isinstance(m, dict):
            raise DdiError(f"{ctx}: {mp} is not an object")
        meta.append((_req(m, "key", str, ctx, mp), _req(m, "value", str, ctx, mp)))
    return Chunk(
        part=_req(raw, "part", str, ctx, path),
        version=_req(raw, "version", str, ctx, path),
        name=_req(raw, "name", str, ctx, path),
        artifacts=tuple(_artifact(a, f"{path}.artifacts[{i}]", ctx) for i, a in enumerate(artifacts)),
        metadata=tuple(meta),
    )


def _artifact(raw: object, path: str, ctx: str) -> Artifact:
    if not isinstance(raw, dict):
        raise DdiError(f"{ctx}: {path} is not an object")
    filename = _req(raw, "filename", str, ctx, path)
    size = _req(raw, "size", int, ctx, path)
    if size < 0:
        raise DdiError(f"{ctx}: {path}.size is negative")
    hashes = _opt(raw, "hashes", dict, ctx, path) or {}
    digests: dict[str, str | None] = {}
    for algo, length in _HEX_LEN.items():
        value = _opt(hashes, algo, str, ctx, f"{path}.hashes")
        if value is not None and not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
            raise DdiError(f"{ctx}: {path}.hashes.{algo} is not {length} hex digits")
        digests[algo] = value.lower() if value is not None else None
    links = _opt(raw, "_links", dict, ctx, path) or {}
    # https first: the device token travels in a header, and plain http would also leave the bytes
    # unauthenticated in transit (the bundle signature still protects them, not the token).
    url = _href(links, "download", ctx, path) or _href(links, "download-http", ctx, path)
    if url is None:
        raise DdiError(f"{ctx}: missing field {path}._links.download (nor download-http)")
    return Artifact(filename=filename, size=size, sha256=digests["sha256"], sha1=digests["sha1"],
                    md5=digests["md5"], download_url=url)


def _field(parent: str | None, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _req(doc: Mapping[str, Any], key: str, kind: type[Any], ctx: str, parent: str | None = None) -> Any:
    value = _opt(doc, key, kind, ctx, parent)
    if value is None:
        raise DdiError(f"{ctx}: missing field {_field(parent, key)}")
    return value


def _opt(doc: Mapping[str, Any], key: str, kind: type[Any], ctx: str, parent: str | None = None) -> Any:
    value = doc.get(key)
    if value is None:
        return None
    # bool is an int to Python, never to JSON's readers: "size": true is not a size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DdiError(f"{ctx}: field {_field(parent, key)} is {type(value).__name__}, expected "
                       f"{_JSON_NAMES.get(kind, kind.__name__)}")
    return value


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer"}


def _id(doc: Mapping[str, Any], key: str, ctx: str, parent: str | None = None) -> str:
    """An action id: a string in hawkBit's JSON, a number from some other servers."""
    value = doc.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text: str = _req(doc, key, str, ctx, parent)
    if not text or "/" in text:
        raise DdiError(f"{ctx}: field {_field(parent, key)} is not an action id: {text!r}")
    return text


def _enum(kind: type[_E], value: str, ctx: str, path: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        allowed = "|".join(m.value for m in kind)
        raise DdiError(f"{ctx}: {path} is {value!r}, expected {allowed}") from None


def _href(links: Mapping[str, Any], rel: str, ctx: str, parent: str | None = None) -> str | None:
    link = links.get(rel)
    if link is None:
        return None
    path = _field(parent, f"_links.{rel}")
    if not isinstance(link, dict):
        raise DdiError(f"{ctx}: {path} is not an object")
    href = link.get("href")
    if not isinstance(href, str) or not href:
        raise DdiError(f"{ctx}: missing field {path}.href")
    return href


# -- bodies the device sends -------------------------------------------------------------------------------


def feedback_body(execution: Execution, finished: Finished, *, timestamp_ms: int,
                  progress: tuple[int, int] | None = None, details: Sequence[str] = (),
                  code: int | None = None) -> dict[str, Any]:
    """POST …/deploymentBase/{id}/feedback and …/cancelAction/{id}/feedback (DdiActionFeedback).

    `progress` is (cnt, of). `details` are lines for the action history: each is cut to 512 characters
    and, past 50, the earliest are dropped behind a count (the end of a log is what explains a failure).
    Raises ValueError for a body the server would misread: "closed" with "none" counts as success there.
    """
    if execution is Execution.CLOSED and finished is Finished.NONE:
        raise ValueError("a closed action needs finished=success or failure (hawkBit reads none as success)")
    result: dict[str, Any] = {"finished": finished.value}
    if progress is not None:
        cnt, of = progress
        if not 0 <= cnt <= of or of < 1:
            raise ValueError(f"progress {cnt}/{of}: need 0 <= cnt <= of and of >= 1")
        result["progress"] = {"cnt": cnt, "of": of}
    status: dict[str, Any] = {"execution": execution.value, "result": result, "details": _details(details)}
    if code is not None:
        status["code"] = code
    return {"timestamp": timestamp_ms, "status": status}


def _details(lines: Sequence[str]) -> list[str]:
    out = [line if len(line) <= MAX_DETAIL_CHARS else line[:MAX_DETAIL_CHARS - 1] + "…" for line in lines]
    if len(out) > MAX_DETAILS:
        dropped = len(out) - (MAX_DETAILS - 1)
        out = [f"({dropped} earlier lines omitted)", *out[-(MAX_DETAILS - 1):]]
    return out


def config_data_body(attributes: Mapping[str, str], mode: ConfigMode = ConfigMode.MERGE) -> dict[str, Any]:
    """PUT …/configData (DdiConfigData): the device's attributes; values are strings in the server's model."""
    if not attributes:
        raise ValueError("configData needs at least one attribute (the server requires a non-empty map)")
    for k, v in attributes.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValueError(f"configData attribute {k!r}: keys must be non-empty strings and values strings")
    return {"mode": mode.value, "data": dict(attributes)}


def installed_base_body(name: str, version: str) -> dict[str, Any]:
    """PUT …/installedBase (DdiAssignedVersion): the distribution set now running, installed offline."""
    if not name or not version:
        raise ValueError("installedBase needs a distribution set name and version")
    return {"name": name, "version": version}
