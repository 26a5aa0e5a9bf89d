"""The data partition of a new image: what a factory-fresh device finds under `/data`.

```
/data/
  pitstop/state.json                      slot a good, slot b empty, the image's security_version as the
                                          anti-rollback floor, its build time as the time floor, models current
  pitstop/versions/<target>/<version>/    each preloaded model: the file and model.json, exactly where a model
                                          payload with that target would be installed (docs/install.md)
  <target> -> pitstop/versions/…          the live link of each model
  identity/                               empty, 0700: factory provisioning writes here (image/provision.py)
  log/                                    /var/log of the read-only root
  log/journal/                            the persistent journal, when the recipe keeps one
```
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pitstop.image.errors import ImageBuildError
from pitstop.ota.device_state import DeviceState, StateStore, Versions
from pitstop.ota.manifest import MODEL_DESCRIPTION_FILE
from pitstop.ota.payload_store import PayloadStore
from pitstop.ota.slot_state import Content, Record, SlotRecord

LABEL = "data"
IDENTITY_DIR = "identity"
DATA_LOG_DIR = "log"  # /var/log on the device
JOURNAL_DIR = f"{DATA_LOG_DIR}/journal"
SLOTS = ("a", "b")


@dataclass(frozen=True)
class Preload:
    """A model put on the data partition at build time."""

    name: str
    source: Path
    target: str
    description: dict[str, Any] | None = None  # the model description, as a bundle's model payload carries it


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_version(bundle_version: str, sha256: str) -> str:
    """The version directory name an install gives a model payload (docs/install.md)."""
    return f"{bundle_version}-{sha256[:12]}"


def build_tree(
    dest: Path,
    *,
    bundle_version: str,
    security_version: int,
    created: datetime,
    models: Sequence[Preload] = (),
    persistent_journal: bool = True,
    slot_a_bundle: dict[str, Any] | None = None,
) -> DeviceState:
    """Fill the empty directory `dest` with the data partition's content; returns the state it records.
    `slot_a_bundle` describes what slot a holds (state.json's `bundle` fields), when known."""
    if any(dest.iterdir()):
        raise ImageBuildError(f"{dest} is not empty")
    store = PayloadStore(dest)
    payloads: dict[str, Versions] = {}
    for m in models:
        if m.source.name == MODEL_DESCRIPTION_FILE:
            raise ImageBuildError(f"model {m.name}: the file may not be named {MODEL_DESCRIPTION_FILE}")
        sha = file_sha256(m.source)
        version = model_version(bundle_version, sha)
        vdir = store.versions_dir(m.target) / version
        vdir.mkdir(parents=True)
        with m.source.open("rb") as src, (vdir / m.source.name).open("wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        # The same description an install writes beside an extracted model (ota/bundle_extract.py).
        desc = {"name": m.name, "file": m.source.name, "sha256": sha, "description": m.description or {}}
        (vdir / MODEL_DESCRIPTION_FILE).write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
        store.switch(m.target, version)
        payloads[m.target] = Versions(current=version)
    record = Record(
        {"a": SlotRecord(Content.GOOD, dict(slot_a_bundle or {})), "b": SlotRecord(Content.EMPTY)},
        committed_security_version=security_version,
    )
    state = DeviceState(record, time_floor=created.astimezone(UTC), payloads=payloads)
    StateStore(dest / "pitstop", SLOTS).save(state)
    identity = dest / IDENTITY_DIR
    identity.mkdir(mode=0o700)
    os.chmod(identity, 0o700)
    (dest / DATA_LOG_DIR).mkdir()
    if persistent_journal:
        journal = dest / JOURNAL_DIR
        journal.mkdir()
        # systemd-journald's own mode; systemd-tmpfiles gives it the systemd-journal group at boot.
        os.chmod(journal, 0o2755)  # noqa: S103 - world-readable like /var/log/journal
    return state
