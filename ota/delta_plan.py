"""Which chunks of a new payload a device copies from its active slot, and which byte ranges of the bundle
it downloads for the rest. Pure code, no I/O: `pitstop install` over HTTP and `pitstop bundle diff` share it.

A payload's compressed chunks lie back to back in the bundle, in index order, so the chunks missing from
the seed form runs of contiguous bytes: one Range request each. Runs separated by less than `max_gap`
bytes of chunks the seed holds are merged into one request; downloading those few bytes again costs less
than another round trip (and the chunks come from the download then).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pitstop.ota.caibx import ChunkIndex

DEFAULT_MAX_GAP = 16 * 1024


@dataclass(frozen=True)
class Fetch:
    """Chunks first..last-1 downloaded with one request for bundle bytes [start, end)."""

    start: int
    end: int
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    seed: tuple[int | None, ...]  # per chunk: its offset in the seed, or None when it is downloaded
    fetches: tuple[Fetch, ...]
    sizes: tuple[int, ...]  # compressed size of each chunk (the bundle's table)
    lengths: tuple[int, ...]  # uncompressed length of each chunk
    starts: tuple[int, ...]  # bundle offset of each compressed chunk

    @property
    def chunks(self) -> int:
        return len(self.seed)

    @property
    def seeded_chunks(self) -> int:
        return sum(1 for s in self.seed if s is not None)

    @property
    def seeded_bytes(self) -> int:
        """Uncompressed bytes copied from the seed."""
        return sum(n for s, n in zip(self.seed, self.lengths, strict=True) if s is not None)

    @property
    def download_bytes(self) -> int:
        """Compressed bytes of the chunk data requested from the bundle."""
        return sum(f.size for f in self.fetches)

    @property
    def downloaded_chunks(self) -> int:
        return sum(f.last - f.first for f in self.fetches)


def seed_offsets(index: ChunkIndex) -> dict[bytes, int]:
    """Chunk id → offset of its first occurrence in the seed."""
    out: dict[bytes, int] = {}
    start = 0
    for end, cid in zip(index.ends, index.ids, strict=True):
        out.setdefault(cid, start)
        start = end
    return out


def make_plan(
    index: ChunkIndex,
    sizes: Sequence[int],
    data_start: int,
    seed: Mapping[bytes, int],
    *,
    max_gap: int = DEFAULT_MAX_GAP,
) -> Plan:
    """`index`/`sizes`: the new payload's chunk index and compressed sizes; `data_start`: the bundle offset
    of its first compressed chunk; `seed`: chunk id → offset of a chunk the device already holds."""
    n = len(index.ids)
    if len(sizes) != n:
        raise ValueError("chunk table and index differ in length")
    offsets = [None if (off := seed.get(cid)) is None else off for cid in index.ids]
    lengths = tuple(index.chunk_span(i)[1] for i in range(n))
    starts = []
    pos = data_start
    for s in sizes:
        starts.append(pos)
        pos += s
    fetches: list[Fetch] = []
    i = 0
    while i < n:
        if offsets[i] is not None:
            i += 1
            continue
        j = i + 1
        while j < n and offsets[j] is None:
            j += 1
        if fetches and starts[i] - fetches[-1].end < max_gap:
            prev = fetches.pop()
            for k in range(prev.last, i):
                offsets[k] = None  # bridged: comes with the download
            fetches.append(Fetch(prev.start, starts[i] + sum(sizes[i:j]), prev.first, j))
        else:
            fetches.append(Fetch(starts[i], starts[i] + sum(sizes[i:j]), i, j))
        i = j
    return Plan(tuple(offsets), tuple(fetches), tuple(sizes), lengths, tuple(starts))
