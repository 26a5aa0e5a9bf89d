"""`pitstop bundle diff OLD NEW`: what a device running OLD downloads to install NEW over HTTP(S).

The same plan as the installer's delta (docs/delta.md): the device's seed is OLD's rootfs, found through
OLD's chunk index when both use the same chunking (the index a device records at install), else by
chunking OLD's rootfs with NEW's parameters (what a device without that record does). The request list
is the installer's too: the header, the manifest and signature, each payload's index and table, the runs
of missing rootfs chunks, every other payload whole.

Signatures are not checked (it is a release engineer's tool, like `bundle info`); each chunk index is
checked against its manifest, and OLD's rootfs chunks, when they are chunked again, against their ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pitstop.ota import bundle_format as fmt
from pitstop.ota import chunks
from pitstop.ota.bundle_extract import ChunkReader
from pitstop.ota.bundle_reader import PayloadLayout, PayloadStream, payload_pool, read_layout, read_preamble
from pitstop.ota.delta_plan import DEFAULT_MAX_GAP, make_plan, seed_offsets
from pitstop.ota.manifest import Manifest, Payload

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class PayloadDiff:
    name: str
    type: str
    size: int  # uncompressed bytes
    compressed: int  # bytes of its compressed chunks in NEW
    chunks: int
    reused_chunks: int
    reused_bytes: int  # uncompressed bytes the device copies from its slot
    download: int  # bytes requested: index and table, then chunk data
    requests: int
    seed: str  # where reused chunks come from: "index", "chunked" or "" (none)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "size": self.size,
            "compressed": self.compressed,
            "chunks": self.chunks,
            "reused_chunks": self.reused_chunks,
            "reused_bytes": self.reused_bytes,
            "download": self.download,
            "requests": self.requests,
            "seed": self.seed or None,
        }


@dataclass(frozen=True)
class BundleDiff:
    old_version: str
    new_version: str
    new_size: int  # NEW's file size: what a full download reads
    preamble: int  # header, manifest and signature block
    payloads: tuple[PayloadDiff, ...]

    @property
    def download(self) -> int:
        return self.preamble + sum(p.download for p in self.payloads)

    @property
    def requests(self) -> int:
        return 2 + sum(p.requests for p in self.payloads)

    def to_json(self) -> dict[str, Any]:
        return {
            "old_version": self.old_version,
            "new_version": self.new_version,
            "new_size": self.new_size,
            "download": self.download,
            "requests": self.requests,
            "preamble": self.preamble,
            "payloads": [p.to_json() for p in self.payloads],
        }


def _rootfs(m: Manifest) -> Payload | None:
    return next((p for p in m.payloads if p.type == "rootfs"), None)


def _same_chunking(a: Payload, b: Payload) -> bool:
    return a.chunking == b.chunking and a.chunk_digest == b.chunk_digest


def _layout_at(f: BinaryIO, base: int, p: Payload, limits: fmt.Limits) -> PayloadLayout:
    f.seek(base + p.region_start)
    return read_layout(f, p, limits)


def _chunk_payload(
    f: BinaryIO, base: int, old: Payload, new: Payload, limits: fmt.Limits, progress: ProgressFn | None
) -> dict[bytes, int]:
    """Cut OLD's rootfs (decompressed and verified on the way) with NEW's chunking: chunk id → offset."""
    layout = _layout_at(f, base, old, limits)
    cmin, cavg, cmax = new.chunking
    out: dict[bytes, int] = {}
    with payload_pool() as pool:
        stream: Iterator[bytes] = iter(PayloadStream(f, old, layout, pool))
        reader = ChunkReader(stream)
        pos = 0
        for c in chunks.iter_chunks(reader, cmin, cavg, cmax):  # type: ignore[arg-type]
            out.setdefault(chunks.chunk_id(c, new.chunk_digest), pos)
            pos += len(c)
            if progress:
                progress(len(c))
        reader.drain()  # the payload-wide checks run when the stream ends
    return out


def diff_bundles(
    old_path: Path,
    new_path: Path,
    *,
    limits: fmt.Limits = fmt.DEFAULT_LIMITS,
    max_gap: int = DEFAULT_MAX_GAP,
    progress: ProgressFn | None = None,
) -> BundleDiff:
    """Raises BundleError/PayloadError for a malformed bundle and OSError when one cannot be read."""
    with open(old_path, "rb") as fo, open(new_path, "rb") as fn:
        old_pre, new_pre = read_preamble(fo, limits), read_preamble(fn, limits)
        old_base, new_base = old_pre.header.payload_offset, new_pre.header.payload_offset
        old_root = _rootfs(old_pre.manifest)
        out: list[PayloadDiff] = []
        for p in new_pre.manifest.payloads:
            layout = _layout_at(fn, new_base, p, limits)
            head = p.data.offset - p.region_start  # index and table: one request
            if p.type != "rootfs":
                out.append(
                    PayloadDiff(
                        p.name, p.type, p.size, p.data.size, p.chunks, 0, 0, head + p.region_end - p.data.offset, 2, ""
                    )
                )
                continue
            seed: dict[bytes, int] = {}
            origin = ""
            if old_root is not None and _same_chunking(old_root, p):
                seed, origin = seed_offsets(_layout_at(fo, old_base, old_root, limits).index), "index"
            elif old_root is not None:
                seed, origin = _chunk_payload(fo, old_base, old_root, p, limits, progress), "chunked"
            plan = make_plan(layout.index, layout.sizes, new_base + p.data.offset, seed, max_gap=max_gap)
            out.append(
                PayloadDiff(
                    p.name,
                    p.type,
                    p.size,
                    p.data.size,
                    plan.chunks,
                    plan.seeded_chunks,
                    plan.seeded_bytes,
                    head + plan.download_bytes,
                    1 + len(plan.fetches),
                    origin,
                )
            )
        new_size = fn.seek(0, 2)
    return BundleDiff(old_pre.manifest.version, new_pre.manifest.version, new_size, new_base, tuple(out))
