"""Extracting one payload, verified on the way; nothing is left behind on failure.

rootfs → a file; model → a directory with the model file and `model.json`; files → a directory tree.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from pitstop.atomic import atomic_dir, atomic_file
from pitstop.errors import UsageError
from pitstop.ota import bundle_format as fmt
from pitstop.ota.bundle_reader import PayloadStream, payload_pool, read_layout, skip
from pitstop.ota.files_archive import extract_tree
from pitstop.ota.manifest import MODEL_DESCRIPTION_FILE, Manifest, Payload

ProgressFn = Callable[[int], None]


class ChunkReader(io.RawIOBase):
    """A read-only stream over verified chunks, for consumers that want a file (tarfile)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        """Consume what the reader did not (tar padding), so the payload-wide checks run."""
        self._buf = memoryview(b"")
        for _ in self._chunks:
            pass


def _counted(chunks: Iterator[bytes], progress: ProgressFn | None) -> Iterator[bytes]:
    for c in chunks:
        if progress:
            progress(len(c))
        yield c


def extract_payload(f: BinaryIO, m: Manifest, name: str, dest: Path, *, progress: ProgressFn | None = None,
                    limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> Payload:
    """Extract payload `name` to `dest`. `f` must be at the start of the payload area."""
    p = m.payload(name)
    dest = Path(dest)
    if p.type != "rootfs" and dest.exists():
        raise UsageError(f"{dest} already exists; extract a {p.type} payload to a new directory")
    if not dest.parent.is_dir():
        raise UsageError(f"directory {dest.parent} does not exist")
    skip(f, p.region_start)
    layout = read_layout(f, p, limits)
    with payload_pool() as pool:
        chunks = _counted(iter(PayloadStream(f, p, layout, pool)), progress)
        if p.type == "rootfs":
            with atomic_file(dest) as out:
                for c in chunks:
                    out.write(c)
        else:
            with atomic_dir(dest) as tmp:
                write_tree_payload(p, chunks, tmp, limits)
    return p


def write_tree_payload(p: Payload, chunks: Iterator[bytes], dest: Path,
                       limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> None:
    """Write a model or files payload's verified chunks into the empty directory `dest`."""
    if p.type == "files":
        reader = ChunkReader(chunks)
        extract_tree(io.BufferedReader(reader, 1 << 20), dest, limits)
        reader.drain()
        return
    file_name = p.model_file
    assert file_name is not None and p.model is not None
    with open(dest / file_name, "wb") as out:
        for c in chunks:
            out.write(c)
    desc = {"name": p.name, "file": file_name, "sha256": p.sha256, "description": p.model.get("description", {})}
    (dest / MODEL_DESCRIPTION_FILE).write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
