"""Model and files payloads on the data partition: one directory per version, a symlink for the live one.

`<data_dir>/<target>` is a relative symlink to `<data_dir>/pitstop/versions/<target>/<version>`. Switching
versions replaces the symlink with rename(2), so readers see the old or the new tree, never a mix; the
previous version stays until the next install commits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pitstop.atomic import atomic_dir, fsync_dir
from pitstop.ota.slot_state import StateError


class PayloadStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.versions_root = self.data_dir / "pitstop" / "versions"

    def versions_dir(self, target: str) -> Path:
        return self.versions_root / target

    def live_path(self, target: str) -> Path:
        return self.data_dir / target

    def check_live(self, target: str) -> None:
        live = self.live_path(target)
        if (live.exists() or live.is_symlink()) and not live.is_symlink():
            raise StateError(f"{live} exists and is not a pitstop-managed link; move it away first")

    @contextlib.contextmanager
    def stage(self, target: str, version: str) -> Iterator[Path]:
        """A fresh directory that becomes version `version` of `target` if the block completes."""
        d = self.versions_dir(target)
        d.mkdir(parents=True, exist_ok=True)
        final = d / version
        if final.exists():
            # A re-install of the same payload (the id carries its hash): the stream is still consumed and
            # verified into a scratch directory, but the existing copy, maybe live, is never removed.
            scratch = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=d))
            try:
                yield scratch
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        with atomic_dir(final) as tmp:
            yield tmp

    def current_link(self, target: str) -> str | None:
        live = self.live_path(target)
        if not live.is_symlink():
            return None
        return Path(os.readlink(live)).name

    def switch(self, target: str, version: str | None) -> None:
        """Point the live path at `version` (None: remove it), atomically."""
        live = self.live_path(target)
        if version is None:
            if live.is_symlink():
                live.unlink()
                fsync_dir(live.parent)
            return
        if self.current_link(target) == version:
            return
        live.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(self.versions_dir(target) / version, live.parent)
        tmp = live.parent / f".{live.name}.link.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(rel, tmp)
        os.replace(tmp, live)
        fsync_dir(live.parent)

    def prune(self, target: str, keep: set[str]) -> None:
        d = self.versions_dir(target)
        if not d.is_dir():
            return
        for child in d.iterdir():  # also staging leftovers (".<version>.*.tmp") of a killed install
            if child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)
