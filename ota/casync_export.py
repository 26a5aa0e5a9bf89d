"""Export a payload's chunk index as `.caibx` plus a casync chunk store (`<store>/<4 hex>/<id>.cacnk`).

Every chunk is verified before it is stored; each chunk file appears atomically, so an interrupted
export leaves a valid (partial) store, and chunks already present are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pitstop.atomic import atomic_write
from pitstop.ota import bundle_format as fmt
from pitstop.ota.bundle_reader import PayloadStream, payload_pool, read_layout, skip
from pitstop.ota.manifest import Manifest

ProgressFn = Callable[[int], None]


def chunk_path(store: Path, chunk_id: bytes) -> Path:
    h = chunk_id.hex()
    return store / h[:4] / f"{h}.cacnk"


def export_casync(f: BinaryIO, m: Manifest, name: str, index_path: Path, store: Path, *,
                  progress: ProgressFn | None = None, limits: fmt.Limits = fmt.DEFAULT_LIMITS) -> int:
    """Write the index and the store; return the number of chunks newly written to the store."""
    p = m.payload(name)
    skip(f, p.region_start)
    layout = read_layout(f, p, limits)
    store.mkdir(parents=True, exist_ok=True)
    written = 0
    with payload_pool() as pool:
        stream = PayloadStream(f, p, layout, pool, keep_frames=True)
        for i, chunk in enumerate(stream):
            # keep_frames holds each verified chunk's zstd frame: the store takes them as they are.
            frame = stream.frames[i]
            stream.frames[i] = b""
            path = chunk_path(store, layout.index.ids[i])
            if not path.exists():
                os.makedirs(path.parent, exist_ok=True)
                atomic_write(path, frame)
                written += 1
            if progress:
                progress(len(chunk))
    atomic_write(index_path, layout.index_bytes)
    return written
